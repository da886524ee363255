"""Limits shared by several control-plane replicas on one Postgres, with real
processes: ``keyplane control-plane`` x2 (each leasing only what it claimed in
the store), ``keyplane sidecar``s split between them, and the fake provider.

- Accuracy: four sidecars, two per replica, are asked three times a client
  key's limit; the fleet admits within 5% of the limit in every window (each
  replica alone would have leased the whole limit to its two).
- Budgets outlive the fleet: spend recorded before a budget was set counts
  against it (seeded from the usage rollups), and after every control plane
  and sidecar restarts, a spent budget stays spent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import limits_pb2 as lpb
from tests.e2e.fleet import MODEL, Fleet, free_port
from tests.e2e.paced_load import (
    CP_FLAGS,
    PER_MINUTE,
    PER_WINDOW,
    WINDOW_MS,
    limit_client_key,
    price_per_token,
    three_times_the_limit,
)
from tests.fakes.upstream import FakeUpstream
from tests.pg import fresh_schema, schema_url


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with fresh_schema("kp_e2e_limits") as schema:
        f = Fleet(tmp_path, schema_url(schema))
        try:
            yield f
        finally:
            await f.stop()


async def test_two_replicas_with_two_sidecars_each_admit_the_limit(fleet: Fleet, upstream: FakeUpstream) -> None:
    await fleet.start_control_plane(*CP_FLAGS)
    _, token = await fleet.configure(upstream, ("sk-limits-replicas-key-0001",))
    await limit_client_key(fleet, requests_per_minute=PER_MINUTE)
    # Started after the write, the other replica knows the limit from its start
    # (a write through one replica reaches another's leases within its reload, 1 s).
    other = free_port()
    await fleet.start_replica(other, *CP_FLAGS)
    ports = [free_port() for _ in range(4)]
    targets = [fleet.target, fleet.target, f"127.0.0.1:{other}", f"127.0.0.1:{other}"]
    await asyncio.gather(*(fleet.start_sidecar(p, target=t) for p, t in zip(ports, targets, strict=True)))
    run = await three_times_the_limit(ports, token)
    per_window = run.per_window
    per_replica = [[a + b for a, b in zip(*pair, strict=True)] for pair in (run.per_sidecar[:2], run.per_sidecar[2:])]
    total = sum(per_window)
    per_minute = total * 60_000 / (len(per_window) * WINDOW_MS)
    print(
        f"\n2 replicas x 2 sidecars on Postgres, limit {PER_WINDOW} per {WINDOW_MS // 1000} s: admitted {per_window} "
        f"per window (by replica {per_replica}); {per_minute:.0f}/min = "
        f"{100 * (per_minute - PER_MINUTE) / PER_MINUTE:+.1f}% of the limit"
    )
    for n in per_window:
        assert abs(n - PER_WINDOW) <= 0.05 * PER_WINDOW, per_window
    # Both replicas' sidecars were served: neither starved the other.
    assert all(sum(counts) >= 0.25 * total for counts in per_replica), per_replica


async def _ask(port: int, token: str, count: int) -> tuple[int, list[httpx.Response]]:
    """``count`` requests in a row: (micro-dollars spent by those admitted, the refusals)."""
    spent, refused = 0, []
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=15.0) as client:
        deadline = time.monotonic() + 10
        while (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the sidecar never got its configuration"
            await asyncio.sleep(0.05)
        for _ in range(count):
            resp = await client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
            )
            if resp.status_code == 200:
                usage = resp.json()["usage"]
                spent += usage["prompt_tokens"] + 2 * usage["completion_tokens"]
            else:
                assert resp.status_code == 429, resp.text
                refused.append(resp)
    return spent, refused


async def test_a_budget_counts_spend_before_it_and_stays_spent_across_restarts(
    fleet: Fleet, upstream: FakeUpstream
) -> None:
    await fleet.start_control_plane(*CP_FLAGS, "--usage-flush-interval", "0.2")
    _, token = await fleet.configure(upstream, ("sk-limits-replicas-key-0002",))
    await price_per_token(fleet)
    port = free_port()
    await fleet.start_sidecar(port)
    before, _ = await _ask(port, token, 30)  # no budget yet
    await asyncio.sleep(2.0)  # reported and flushed into the rollups
    allowance = 150
    await limit_client_key(fleet, daily_budget_micros=before + allowance)
    await asyncio.sleep(2.5)  # the first leases
    after, refused = await _ask(port, token, 30)
    print(f"\nspent {before} micro-USD before a budget of {before + allowance}; {after} after it ({allowance} left)")
    assert refused and json.loads(refused[0].content)["error"]["code"] == "budget_exceeded"
    # Only what was left was spent, give or take one request in flight.
    assert after <= allowance + max(1, before // 30) * 2, (before, after)

    # Everything restarts: another control plane process, a new sidecar.
    await fleet.stop_sidecar(port)
    await fleet.stop_control_plane()
    other = free_port()
    await fleet.start_replica(other, *CP_FLAGS)
    port = free_port()
    await fleet.start_sidecar(port, target=f"127.0.0.1:{other}")
    await asyncio.sleep(2.5)
    spent_again, refused_again = await _ask(port, token, 10)
    print(f"after a restart of everything: {spent_again} micro-USD admitted, {len(refused_again)} of 10 refused")
    assert spent_again == 0 and len(refused_again) == 10
    assert json.loads(refused_again[0].content)["error"]["code"] == "budget_exceeded"
    # The new replica's admin view shows the budget spent.
    channel = aio.insecure_channel(f"127.0.0.1:{other}")
    try:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        [status] = (await admin.ListLimits(lpb.ListLimitsRequest(tenant="acme"), metadata=fleet.admin_md)).statuses
    finally:
        await channel.close(None)
    [daily] = status.usage
    print(f"limits show after the restart: used {daily.used} of {daily.limit}, {daily.remaining} left")
    assert daily.limit == before + allowance and daily.used >= before + after
    # What the stopped replica claimed and its sidecar did not use is released
    # only once that replica is silent for 2 minutes: "remaining" counts it.
    assert daily.remaining <= allowance - after
