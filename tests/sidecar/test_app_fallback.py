"""The sidecar's fallbacks over a real uvicorn socket, against a real fake upstream:
to the next key, to the next priority, before a stream's first byte, and what the
app gets when the last attempt fails or a stream breaks after its first byte."""

from __future__ import annotations

import httpx
import openai
import pytest

from sidecar.server import Sidecar
from tests.fakes.upstream import INVALID_API_KEY, RATE_LIMITED, SERVER_ERROR, FakeUpstream, Reply

from . import protos as p
from .conftest import (
    CLIENT_TOKEN,
    PUBLIC_MODEL,
    TENANT,
    UPSTREAM_MODEL,
    auth,
    sidecar_config,
    standard_snapshot,
)
from .test_app import CHAT, MESSAGES, assert_openai_error

# --- fallback ----------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [INVALID_API_KEY, SERVER_ERROR, RATE_LIMITED], ids=["401", "500", "429"])
async def test_fallback_to_the_second_key(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream, reply: object
) -> None:
    upstream.replies["sk-bad"] = reply  # type: ignore[assignment]
    state = sidecar.state
    state.apply(
        p.snapshot(
            10,
            p.tenant_state(
                TENANT,
                # k1 weighs more, so smooth WRR picks it first.
                keys=[
                    p.pkey("k1", "sk-bad", base_url=upstream.base_url, weight=5),
                    p.pkey("k2", "sk-two", base_url=upstream.base_url, weight=1),
                ],
                routes=[p.route("r1", PUBLIC_MODEL, p.target(UPSTREAM_MODEL))],
                client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
            ),
        )
    )
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.headers["x-keyplane-attempts"] == "2"
    assert r.json()["object"] == "chat.completion"
    assert [q.secret for q in upstream.chat_requests()] == ["sk-bad", "sk-two"]


async def test_streaming_falls_back_before_the_first_byte(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.replies["sk-bad"] = SERVER_ERROR
    sidecar.state.apply(standard_snapshot(upstream, secrets=("sk-bad", "sk-two")))
    async with client.stream(
        "POST", CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES, "stream": True}, headers=auth()
    ) as r:
        body = b"".join([c async for c in r.aiter_bytes()])
    assert r.status_code == 200
    assert r.headers["x-keyplane-attempts"] == "2"
    assert body.endswith(b"data: [DONE]\n\n")


async def test_last_attempt_failure_is_returned_as_is(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.replies["sk-one"] = SERVER_ERROR
    upstream.replies["sk-two"] = INVALID_API_KEY
    sidecar.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert r.headers["x-keyplane-attempts"] == "2"
    # The 500 as it is when it came last; never the provider's 401 (it would blame the
    # app's key): a 502 when the 401 came last.
    assert r.status_code in (500, 502)
    if r.status_code == 500:
        assert r.json() == SERVER_ERROR.body
    else:
        assert r.json()["error"]["code"] == "upstream_unavailable"


async def test_unreachable_target_falls_back_to_the_next_priority(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream, unused_tcp_port: int
) -> None:
    dead = f"http://127.0.0.1:{unused_tcp_port}/v1"
    sidecar.state.apply(
        p.snapshot(
            10,
            p.tenant_state(
                TENANT,
                keys=[
                    p.pkey("dead", "sk-dead", provider=p.COMPATIBLE, base_url=dead),
                    p.pkey("live", "sk-live", provider=p.ANTHROPIC, base_url=upstream.base_url),
                ],
                routes=[
                    p.route(
                        "r1",
                        PUBLIC_MODEL,
                        p.target("claude-sonnet-4-5", provider=p.ANTHROPIC, priority=1),
                        p.target("local-model", provider=p.COMPATIBLE, priority=0),
                    )
                ],
                client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
            ),
        )
    )
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert r.status_code == 200
    assert r.headers["x-keyplane-attempts"] == "2"
    [seen] = upstream.chat_requests()
    assert seen.json["model"] == "claude-sonnet-4-5"
    assert seen.headers["authorization"] == "Bearer sk-live"

    # With nothing left to try, the app gets an OpenAI-shaped 502.
    sidecar.state.apply(p.delta(p.key_deleted(11, TENANT, "live")))
    r = await client.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
    assert_openai_error(r, 502)
    assert r.headers["x-keyplane-attempts"] == "1"


async def test_azure_and_vllm_request_shapes(
    sidecar: Sidecar, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(
        p.snapshot(
            10,
            p.tenant_state(
                TENANT,
                keys=[p.pkey("az", "az-secret", provider=p.AZURE, base_url=f"{upstream.url}/openai/v1/")],
                routes=[
                    p.route("r1", "azure-model", p.target("gpt-4o-deployment", provider=p.AZURE)),
                    p.route(
                        "r2",
                        "llama",
                        p.target("meta-llama/Llama-3.1-8B", provider=p.VLLM, node_urls=[upstream.base_url]),
                    ),
                ],
                client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
            ),
        )
    )
    r = await client.post(CHAT, json={"model": "azure-model", "messages": MESSAGES}, headers=auth())
    assert r.status_code == 200
    r = await client.post(CHAT, json={"model": "llama", "messages": MESSAGES}, headers=auth())
    assert r.status_code == 200
    azure, vllm = upstream.chat_requests()
    assert azure.path == "/openai/v1/chat/completions"
    assert azure.headers["api-key"] == "az-secret"
    assert "authorization" not in azure.headers
    assert vllm.path == "/v1/chat/completions"
    assert "authorization" not in vllm.headers
    assert vllm.json["model"] == "meta-llama/Llama-3.1-8B"


async def test_read_timeout_before_the_first_byte_falls_back(upstream: FakeUpstream) -> None:
    upstream.replies["sk-slow"] = Reply(200, {"never": "seen"}, delay=3.0)
    async with Sidecar(sidecar_config(upstream_read_timeout=0.3), watch=False) as sc:
        sc.state.apply(standard_snapshot(upstream, secrets=("sk-slow", "sk-two")))
        async with httpx.AsyncClient(base_url=sc.url) as c:
            r = await c.post(CHAT, json={"model": PUBLIC_MODEL, "messages": MESSAGES}, headers=auth())
            assert r.status_code == 200
            assert r.headers["x-keyplane-attempts"] == "2"
            assert r.json()["object"] == "chat.completion"
            metrics = (await c.get("/metrics")).text
    assert 'keyplane_sidecar_upstream_attempts_total{outcome="timeout",provider="openai"} 1.0' in metrics


async def test_stream_broken_after_the_first_byte_ends_with_an_error_event(
    sidecar: Sidecar, upstream: FakeUpstream
) -> None:
    sidecar.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
    upstream.break_after = 2
    async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sidecar.url}/v1", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=PUBLIC_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts: list[str] = []
        with pytest.raises(openai.APIError) as exc:
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == "Hello from"
    assert "broke off" in str(exc.value)
    # Bytes were already sent: no second attempt.
    assert len(upstream.chat_requests()) == 1
