"""Exhausted keys end to end: a real control plane (in-process, SQLite, real
gRPC socket, background recovery probe), two real sidecars and a fake
provider answering key A with a provider's real "out of credits" answer.
Key A is benched for every model on both sidecars after one answer, requests
go to key B, the control plane probes A in the background (extending the
bench while the account is empty) and, once the provider serves A again,
restores it on both sidecars."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.recovery_probe import RecoveryProbeConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from tests.e2e.test_health_failover import (
    ADMIN_MD,
    ADMIN_TOKEN,
    POLICY,
    SIDECAR_TOKEN,
    TENANT,
    Fleet,
    eventually,
)
from tests.fakes.upstream import EXHAUSTED_REPLIES, FakeUpstream

SECRET_A = "sk-e2e-exhausted-A-000000000001"
SECRET_B = "sk-e2e-healthy-B-000000000002"
BENCH = 1.5  # the control plane's first bench (seconds); doubles per failed probe


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    config = ControlPlaneConfig(
        store_url=f"sqlite:///{tmp_path / 'keyplane.db'}",
        admin_token=ADMIN_TOKEN,
        master_key=os.urandom(32),
        sidecar_tokens={SIDECAR_TOKEN: (TENANT,)},
        listen="127.0.0.1:0",
        poll_interval=None,
        shutdown_grace=0.2,
        health_policy=dataclasses.replace(POLICY, exhausted_bench=BENCH, exhausted_max_bench=20.0),
        recovery_probe=RecoveryProbeConfig(interval=0.1, lead=0.3, timeout=3.0),
    )
    plane = ControlPlane(config)
    await plane.start()
    channel = aio.insecure_channel(plane.address)
    async with FakeUpstream() as upstream:
        fleet = Fleet(plane, channel, admin_service_pb2_grpc.AdminServiceStub(channel), upstream)
        try:
            await fleet.admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
            yield fleet
        finally:
            for client in fleet.clients:
                await client.aclose()
            for sidecar in fleet.sidecars:
                await sidecar.stop()
            await channel.close(None)
            await plane.stop(grace=0.2)


@pytest.mark.parametrize("wording", ["deepseek-402-insufficient_balance", "anthropic-400-credit_balance"])
async def test_exhausted_key_is_benched_fleet_wide_probed_and_restored(fleet: Fleet, wording: str) -> None:
    a = await fleet.key("a", rpb.PROVIDER_OPENAI_COMPATIBLE, SECRET_A, weight=100)
    b = await fleet.key("b", rpb.PROVIDER_OPENAI_COMPATIBLE, SECRET_B)
    await fleet.route("chat", (rpb.PROVIDER_OPENAI_COMPATIBLE, "model-1", 0))
    await fleet.route("other", (rpb.PROVIDER_OPENAI_COMPATIBLE, "model-2", 0))
    await fleet.start_sidecars()
    up = fleet.upstream
    up.program(SECRET_A, EXHAUSTED_REPLIES[wording])
    started = time.monotonic()

    # One answer: A fails over to B at once.
    r = await fleet.chat(0, "chat")
    assert r.status_code == 200, r.text
    assert r.headers["x-keyplane-attempts"] == "2"
    assert r.headers["x-keyplane-key"] == b
    assert up.secrets() == [SECRET_A, SECRET_B]

    # The second sidecar learns it from the control plane: A is out for every model.
    async def pushed() -> bool:
        health = fleet.sidecars[1].state.health(TENANT)
        return not any(health.key_usable(a, m, time.time()) for m in ("model-1", "model-2"))

    learnt = await eventually(pushed, within=3.0, what="second sidecar benches A")

    # Benched key-wide, with the provider's words, as the admin sees it.
    async def benched() -> bool:
        return any(
            h.key_id == a and h.model == "" and h.state == rpb.HEALTH_STATE_EXHAUSTED
            for h in (await fleet.health()).key_health
        )

    await eventually(benched, what="key A exhausted in GetHealth")
    [entry] = [h for h in (await fleet.health()).key_health if h.key_id == a]
    assert "credit" in entry.reason.lower() or "balance" in entry.reason.lower()
    assert SECRET_A[-4:] not in entry.reason

    # Neither sidecar sends A anything more, whatever the model.
    app_calls_to_a = up.secrets().count(SECRET_A)
    for sidecar in (0, 1, 0, 1):
        for model in ("chat", "other"):
            r = await fleet.chat(sidecar, model)
            assert r.status_code == 200, r.text
            assert r.headers["x-keyplane-attempts"] == "1"
            assert r.headers["x-keyplane-key"] == b
            assert r.headers["x-keyplane-excluded"] == f"{a}:exhausted"
    assert up.secrets().count(SECRET_A) == app_calls_to_a == 1

    # The control plane's probe finds the account still empty: the bench grows.
    prober = fleet.plane.prober
    assert prober is not None

    async def extended() -> bool:
        return prober.stats.extended >= 1

    await eventually(extended, within=BENCH + 3.0, what="first probe extends the bench")
    [entry] = [h for h in (await fleet.health()).key_health if h.key_id == a]
    assert entry.state == rpb.HEALTH_STATE_EXHAUSTED
    assert entry.until.ToNanoseconds() / 1e9 - time.time() > BENCH  # doubled (minus the time since)

    # The account is topped up: the next probe restores A on both sidecars.
    up.reset(SECRET_A)
    topped_up = time.monotonic()

    async def restored() -> bool:
        return all(s.state.health(TENANT).key_usable(a, "model-1", time.time()) for s in fleet.sidecars)

    await eventually(restored, within=2 * BENCH + 5.0, what="A restored on every sidecar")
    restored_after = time.monotonic() - topped_up
    assert [h for h in (await fleet.health()).key_health if h.key_id == a] == []
    for sidecar in (0, 1):
        for model in ("chat", "other"):
            r = await fleet.chat(sidecar, model)
            assert r.status_code == 200, r.text
            assert r.headers["x-keyplane-key"] == a
    probes = [r for r in up.chat_requests() if r.secret == SECRET_A and r.json and r.json.get("max_tokens") == 1]
    assert (prober.stats.extended, prober.stats.restored, len(probes)) == (1, 1, 2)
    print(
        f"\n{wording}: second sidecar benched A {learnt:.2f}s after the first answer; upstream calls with A: "
        f"1 by apps, {len(probes)} probes over {time.monotonic() - started:.1f}s; "
        f"restored on both sidecars {restored_after:.2f}s after the top-up"
    )
