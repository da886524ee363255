"""The attempt loop through a real sidecar socket against real fake upstreams:
classification, same-provider rotation, next target, deadline, headers, local health."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from keyplane.health.panic import PanicPolicy
from sidecar.server import Sidecar
from tests.fakes.upstream import (
    ANTHROPIC_OVERLOADED,
    BROKEN_STREAM,
    COMPLETION,
    CONTEXT_LENGTH_EXCEEDED,
    GEMINI_INVALID_API_KEY,
    SERVER_ERROR,
    FakeUpstream,
    Reply,
    rate_limited,
)

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT, auth, sidecar_config

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
SECRETS = {"g1": "sk-gemini-one-0001", "g2": "sk-gemini-two-0002", "o1": "sk-openai-one-0003"}


def fleet_snapshot(upstream: FakeUpstream, *, version: int = 10) -> object:
    """Gemini keys g1 (picked first: heavier) and g2, an OpenAI key o1; route "chat" tries
    Gemini first, then OpenAI; route "other" is Gemini only, another model."""
    return p.snapshot(
        version,
        p.tenant_state(
            TENANT,
            keys=[
                p.pkey("g1", SECRETS["g1"], provider=p.GEMINI, base_url=upstream.base_url, weight=100),
                p.pkey("g2", SECRETS["g2"], provider=p.GEMINI, base_url=upstream.base_url, weight=1),
                p.pkey("o1", SECRETS["o1"], provider=p.OPENAI, base_url=upstream.base_url),
            ],
            routes=[
                p.route(
                    "r1",
                    "chat",
                    p.target("gemini-2.0-flash", provider=p.GEMINI, priority=0),
                    p.target("gpt-4o-mini", provider=p.OPENAI, priority=1),
                ),
                p.route("r2", "other", p.target("gemini-2.5-pro", provider=p.GEMINI)),
            ],
            client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
        ),
    )


async def post(client: httpx.AsyncClient, model: str = "chat", **extra: object) -> httpx.Response:
    return await client.post(CHAT, json={"model": model, "messages": MESSAGES, **extra}, headers=auth())


async def test_gemini_invalid_key_400_rotates_to_the_next_key_and_sticks(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    upstream.program(SECRETS["g1"], GEMINI_INVALID_API_KEY)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        r = await post(client)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "2"
        assert r.headers["x-keyplane-provider"] == "gemini"
        assert r.headers["x-keyplane-key"] == "g2"
        assert r.headers["x-keyplane-excluded"] == "g1:credential"
        assert r.headers["x-keyplane-request-id"]
        assert upstream.secrets() == [SECRETS["g1"], SECRETS["g2"]]
        # Bad for every model, at once (before any control plane round trip).
        mark = len(upstream.chat_requests())
        for model in ("chat", "other"):
            r = await post(client, model)
            assert r.status_code == 200
            assert r.headers["x-keyplane-attempts"] == "1"
            assert r.headers["x-keyplane-key"] == "g2"
            assert r.headers["x-keyplane-excluded"] == "g1:unhealthy"
        assert upstream.secrets(mark) == [SECRETS["g2"], SECRETS["g2"]]
        metrics = (await client.get("/metrics")).text
    assert 'keyplane_sidecar_upstream_attempt_classes_total{error_class="credential",provider="gemini"} 1.0' in metrics
    for secret in SECRETS.values():
        assert secret not in caplog.text
        assert secret not in r.headers.get("x-keyplane-excluded", "")
    assert "g1" in caplog.text


@pytest.mark.parametrize(
    "reply",
    [SERVER_ERROR, ANTHROPIC_OVERLOADED, rate_limited(30)],
    ids=["500", "529", "429"],
)
async def test_every_key_of_the_provider_then_the_next_target(upstream: FakeUpstream, reply: Reply) -> None:
    upstream.program(SECRETS["g1"], reply)
    upstream.program(SECRETS["g2"], reply)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        r = await post(client)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "3"
        assert r.headers["x-keyplane-provider"] == "openai"
        assert r.headers["x-keyplane-key"] == "o1"
        cls = "rate_limited" if reply.status == 429 else "upstream_error"
        assert r.headers["x-keyplane-excluded"] == f"g1:{cls},g2:{cls}"
        assert upstream.secrets() == [SECRETS["g1"], SECRETS["g2"], SECRETS["o1"]]
        assert [q.model for q in upstream.chat_requests()] == ["gemini-2.0-flash", "gemini-2.0-flash", "gpt-4o-mini"]


async def test_client_error_is_returned_unchanged_and_penalises_nobody(upstream: FakeUpstream) -> None:
    upstream.program(SECRETS["g1"], CONTEXT_LENGTH_EXCEEDED, times=1)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        r = await post(client)
        assert r.status_code == 400
        assert r.json() == CONTEXT_LENGTH_EXCEEDED.body
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == "g1"
        assert "x-keyplane-excluded" not in r.headers
        assert upstream.secrets() == [SECRETS["g1"]]
        r = await post(client)
        assert r.status_code == 200
        assert r.headers["x-keyplane-key"] == "g1"
        health = sc.state.health(TENANT)
        assert health.local.unhealthy(sc.state.wall_clock()) == []


async def test_every_key_rate_limited_is_a_429_at_the_earliest_recovery(upstream: FakeUpstream) -> None:
    for secret, wait in zip(SECRETS.values(), (9, 7, 8), strict=True):
        upstream.program(secret, rate_limited(wait))
    config = sidecar_config(panic_policy=PanicPolicy(max_rate_limit_wait=0.0))
    async with Sidecar(config, watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        r = await post(client)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.json()["error"]["providers"] == ["gemini", "openai"]
        assert r.headers["retry-after"] == "7"
        assert 6900 <= int(r.headers["retry-after-ms"]) <= 7000
        assert r.headers["x-keyplane-attempts"] == "3"
        assert r.headers["x-keyplane-excluded"] == "g1:rate_limited,g2:rate_limited,o1:rate_limited"
        # Now all three keys cool down for this model: nothing is tried, the same answer.
        r = await post(client)
        assert r.status_code == 429
        assert 6800 <= int(r.headers["retry-after-ms"]) <= 7000
        assert r.headers["x-keyplane-attempts"] == "0"
        assert r.headers["x-keyplane-excluded"] == "g1:cooldown,g2:cooldown,o1:cooldown"
        assert len(upstream.chat_requests()) == 3


async def test_a_key_is_never_tried_twice_for_a_model_in_one_request(upstream: FakeUpstream) -> None:
    upstream.program(SECRETS["g1"], SERVER_ERROR)
    upstream.program(SECRETS["g2"], SERVER_ERROR)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(
            p.snapshot(
                10,
                p.tenant_state(
                    TENANT,
                    keys=[
                        p.pkey("g1", SECRETS["g1"], provider=p.GEMINI, base_url=upstream.base_url),
                        p.pkey("g2", SECRETS["g2"], provider=p.GEMINI, base_url=upstream.base_url),
                    ],
                    # The same provider and model twice (e.g. two priorities of one deployment).
                    routes=[
                        p.route(
                            "r1",
                            "chat",
                            p.target("gemini-2.0-flash", provider=p.GEMINI, priority=0),
                            p.target("gemini-2.0-flash", provider=p.GEMINI, priority=1),
                        )
                    ],
                    client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
                ),
            )
        )
        r = await post(client)
        assert r.status_code == 500
        assert r.headers["x-keyplane-attempts"] == "2"
        secrets = upstream.secrets()
        assert len(secrets) == 2 and set(secrets) == {SECRETS["g1"], SECRETS["g2"]}


async def test_one_deadline_bounds_the_whole_request(upstream: FakeUpstream) -> None:
    slow = Reply(200, None, delay=5.0)
    upstream.program(SECRETS["g1"], slow)
    upstream.program(SECRETS["g2"], slow)
    upstream.program(SECRETS["o1"], slow)
    config = sidecar_config(request_timeout=0.6, upstream_read_timeout=30.0)
    async with Sidecar(config, watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        started = loop.time()
        r = await post(client)
        elapsed = loop.time() - started
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    # One attempt ate the whole deadline; no fresh timeout per attempt.
    assert r.headers["x-keyplane-attempts"] == "1"
    assert elapsed < 3.0


async def test_stream_broken_mid_way_is_not_retried_and_counts_against_the_key(upstream: FakeUpstream) -> None:
    upstream.program(SECRETS["g1"], BROKEN_STREAM, times=1)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        async with client.stream(
            "POST", CHAT, json={"model": "chat", "messages": MESSAGES, "stream": True}, headers=auth()
        ) as r:
            body = b"".join([c async for c in r.aiter_bytes()])
        assert r.status_code == 200
        assert r.headers["x-keyplane-key"] == "g1"
        assert b'"code":"stream_broken"' in body
        assert upstream.secrets() == [SECRETS["g1"]]
        metrics = (await client.get("/metrics")).text
    assert (
        'keyplane_sidecar_upstream_attempt_classes_total{error_class="stream_broken",provider="gemini"} 1.0' in metrics
    )


async def test_a_completed_stream_counts_as_success(upstream: FakeUpstream) -> None:
    upstream.program(SECRETS["g1"], SERVER_ERROR, times=1)
    upstream.program(SECRETS["g2"], COMPLETION)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        async with client.stream(
            "POST", CHAT, json={"model": "chat", "messages": MESSAGES, "stream": True}, headers=auth()
        ) as r:
            body = b"".join([c async for c in r.aiter_bytes()])
        assert body.endswith(b"data: [DONE]\n\n")
        assert r.headers["x-keyplane-attempts"] == "2"
        assert r.headers["x-keyplane-excluded"] == "g1:upstream_error"
        metrics = (await client.get("/metrics")).text
    assert 'keyplane_sidecar_upstream_attempt_classes_total{error_class="success",provider="gemini"} 1.0' in metrics
    assert 'keyplane_sidecar_upstream_fallbacks_total{provider="gemini"} 1.0' in metrics


async def test_a_success_that_began_before_a_429_leaves_the_cooldown(upstream: FakeUpstream) -> None:
    """Request A on g1 is slow and succeeds; request B, sent while A is in flight,
    gets a 429 on g1 (Retry-After 30 s) and moves to g2. A's success ends after the
    429 but began before it: g1 stays cooled down for the model, as the provider asked."""
    upstream.program(SECRETS["g1"], rate_limited(30), times=1)  # older rule: the second request
    upstream.program(SECRETS["g1"], Reply(200, None, delay=0.4), times=1)  # newest: the first
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(fleet_snapshot(upstream))  # type: ignore[arg-type]
        first = asyncio.create_task(post(client))
        await asyncio.sleep(0.15)
        second = await post(client)
        assert second.status_code == 200
        assert second.headers["x-keyplane-attempts"] == "2"  # g1 (429), then g2
        health = sc.state.health(TENANT)
        assert not health.key_usable("g1", "gemini-2.0-flash", sc.state.wall_clock())
        a = await first
        assert a.status_code == 200 and a.headers["x-keyplane-key"] == "g1"
        assert not health.key_usable("g1", "gemini-2.0-flash", sc.state.wall_clock())
        third = await post(client)
        assert third.headers["x-keyplane-key"] == "g2"  # g1 is still out
