"""The sidecar over a real uvicorn socket, fed real watch messages, against a real fake upstream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from sidecar.server import Sidecar
from sidecar.state import SidecarState
from tests.fakes.upstream import FakeUpstream, Reply

from . import protos as p
from .conftest import (
    CLIENT_TOKEN,
    OTHER_TOKEN,
    PUBLIC_MODEL,
    TENANT,
    UPSTREAM_MODEL,
    auth,
    sidecar_config,
    standard_snapshot,
)

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    # OpenAI's four fields; keyplane's 503/429 add ``reason`` and ``providers``.
    assert {"message", "type", "param", "code"} <= set(error)
    assert set(error) <= {"message", "type", "param", "code", "reason", "providers"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def assert_no_secret_leak(text: str) -> None:
    for secret in ("sk-one", "sk-two", "sk-globex", CLIENT_TOKEN, OTHER_TOKEN):
        assert secret not in text


# --- health ------------------------------------------------------------------------------


async def test_healthz_before_and_after_snapshot(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    before = await client.get("/healthz")
    assert before.status_code == 503
    assert before.json()["status"] == "unavailable"
    assert before.json()["reason"]
    assert (await client.get("/livez")).status_code == 200  # alive all the same

    sidecar.state.apply(standard_snapshot(upstream, version=42))
    for path in ("/healthz", "/readyz"):
        after = await client.get(path)
        assert after.status_code == 200
        body = after.json()
        assert (body["status"], body["version"], body["source"]) == ("ok", 42, "control_plane")
        assert body["reason"]


async def test_readyz_never_turns_stale_by_default_and_livez_never_fails(upstream: FakeUpstream) -> None:
    now = [1000.0]
    state = SidecarState(clock=lambda: now[0])
    async with Sidecar(sidecar_config(), state=state, watch=False) as sc:
        async with httpx.AsyncClient(base_url=sc.url) as c:
            state.apply(standard_snapshot(upstream, version=7))
            state.set_connected(True)
            state.set_connected(False)
            now[0] += 7 * 24 * 3600  # a week without the control plane
            for path in ("/livez", "/readyz", "/healthz"):
                assert (await c.get(path)).status_code == 200, path
            assert (await c.get("/readyz")).json()["snapshot_age_seconds"] == 7 * 24 * 3600


async def test_readyz_turns_stale_past_max_snapshot_age(upstream: FakeUpstream) -> None:
    now = [1000.0]
    state = SidecarState(clock=lambda: now[0])
    async with Sidecar(sidecar_config(max_snapshot_age=60.0), state=state, watch=False) as sc:
        async with httpx.AsyncClient(base_url=sc.url) as c:
            state.apply(standard_snapshot(upstream, version=7))
            state.set_connected(True)
            now[0] += 3600  # a live stream is never stale, however quiet
            assert (await c.get("/readyz")).status_code == 200
            state.set_connected(False)
            now[0] += 59
            assert (await c.get("/readyz")).status_code == 200
            now[0] += 2
            for path in ("/readyz", "/healthz"):
                stale = await c.get(path)
                assert stale.status_code == 503
                assert stale.json()["status"] == "stale"
                assert stale.json()["version"] == 7
                assert "max-snapshot-age" in stale.json()["reason"]
            assert (await c.get("/livez")).status_code == 200  # liveness is not about the control plane
            # Static stability: requests are still served from the last-known state.
            ok = await c.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
            assert ok.status_code == 200


# --- auth and validation -------------------------------------------------------------------


async def test_chat_before_any_snapshot_is_503(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert_openai_error(r, 503, "not_ready")


async def test_missing_and_wrong_client_key_are_401(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    body = {"model": PUBLIC_MODEL, "messages": MESSAGES}

    missing = await client.post(CHAT, json=body)
    assert_openai_error(missing, 401, "missing_api_key")
    wrong = await client.post(CHAT, json=body, headers=auth("kp-wrong-token"))
    assert_openai_error(wrong, 401, "invalid_api_key")
    not_bearer = await client.post(CHAT, json=body, headers={"authorization": f"Basic {CLIENT_TOKEN}"})
    assert_openai_error(not_bearer, 401)
    assert upstream.requests == []

    ok = await client.post(CHAT, json=body, headers=auth())
    assert ok.status_code == 200


async def test_malformed_json_missing_model_unknown_model(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    headers = {**auth(), "content-type": "application/json"}

    bad_json = await client.post(CHAT, content=b'{"model": "gpt-4o-mini", ', headers=headers)
    assert_openai_error(bad_json, 400)
    not_object = await client.post(CHAT, content=b"[1, 2]", headers=headers)
    assert_openai_error(not_object, 400)
    missing_model = await client.post(CHAT, json={"messages": MESSAGES}, headers=auth())
    assert assert_openai_error(missing_model, 400)["param"] == "model"
    numeric_model = await client.post(CHAT, json={"model": 4, "messages": MESSAGES}, headers=auth())
    assert_openai_error(numeric_model, 400)
    unknown = await client.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES}, headers=auth())
    assert_openai_error(unknown, 404, "model_not_found")
    # Another tenant's model is unknown to this tenant.
    foreign = await client.post(CHAT, json={"model": "globex-model", "messages": MESSAGES}, headers=auth())
    assert_openai_error(foreign, 404, "model_not_found")
    assert upstream.requests == []


async def test_unknown_path_wrong_method_and_body_too_large(upstream: FakeUpstream) -> None:
    async with Sidecar(sidecar_config(max_body_bytes=1024), watch=False) as sc:
        sc.state.apply(standard_snapshot(upstream))
        async with httpx.AsyncClient(base_url=sc.url) as c:
            assert_openai_error(await c.get("/v1/files", headers=auth()), 404)
            assert_openai_error(await c.get(CHAT, headers=auth()), 405)
            big = {"model": PUBLIC_MODEL, "messages": [{"role": "user", "content": "x" * 4096}]}
            assert_openai_error(await c.post(CHAT, json=big, headers=auth()), 413)

            async def chunked() -> object:
                for _ in range(8):
                    yield b"x" * 512

            streamed = await c.post(CHAT, content=chunked(), headers=auth())  # type: ignore[arg-type]
            assert_openai_error(streamed, 413)
    assert upstream.requests == []


# --- proxying ---------------------------------------------------------------------------


async def test_non_streaming_pass_through_uses_the_provider_secret(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    r = await client.post(
        CHAT,
        json={"model": PUBLIC_MODEL, "messages": MESSAGES, "temperature": 0.2, "user": "ünïcode"},
        headers={**auth(), "user-agent": "my-app/1.0", "x-custom": "must-not-leak", "cookie": "a=b"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-keyplane-attempts"] == "1"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == UPSTREAM_MODEL
    assert body["choices"][0]["message"]["content"] == "Hello from the fake upstream!"

    [seen] = upstream.chat_requests()
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-one"
    assert seen.headers["user-agent"] == "my-app/1.0"
    assert "x-custom" not in seen.headers
    assert "cookie" not in seen.headers
    assert CLIENT_TOKEN not in json.dumps(seen.headers)
    assert seen.json == {
        "model": UPSTREAM_MODEL,
        "messages": MESSAGES,
        "temperature": 0.2,
        "user": "ünïcode",
    }


async def test_upstream_client_errors_pass_through_unchanged(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.replies["sk-one"] = Reply(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    )
    # A client error is the app's to fix: no other key is tried.
    sidecar.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.headers["x-keyplane-attempts"] == "1"
    assert [q.secret for q in upstream.chat_requests()] == ["sk-one"]


async def test_streaming_chunks_arrive_before_the_upstream_finishes(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    upstream.stream_gate = asyncio.Event()
    received: list[bytes] = []
    async with client.stream(
        "POST", CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": True}, headers=auth()
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-keyplane-attempts"] == "1"
        chunks = r.aiter_bytes()
        while b'"content":"Hello"' not in b"".join(received):
            received.append(await asyncio.wait_for(chunks.__anext__(), 5))
        # The first content chunk is here while the upstream is still held mid-stream.
        assert upstream.first_chunk_sent.is_set()
        assert not upstream.stream_finished.is_set()
        upstream.stream_gate.set()
        async for chunk in chunks:
            received.append(chunk)
    assert upstream.stream_finished.is_set()
    text = b"".join(received).decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(contents) == "Hello from the fake upstream!"
    assert upstream.chat_requests()[0].json["stream"] is True


async def test_stream_with_delays_is_relayed_incrementally(upstream: FakeUpstream) -> None:
    upstream.chunk_delay = 0.2
    async with Sidecar(sidecar_config(), watch=False) as sc:
        sc.state.apply(standard_snapshot(upstream))
        async with httpx.AsyncClient(base_url=sc.url) as c:
            loop = asyncio.get_running_loop()
            start = loop.time()
            arrivals: list[float] = []
            async with c.stream(
                "POST", CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": True}, headers=auth()
            ) as r:
                async for _ in r.aiter_bytes():
                    arrivals.append(loop.time() - start)
    total = 0.2 * len(upstream.chunks)
    assert len(arrivals) >= 3
    assert arrivals[0] < total / 2  # not buffered until the end
    assert arrivals[-1] >= total * 0.9


async def test_client_disconnect_mid_stream_stops_the_upstream(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    upstream.stream_gate = asyncio.Event()
    async with client.stream(
        "POST", CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": True}, headers=auth()
    ) as r:
        async for chunk in r.aiter_bytes():
            if b'"content":"Hello"' in chunk:
                break
    # The app hung up: the sidecar must drop the upstream stream too.
    await asyncio.wait_for(upstream.stream_aborted.wait(), 5)
    upstream.stream_gate.set()
    assert not upstream.stream_finished.is_set()


async def test_app_hang_up_while_waiting_for_the_upstream_is_noticed(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    """A non-streaming call the app gives up on is abandoned upstream too (within the
    disconnect watch delay), not waited out."""
    sidecar.state.apply(standard_snapshot(upstream))
    upstream.program("sk-one", Reply(200, None, delay=3.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(httpx.ReadTimeout):
        await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth(), timeout=0.3)
    while "keyplane_sidecar_client_disconnects_total 1.0" not in (await client.get("/metrics")).text:
        assert loop.time() - started < 2.0, "the sidecar waited for the upstream after the app hung up"
        await asyncio.sleep(0.02)


# --- models and metrics -----------------------------------------------------------------


async def test_models_lists_the_tenants_public_models(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    assert_openai_error(await client.get("/v1/models"), 401)
    r = await client.get("/v1/models", headers=auth())
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [{"id": PUBLIC_MODEL, "object": "model", "created": 0, "owned_by": "keyplane"}],
    }
    other = await client.get("/v1/models", headers=auth(OTHER_TOKEN))
    assert [m["id"] for m in other.json()["data"]] == ["globex-model"]
    one = await client.get(f"/v1/models/{PUBLIC_MODEL}", headers=auth())
    assert one.json()["id"] == PUBLIC_MODEL
    assert_openai_error(await client.get("/v1/models/globex-model", headers=auth()), 404, "model_not_found")


async def test_metrics_expose_requests_attempts_and_version(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream, version=77))
    await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    await client.post(CHAT, json={"model": PUBLIC_MODEL}, headers=auth("nope"))
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'keyplane_sidecar_requests_total{endpoint="chat_completions",status_class="2xx"} 1.0' in text
    assert 'keyplane_sidecar_requests_total{endpoint="chat_completions",status_class="4xx"} 1.0' in text
    assert 'keyplane_sidecar_upstream_attempts_total{outcome="2xx",provider="openai"} 1.0' in text
    assert "keyplane_sidecar_state_version 77.0" in text
    assert_no_secret_leak(text)


# --- deltas ----------------------------------------------------------------------------


async def test_deltas_remove_and_disable_keys(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    state = sidecar.state
    state.apply(standard_snapshot(upstream, version=10, secrets=("sk-one", "sk-two")))
    body = {"model": PUBLIC_MODEL, "messages": MESSAGES}
    for _ in range(4):
        assert (await client.post(CHAT, json=body, headers=auth())).status_code == 200
    assert {r.secret for r in upstream.chat_requests()} == {"sk-one", "sk-two"}

    state.apply(p.delta(p.key_deleted(11, TENANT, "k1")))
    upstream.requests.clear()
    for _ in range(4):
        assert (await client.post(CHAT, json=body, headers=auth())).status_code == 200
    assert {r.secret for r in upstream.chat_requests()} == {"sk-two"}

    state.apply(p.delta(p.key_put(12, TENANT, p.pkey("k2", "sk-two", base_url=upstream.base_url, status=p.DISABLED))))
    assert state.version == 12
    upstream.requests.clear()
    r = await client.post(CHAT, json=body, headers=auth())
    error = assert_openai_error(r, 503, "no_usable_key")
    assert error["reason"] == "disabled" and error["providers"] == ["openai"]
    assert r.headers["x-should-retry"] == "false"
    assert upstream.requests == []

    state.apply(p.delta(p.key_put(13, TENANT, p.pkey("k3", "sk-three", base_url=upstream.base_url))))
    assert (await client.post(CHAT, json=body, headers=auth())).status_code == 200
    assert [r.secret for r in upstream.chat_requests()] == ["sk-three"]


async def test_client_key_and_route_deltas(sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    state = sidecar.state
    state.apply(standard_snapshot(upstream))
    body = {"model": "new-model", "messages": MESSAGES}
    assert_openai_error(await client.post(CHAT, json=body, headers=auth()), 404)
    state.apply(p.delta(p.route_put(11, TENANT, p.route("r2", "new-model", p.target("gpt-4.1")))))
    assert (await client.post(CHAT, json=body, headers=auth())).status_code == 200
    assert upstream.chat_requests()[-1].json["model"] == "gpt-4.1"
    state.apply(p.delta(p.route_deleted(12, TENANT, "r2")))
    assert_openai_error(await client.post(CHAT, json=body, headers=auth()), 404)

    state.apply(p.delta(p.client_key_deleted(13, TENANT, "ck1")))
    assert_openai_error(await client.get("/v1/models", headers=auth()), 401, "invalid_api_key")
    state.apply(p.delta(p.client_key_put(14, TENANT, p.client_key("ck2", "kp-rotated"))))
    assert (await client.get("/v1/models", headers=auth("kp-rotated"))).status_code == 200

    state.apply(p.delta(p.tenant_deleted(15, TENANT)))
    assert_openai_error(await client.get("/v1/models", headers=auth("kp-rotated")), 401)
    assert (await client.get("/v1/models", headers=auth(OTHER_TOKEN))).status_code == 200
