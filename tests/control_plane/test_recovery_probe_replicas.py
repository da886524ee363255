"""Two control-plane replicas on one Postgres, both running the recovery
probe: each bench of an exhausted key is probed by one replica only (the
store lease), and the result reaches the watch streams of both.

Fails when Postgres is unreachable under CI=true; skips otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time

from control_plane.recovery_probe import RecoveryProbeConfig
from keyplane.health import HealthPolicy
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import HarnessFactory, next_message
from tests.control_plane.test_health import report
from tests.control_plane.test_recovery_probe import _next_key_health
from tests.control_plane.test_replicas_postgres import pg_url  # noqa: F401  (fixture)
from tests.fakes.upstream import EXHAUSTED_REPLIES, FakeUpstream, Reply

SECRET_A = "sk-replicas-exhausted-A-0123456789"


async def test_one_replica_probes_each_bench_and_both_publish_the_result(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    master_key = os.urandom(32)
    settings = {
        "store_url": pg_url,
        "master_key": master_key,
        "health_policy": HealthPolicy(exhausted_bench=1.0, exhausted_max_bench=10.0),
        "recovery_probe": RecoveryProbeConfig(interval=0.02, lead=0.2, timeout=3.0),
    }
    async with FakeUpstream() as fake:
        exhausted = EXHAUSTED_REPLIES["deepseek-402-insufficient_balance"]
        # A slow answer: a second replica probing the same bench would overlap it.
        fake.program(SECRET_A, Reply(exhausted.status, exhausted.body, delay=0.3))
        one = await make_harness(**settings)
        two = await make_harness(**settings)
        await one.tenant()
        key = await one.key(
            label="a",
            secret=SECRET_A,
            provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
            base_url=fake.base_url,
            allowed_models=["deepseek-chat"],
        )
        await asyncio.sleep(0.3)  # replica two hears of the key (NOTIFY)
        watches = [one.watch(("acme",)), two.watch(("acme",))]
        for call in watches:
            assert (await next_message(call, 2.0)).WhichOneof("payload") == "snapshot"

        report_message = spb.Outcome(
            tenant="acme",
            key_id=key.id,
            provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
            model="deepseek-chat",
            outcome_class=spb.OUTCOME_CLASS_EXHAUSTED,
            status_code=402,
            reason="402 insufficient balance: Insufficient Balance",
        )
        assert await report(one, [report_message]) == 1
        for call in watches:
            assert (await _next_key_health(call, 2.0)).state == rpb.HEALTH_STATE_EXHAUSTED
        started = time.monotonic()
        for call in watches:  # the first probe: still empty, the bench doubles
            extended = await _next_key_health(call, 4.0)
            assert extended.state == rpb.HEALTH_STATE_EXHAUSTED
        assert len(fake.secrets()) == 1
        for call in watches:  # the second probe: still empty
            extended = await _next_key_health(call, 6.0)
            assert extended.state == rpb.HEALTH_STATE_EXHAUSTED
        assert len(fake.secrets()) == 2
        fake.reset(SECRET_A)
        for call in watches:
            restored = await _next_key_health(call, 8.0)
            assert (restored.key_id, restored.model, restored.state) == (key.id, "", rpb.HEALTH_STATE_HEALTHY)
        probers = [h.plane.prober for h in (one, two)]
        assert all(p is not None for p in probers)
        probes = [p.stats.probes for p in probers if p is not None]
        busy = [p.stats.lease_busy for p in probers if p is not None]
        assert sum(probes) == len(fake.secrets()) == 3
        print(
            f"\n2 replicas: {sum(probes)} probes in {time.monotonic() - started:.1f}s for 3 benches "
            f"(per replica {probes}, lease busy {busy})"
        )
