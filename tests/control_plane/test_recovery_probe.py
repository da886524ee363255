"""Exhausted keys of each provider wording, end to end through a real control
plane (gRPC on 127.0.0.1, SQLite): a sidecar's report benches the key
key-wide and the bench is pushed over Watch; the background recovery probe
asks the fake provider (serving the provider's real answer) with the key,
extends the bench while the account is still empty, and restores the key
fleet-wide once the provider answers again."""

from __future__ import annotations

import json
import os
import time

import pytest

from control_plane.recovery_probe import RecoveryProbeConfig
from keyplane import convert
from keyplane.domain import Provider
from keyplane.health import HealthPolicy, Outcome, classify_response
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import ADMIN_MD, HarnessFactory, WatchCall, next_message
from tests.control_plane.test_health import report
from tests.fakes.upstream import EXHAUSTED_REPLIES, FakeUpstream

SECRET_A = "sk-exhausted-A-0123456789abcdef"
MODEL = "probe-model"


async def _next_key_health(call: WatchCall, within: float) -> rpb.KeyHealth:
    deadline = time.monotonic() + within
    while True:
        message = await next_message(call, max(0.05, deadline - time.monotonic()))
        if message.WhichOneof("payload") != "delta":
            continue
        for change in message.delta.changes:
            if change.WhichOneof("change") == "key_health":
                return change.key_health


@pytest.mark.parametrize("wording", sorted(EXHAUSTED_REPLIES))
async def test_exhausted_key_is_benched_probed_and_restored(make_harness: HarnessFactory, wording: str) -> None:
    reply = EXHAUSTED_REPLIES[wording]
    provider = rpb.PROVIDER_AZURE_OPENAI if wording.startswith("azure") else rpb.PROVIDER_OPENAI_COMPATIBLE
    async with FakeUpstream() as fake:
        fake.program(SECRET_A, reply)
        harness = await make_harness(
            health_policy=HealthPolicy(exhausted_bench=0.6, exhausted_max_bench=5.0),
            recovery_probe=RecoveryProbeConfig(interval=0.05, lead=0.1, timeout=2.0),
        )
        await harness.tenant("acme")
        key = await harness.key(label="a", secret=SECRET_A, provider=provider, base_url=fake.base_url)
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant="acme",
                public_model="chat",
                targets=[rpb.RouteTarget(provider=provider, upstream_model=MODEL, priority=1, weight=1)],
            ),
            metadata=ADMIN_MD,
        )
        watch = harness.watch(("acme",))
        assert (await next_message(watch)).WhichOneof("payload") == "snapshot"

        # A sidecar reports the provider's answer, classified as it would classify it.
        body = json.dumps(reply.body).encode()
        classification = classify_response(reply.status, reply.headers, body, now=time.time())
        outcome = Outcome(key.id, convert.provider_from_proto(provider) or Provider.OPENAI, MODEL, classification, True)
        assert await report(harness, [convert.outcome_to_proto("acme", outcome)]) == 1
        benched = await _next_key_health(watch, 2.0)
        assert (benched.key_id, benched.model, benched.state) == (key.id, "", rpb.HEALTH_STATE_EXHAUSTED)
        assert benched.reason == classification.reason and ":" in benched.reason
        assert SECRET_A not in benched.reason
        first_bench = benched.until.ToNanoseconds() / 1e9 - time.time()
        assert 0.0 < first_bench <= 0.6
        shown = await harness.admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=ADMIN_MD)
        assert [(h.key_id, h.state, h.reason) for h in shown.key_health] == [
            (key.id, rpb.HEALTH_STATE_EXHAUSTED, classification.reason)
        ]

        # The probe finds the account still empty: the bench is extended, longer.
        extended = await _next_key_health(watch, 3.0)
        assert extended.state == rpb.HEALTH_STATE_EXHAUSTED and extended.model == ""
        second_bench = extended.until.ToNanoseconds() / 1e9 - time.time()
        assert second_bench > first_bench
        probes = [r for r in fake.chat_requests() if r.secret == SECRET_A]
        assert len(probes) == 1
        assert probes[0].json == {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}

        # The account is topped up: the next probe restores the key for everyone.
        fake.reset(SECRET_A)
        restored = await _next_key_health(watch, 4.0)
        assert (restored.key_id, restored.model, restored.state) == (key.id, "", rpb.HEALTH_STATE_HEALTHY)
        prober = harness.plane.prober
        assert prober is not None
        assert (prober.stats.extended, prober.stats.restored) == (1, 1)
        shown = await harness.admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=ADMIN_MD)
        assert list(shown.key_health) == []
        assert len([r for r in fake.chat_requests() if r.secret == SECRET_A]) == 2
        print(f"\n{wording}: bench {first_bench:.2f}s -> {second_bench:.2f}s, restored after 2 probes")


async def test_a_refused_base_url_is_never_probed(make_harness: HarnessFactory) -> None:
    master_key = os.urandom(32)
    probe = RecoveryProbeConfig(interval=0.05, lead=0.1, timeout=2.0)
    async with FakeUpstream() as fake:
        first = await make_harness(master_key=master_key)
        await first.tenant("acme")
        key = await first.key(
            label="a", secret=SECRET_A, provider=rpb.PROVIDER_OPENAI_COMPATIBLE, base_url=fake.base_url
        )
        await first.channel.close(None)
        await first.plane.stop(grace=0.1)
        # Restarted with --deny-private-base-urls: the stored loopback base URL is refused now.
        harness = await make_harness(
            master_key=master_key,
            deny_private_base_urls=True,
            health_policy=HealthPolicy(exhausted_bench=0.3),
            recovery_probe=probe,
        )
        watch = harness.watch(("acme",))
        await next_message(watch)
        outcome = spb.Outcome(
            tenant="acme",
            key_id=key.id,
            provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
            model=MODEL,
            outcome_class=spb.OUTCOME_CLASS_EXHAUSTED,
            status_code=402,
            reason="402 insufficient balance: Insufficient Balance",
        )
        assert await report(harness, [outcome]) == 1
        assert (await _next_key_health(watch, 2.0)).state == rpb.HEALTH_STATE_EXHAUSTED
        again = await _next_key_health(watch, 3.0)
        assert again.state == rpb.HEALTH_STATE_EXHAUSTED
        assert again.reason == "402 insufficient balance: Insufficient Balance"  # kept: the probe said nothing
        assert fake.requests == []
        prober = harness.plane.prober
        assert prober is not None and prober.stats.inconclusive >= 1
