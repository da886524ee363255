"""RouteTarget.endpoints through the admin API (both stores), the CLI's target syntax and
the config file: stored and read back, unknown values refused with INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane_cli.admin import _target
from keyplane_cli.config_file import _target as file_target
from keyplane_cli.config_plan import target_text
from keyplane_cli.tables import route_row as _route_row
from tests.control_plane.conftest import ADMIN_MD, Harness

EMBEDDINGS_AND_RESPONSES = [rpb.ENDPOINT_EMBEDDINGS, rpb.ENDPOINT_RESPONSES]


async def test_route_target_endpoints_round_trip(harness: Harness) -> None:
    await harness.tenant()
    created = await harness.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="embed",
            targets=[
                rpb.RouteTarget(
                    provider=rpb.PROVIDER_OPENAI,
                    upstream_model="text-embedding-3-small",
                    weight=1,
                    endpoints=[*EMBEDDINGS_AND_RESPONSES, rpb.ENDPOINT_EMBEDDINGS],
                ),
                rpb.RouteTarget(provider=rpb.PROVIDER_GEMINI, upstream_model="gemini-embedding", weight=1),
            ],
        ),
        metadata=ADMIN_MD,
    )
    route = created.route
    assert list(route.targets[0].endpoints) == EMBEDDINGS_AND_RESPONSES  # each once, in order
    assert list(route.targets[1].endpoints) == []  # the provider's default
    got = await harness.admin.GetRoute(apb.GetRouteRequest(tenant="acme", id=route.id), metadata=ADMIN_MD)
    assert got.route == route


async def test_unknown_endpoint_is_invalid_argument(harness: Harness) -> None:
    await harness.tenant()
    target = rpb.RouteTarget(
        provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o", weight=1, endpoints=[rpb.Endpoint.ValueType(99)]
    )
    with pytest.raises(aio.AioRpcError) as exc:
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="x", targets=[target]), metadata=ADMIN_MD
        )
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "targets[0].endpoints[0] is not a known endpoint" in (exc.value.details() or "")


def test_cli_target_syntax_carries_endpoints() -> None:
    parsed = _target("openai:gpt-4o@1*2+embeddings,responses")
    assert (parsed.upstream_model, parsed.priority, parsed.weight) == ("gpt-4o", 1, 2)
    assert list(parsed.endpoints) == EMBEDDINGS_AND_RESPONSES
    route = rpb.Route(id="rt_1", public_model="m", targets=[parsed])
    assert "openai:gpt-4o@1*2+embeddings,responses" in _route_row(route)
    with pytest.raises(Exception, match="unknown endpoint 'files'"):
        _target("openai:gpt-4o+files")


def test_config_file_targets_carry_endpoints() -> None:
    spec = file_target("openai:gpt-4o@0*1+chat_completions,embeddings")
    assert spec.endpoints == ("chat_completions", "embeddings")
    assert target_text(spec) == "openai:gpt-4o@0*1+chat_completions,embeddings"
    mapping = file_target({"provider": "openai", "model": "gpt-4o", "endpoints": ["responses"]})
    assert mapping.endpoints == ("responses",)
