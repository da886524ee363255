"""sidecar.endpoints and the per-endpoint route views (pure)."""

from __future__ import annotations

from keyplane.domain import Provider
from keyplane.v1 import resources_pb2
from sidecar import endpoints as e
from sidecar.model import route_from_proto

from . import protos as p


def test_table_is_consistent() -> None:
    assert len({x.name for x in e.ALL}) == len({x.path for x in e.ALL}) == len(e.ALL)
    for endpoint in e.ALL:
        assert endpoint.path == "/v1" + endpoint.upstream_path
        if endpoint.served_by:  # no value of its own: its proto is the endpoint serving it
            assert e.BY_PROTO[endpoint.proto].name == endpoint.served_by
            continue
        assert resources_pb2.Endpoint.Name(endpoint.proto) == "ENDPOINT_" + endpoint.name.upper()  # type: ignore[arg-type]
    for endpoint in e.STORED_RESPONSE:
        assert endpoint.path == "/v1" + endpoint.upstream_path and endpoint.served_by == "responses"
    assert set(e.DEFAULT_ENDPOINTS) == set(Provider)


def test_defaults_and_listed_endpoints() -> None:
    every = {x.name for x in e.ALL}
    assert e.endpoints_from_proto([], Provider.OPENAI) == every
    assert e.endpoints_from_proto([], Provider.ANTHROPIC) == {"chat_completions", "messages"}
    assert e.endpoints_from_proto([], Provider.VLLM) == {"chat_completions", "completions", "embeddings"}
    assert e.endpoints_from_proto([resources_pb2.ENDPOINT_EMBEDDINGS], Provider.OPENAI) == {"embeddings"}
    # A value this build does not know (a newer control plane's) is left out, not widened to the default.
    assert e.endpoints_from_proto([resources_pb2.Endpoint.ValueType(99)], Provider.OPENAI) == frozenset()


def test_route_views_per_endpoint() -> None:
    route = route_from_proto(
        p.route(
            "r",
            "m",
            p.target("gpt-4o", priority=0),
            p.target("claude", provider=p.ANTHROPIC, priority=1),
            p.target("embed", priority=2, endpoints=[resources_pb2.ENDPOINT_EMBEDDINGS]),
        )
    )
    chat = route.for_endpoint("chat_completions")
    assert chat is not None and [t.upstream_model for t in chat.targets] == ["gpt-4o", "claude"]
    embeddings = route.for_endpoint("embeddings")
    assert embeddings is not None and [t.upstream_model for t in embeddings.targets] == ["gpt-4o", "embed"]
    assert route.for_endpoint("audio_speech") is not None
    # Translations ride on transcriptions, a stored response's calls on the Responses API.
    for name in ("audio_translations", "responses_retrieve", "responses_delete"):
        assert route.for_endpoint(name) is not None
    listed = route_from_proto(
        p.route("r3", "m3", p.target("whisper", endpoints=[resources_pb2.ENDPOINT_AUDIO_TRANSCRIPTIONS]))
    )
    assert listed.for_endpoint("audio_translations") is listed
    assert listed.for_endpoint("responses_retrieve") is None
    only = route_from_proto(p.route("r2", "m2", p.target("claude", provider=p.ANTHROPIC)))
    assert only.for_endpoint("chat_completions") is only  # every target serves it: the route itself
    assert only.for_endpoint("embeddings") is None
