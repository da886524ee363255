"""When no key can serve: panic probes, waits and honest answers, through a real
sidecar socket against the real fake upstream (sidecar.rescue, keyplane.health.panic)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from keyplane.health.panic import PanicPolicy
from sidecar.server import Sidecar
from tests.fakes.upstream import (
    COMPLETION,
    INVALID_API_KEY,
    SERVER_ERROR,
    FakeUpstream,
    Reply,
    rate_limited,
)

from .conftest import CLIENT_TOKEN, PUBLIC_MODEL, TENANT, UPSTREAM_MODEL, auth, sidecar_config, standard_snapshot

CHAT = "/v1/chat/completions"
BODY = {"model": PUBLIC_MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
# OpenRouter's answer when the account is out of credits (402).
OUT_OF_CREDITS = Reply(
    402,
    {
        "error": {
            "code": 402,
            "message": "This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, "
            "but can only afford 1260. To increase, visit https://openrouter.ai/settings/credits and add more "
            "credits",
        }
    },
)


async def post(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    return await client.post(CHAT, json=BODY, headers={**auth(), **headers})


def usable(sc: Sidecar, key_id: str = "k1") -> bool:
    return sc.state.health(TENANT).key_usable(key_id, UPSTREAM_MODEL, time.time())


async def test_a_three_error_blip_on_the_only_key_then_the_first_request_succeeds(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            r = await post(client)
            assert r.status_code == 500  # the provider's own answer, passed through
        assert not usable(sc)  # three errors: (k1, model) cools down for 10 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        r = await post(client)
        took = loop.time() - started
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-key"] == "k1"
        assert r.headers["x-keyplane-attempts"] == "1"
        assert "x-keyplane-excluded" not in r.headers
        # The probe's success ended the cooldown: the next request is an ordinary one.
        assert usable(sc)
        assert (await post(client)).status_code == 200
    assert len(upstream.chat_requests()) == 5
    print(f"\nfirst request after a 3-error blip: 200 in {took * 1000:.1f} ms (cooldown was 10 s)")


async def test_without_panic_routing_the_blip_is_a_503_until_the_cooldown_ends(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    config = sidecar_config(panic_policy=PanicPolicy(enabled=False))
    async with Sidecar(config, watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            await post(client)
        r = await post(client)
        assert r.status_code == 503
        error = r.json()["error"]
        assert (error["code"], error["reason"], error["providers"]) == ("no_usable_key", "cooling", ["openai"])
        assert "x-should-retry" not in r.headers  # a retry can help
        assert 9 <= int(r.headers["retry-after"]) <= 10
    assert len(upstream.chat_requests()) == 3


async def test_one_probe_at_a_time_the_others_wait_for_its_answer(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            await post(client)
        mark = len(upstream.chat_requests())
        upstream.program("sk-one", Reply(200, None, delay=0.4), times=1)  # the probe is slow
        answers = await asyncio.gather(*(post(client) for _ in range(4)))
        assert [r.status_code for r in answers] == [200] * 4
        seen = upstream.chat_requests()[mark:]
        # The probe went alone; the three others waited for it and went once it succeeded.
        assert len(seen) == 4
        assert all(later.at - seen[0].at >= 0.35 for later in seen[1:])


async def test_a_failed_probe_answers_the_waiters_honestly_once_their_wait_is_spent(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    config = sidecar_config(panic_policy=PanicPolicy(probe_wait=0.2))
    async with Sidecar(config, watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            await post(client)
        mark = len(upstream.chat_requests())
        upstream.program("sk-one", Reply(500, SERVER_ERROR.body, delay=0.6))  # down, and slow to say so
        answers = await asyncio.gather(*(post(client) for _ in range(3)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [500, 503, 503]  # the probe's own answer, and two honest ones
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["reason"] == "cooling"
                assert r.headers["x-keyplane-attempts"] == "0"
                assert "retry-after" not in r.headers and "x-should-retry" not in r.headers
        assert len(upstream.chat_requests()) - mark == 1  # never more than one probe in flight


async def test_the_openai_sdk_with_a_flaky_only_key_does_as_well_as_calling_the_provider(
    upstream: FakeUpstream,
) -> None:
    """50% of the calls fail with a 500, the SDK retries twice (its default): through the
    sidecar the app succeeds as often as when it calls the provider directly."""
    requests, workers = 400, 32

    async def success_rate(client: openai.AsyncOpenAI, model: str) -> float:
        ok = 0
        queue = iter(range(requests))

        async def worker() -> None:
            nonlocal ok
            for _ in queue:
                try:
                    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
                    ok += 1
                except openai.APIStatusError:
                    pass

        await asyncio.gather(*(worker() for _ in range(workers)))
        return ok / requests

    upstream.flaky("sk-one", SERVER_ERROR, 0.5, seed=1)
    async with openai.AsyncOpenAI(api_key="sk-one", base_url=upstream.base_url) as direct:
        direct_rate = await success_rate(direct, UPSTREAM_MODEL)
    upstream.reset("sk-one")
    upstream.flaky("sk-one", SERVER_ERROR, 0.5, seed=2)
    async with (
        Sidecar(sidecar_config(), watch=False) as sc,
        openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sc.url}/v1") as via,
    ):
        sc.state.apply(standard_snapshot(upstream))
        sidecar_rate = await success_rate(via, PUBLIC_MODEL)
    print(
        f"\n50%-flaky only key, openai SDK default retries, {requests} requests x {workers} workers: "
        f"direct {direct_rate:.1%}, through the sidecar {sidecar_rate:.1%}"
    )
    assert abs(direct_rate - sidecar_rate) <= 0.05


async def test_every_key_rate_limited_waits_for_the_first_recovery_inside_the_deadline(
    upstream: FakeUpstream,
) -> None:
    upstream.program("sk-one", rate_limited(1.2), times=1)
    upstream.program("sk-two", rate_limited(3), times=1)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
        loop = asyncio.get_running_loop()
        started = loop.time()
        r = await post(client)
        took = loop.time() - started
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-key"] == "k1"  # the first to recover
        assert r.headers["x-keyplane-attempts"] == "3"
        assert 1.2 <= took < 2.5
    print(f"\nevery key rate limited, first recovery in 1.2 s: 200 after waiting {took:.2f} s")


async def test_every_key_rate_limited_beyond_the_wait_is_a_429_at_the_earliest_recovery(
    upstream: FakeUpstream,
) -> None:
    upstream.program("sk-one", rate_limited(14))
    upstream.program("sk-two", rate_limited(12))
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
        first = await post(client)
        assert first.status_code == 429
        assert first.headers["x-keyplane-attempts"] == "2"
        loop = asyncio.get_running_loop()
        recovery = loop.time() + 12
        await asyncio.sleep(0.5)
        r = await post(client)
        assert r.status_code == 429
        assert r.headers["x-keyplane-attempts"] == "0"
        error = r.json()["error"]
        assert (error["code"], error["reason"], error["providers"]) == (
            "rate_limit_exceeded",
            "rate_limited",
            ["openai"],
        )
        left_ms = (recovery - loop.time()) * 1000
        got_ms = int(r.headers["retry-after-ms"])
        assert abs(got_ms - left_ms) <= 100
        assert r.headers["retry-after"] == "12"  # whole seconds, rounded up
        async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sc.url}/v1", max_retries=0) as sdk:
            with pytest.raises(openai.RateLimitError):
                await sdk.chat.completions.create(model=PUBLIC_MODEL, messages=BODY["messages"])  # type: ignore[arg-type]
    assert len(upstream.chat_requests()) == 2
    print(f"\nevery key rate limited for 12 s: 429, retry-after-ms {got_ms} against {left_ms:.0f} left")


async def test_a_wait_never_outlasts_the_apps_own_timeout(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", rate_limited(2), times=1)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        loop = asyncio.get_running_loop()
        started = loop.time()
        # What the openai SDK sends: its read timeout (here the app set 1 s).
        r = await post(client, **{"x-stainless-read-timeout": "1.0"})
        assert r.status_code == 429
        assert loop.time() - started < 0.5
        assert 1900 <= int(r.headers["retry-after-ms"]) <= 2000


async def test_a_failed_credential_on_the_last_key_is_an_honest_503_never_the_providers_401(
    upstream: FakeUpstream,
) -> None:
    upstream.program("sk-one", INVALID_API_KEY)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for attempts in ("1", "0"):  # then known: the key is never tried (or probed) again
            r = await post(client)
            assert r.status_code == 503
            error = r.json()["error"]
            assert (error["code"], error["reason"], error["providers"]) == ("no_usable_key", "credentials", ["openai"])
            assert r.headers["x-should-retry"] == "false"
            assert r.headers["x-keyplane-attempts"] == attempts
            assert "sk-" not in r.text and "Incorrect API key" not in r.text
        async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sc.url}/v1") as sdk:
            with pytest.raises(openai.InternalServerError):  # the SDK's default retries: none taken
                await sdk.chat.completions.create(model=PUBLIC_MODEL, messages=BODY["messages"])  # type: ignore[arg-type]
    assert upstream.secrets() == ["sk-one"]


async def test_an_exhausted_key_is_never_probed(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", OUT_OF_CREDITS)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        await post(client)
        r = await post(client)
        assert r.status_code == 503
        error = r.json()["error"]
        assert (error["reason"], error["providers"]) == ("exhausted", ["openai"])
        assert r.headers["x-should-retry"] == "false"
    assert upstream.secrets() == ["sk-one"]


async def test_a_cooling_key_is_probed_when_the_other_failed_its_credentials(upstream: FakeUpstream) -> None:
    upstream.program("sk-two", INVALID_API_KEY)
    upstream.program("sk-one", SERVER_ERROR, times=3)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream, secrets=("sk-one", "sk-two")))
        for _ in range(3):
            await post(client)
        health = sc.state.health(TENANT)
        now = time.time()
        assert not health.key_usable("k1", UPSTREAM_MODEL, now) and not health.key_usable("k2", UPSTREAM_MODEL, now)
        mark = len(upstream.chat_requests())
        r = await post(client)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-key"] == "k1"
        assert r.headers["x-keyplane-excluded"] == "k2:unhealthy"
        assert upstream.secrets(mark) == ["sk-one"]
        upstream.program("sk-one", COMPLETION)


async def test_a_streamed_request_is_a_probe_too_and_the_metrics_say_what_happened(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            await post(client)
        async with client.stream("POST", CHAT, json={**BODY, "stream": True}, headers=auth()) as r:
            body = b"".join([chunk async for chunk in r.aiter_bytes()])
        assert r.status_code == 200
        assert body.endswith(b"data: [DONE]\n\n")
        assert usable(sc)
        metrics = (await client.get("/metrics")).text
    assert 'keyplane_sidecar_no_usable_key_actions_total{action="probe_ok"} 1.0' in metrics


async def test_an_app_hanging_up_during_its_probe_frees_the_probe_slot(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", SERVER_ERROR, times=3)
    async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(standard_snapshot(upstream))
        for _ in range(3):
            await post(client)
        upstream.program("sk-one", Reply(200, None, delay=2.0), times=1)
        with pytest.raises(httpx.ReadTimeout):
            await client.post(CHAT, json=BODY, headers=auth(), timeout=0.3)
        for _ in range(100):
            if len(sc.app.probes) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(sc.app.probes) == 0
        r = await post(client)  # the next request probes (and the provider answers at once)
        assert r.status_code == 200, r.text
