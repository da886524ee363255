"""Rate limits held fleet-wide with no call on the request path, with real
processes: ``keyplane control-plane`` (SQLite, leases over StreamQuota),
``keyplane sidecar``s (HTTP sockets) and the fake provider.

Windows are scaled down (``--limits-window 6``: a limit of 1200 requests per
minute counts as 120 per 6 s) so that each test runs in well under a minute.

- Accuracy: four sidecars share one client key and are asked three times its
  limit; the fleet admits within 5% of the limit in every window.
- Budget: four sidecars share a client key's daily budget under load; it is
  overspent only by the requests in flight when it ran out (at most one per
  sidecar), far less than a lease.
- Fail-static: the control plane is killed; a sidecar keeps enforcing its last
  lease (its fallback share, every window), while one started with
  ``--limits-fail-open`` admits everything once its leases are stale.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Fleet, free_port
from tests.e2e.paced_load import (
    CP_FLAGS,
    PER_MINUTE,
    PER_WINDOW,
    WINDOW_MS,
    PacedLoad,
    limit_client_key,
    next_window,
    price_per_token,
    three_times_the_limit,
)
from tests.fakes.upstream import FakeUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        await f.stop()


async def _limit_the_client_key(fleet: Fleet, upstream: FakeUpstream) -> str:
    """Configure tenant, key, route and client key; limit the key to PER_MINUTE; its token."""
    _, token = await fleet.configure(upstream, ("sk-limits-fleet-key-0001",))
    await limit_client_key(fleet, requests_per_minute=PER_MINUTE)
    return token


async def test_four_sidecars_at_three_times_the_limit_admit_the_limit(fleet: Fleet, upstream: FakeUpstream) -> None:
    await fleet.start_control_plane(*CP_FLAGS)
    token = await _limit_the_client_key(fleet, upstream)
    ports = [free_port() for _ in range(4)]
    await asyncio.gather(*(fleet.start_sidecar(port) for port in ports))
    run = await three_times_the_limit(ports, token)
    per_window, asked, loads = run.per_window, run.asked, run.loads
    total = sum(per_window)
    per_minute = total * 60_000 / (len(per_window) * WINDOW_MS)
    print(
        f"\nfleet of 4 sidecars, limit {PER_WINDOW} per {WINDOW_MS // 1000} s ({PER_MINUTE}/min): asked {asked}, "
        f"admitted {per_window} per window; {per_minute:.0f}/min admitted = "
        f"{100 * (per_minute - PER_MINUTE) / PER_MINUTE:+.1f}% of the limit"
    )
    for n in per_window:
        assert abs(n - PER_WINDOW) <= 0.05 * PER_WINDOW, per_window
    assert abs(per_minute - PER_MINUTE) <= 0.05 * PER_MINUTE

    refusal = loads[0].refusals[0]
    assert refusal.headers["retry-after"].isdigit()
    assert 0 < int(refusal.headers["retry-after-ms"]) <= WINDOW_MS
    error = json.loads(refusal.content)["error"]
    assert error["code"] == "client_rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "keyplane limit" in error["message"]


async def test_limits_hold_fail_static_while_the_control_plane_is_away_and_fail_open_by_flag(
    fleet: Fleet, upstream: FakeUpstream
) -> None:
    await fleet.start_control_plane(*CP_FLAGS)
    token = await _limit_the_client_key(fleet, upstream)
    static_port, open_port = free_port(), free_port()
    await asyncio.gather(
        fleet.start_sidecar(static_port),
        fleet.start_sidecar(open_port, "--limits-fail-open", "--limits-stale-after", "2"),
    )
    # Each asks 1.5x the limit: both above their share while leased.
    rate = 1.5 * PER_WINDOW / (WINDOW_MS / 1000)
    static = PacedLoad(f"http://127.0.0.1:{static_port}/v1", token, rate)
    opened = PacedLoad(f"http://127.0.0.1:{open_port}/v1", token, rate)
    lead, _ = next_window(3.0)
    start = time.monotonic()
    running = asyncio.gather(
        static.run(start + lead + 3 * WINDOW_MS / 1000), opened.run(start + lead + 3 * WINDOW_MS / 1000)
    )
    await asyncio.sleep(lead)
    await fleet.kill_control_plane()
    killed_ms = time.time_ns() // 1_000_000
    await running

    # Windows that began at least 2.5 s after the kill: leases stale for everyone.
    after = [
        w
        for w in sorted(static.admitted_by_window())
        if w >= killed_ms + 2500 and w + WINDOW_MS <= killed_ms + 3 * WINDOW_MS
    ]
    assert after, "no whole window after the outage began"
    static_admitted = [static.admitted_by_window().get(w, 0) for w in after]
    static_asked = [sum(1 for t, _ in static.answers if w <= t < w + WINDOW_MS) for w in after]
    open_statuses = {s for t, s in opened.answers if t >= killed_ms + 2500}
    print(
        f"\ncontrol plane down: fail-static sidecar admitted {static_admitted} of {static_asked} asked per window "
        f"(limit {PER_WINDOW} for the fleet); fail-open sidecar answered {sorted(open_statuses)}"
    )
    for admitted, asked in zip(static_admitted, static_asked, strict=True):
        assert 0.25 * PER_WINDOW <= admitted <= 0.75 * PER_WINDOW + 2, (admitted, asked)
    assert open_statuses == {200}
    assert not static.errors and not opened.errors


async def test_a_budget_shared_by_four_sidecars_is_overspent_by_less_than_a_lease(
    fleet: Fleet, upstream: FakeUpstream
) -> None:
    await fleet.start_control_plane(*CP_FLAGS)
    _, token = await fleet.configure(upstream, ("sk-limits-fleet-key-0002",))
    budget = 3000  # micro-dollars per UTC day
    await price_per_token(fleet)
    await limit_client_key(fleet, daily_budget_micros=budget)
    ports = [free_port() for _ in range(4)]
    await asyncio.gather(*(fleet.start_sidecar(port) for port in ports))
    await asyncio.sleep(1.5)  # the first leases
    loads = [PacedLoad(f"http://127.0.0.1:{port}/v1", token, 12.0) for port in ports]
    await asyncio.gather(*(load.run(time.monotonic() + 8.0) for load in loads))

    costs = [
        json.loads(body)["usage"]["prompt_tokens"] + 2 * json.loads(body)["usage"]["completion_tokens"]
        for load in loads
        for body in load.bodies
    ]
    spent, biggest = sum(costs), max(costs)
    refused = [r for load in loads for r in load.refusals]
    # A sidecar's top-up covers two rebalances of its demand: 12 req/s x 2 s of ~21 micro-dollars.
    lease = round(12.0 * 2 * sum(costs) / len(costs))
    print(
        f"\nbudget {budget} micro-USD shared by 4 sidecars: spent {spent} ({spent - budget:+d}) in {len(costs)} "
        f"requests; largest request {biggest}; a lease at this demand ~{lease}"
    )
    assert spent >= budget * 0.95
    # Past the budget only by the requests in flight when it ran out (about one per sidecar).
    assert spent - budget < lease
    assert refused, "the budget was never spent"
    error = json.loads(refused[0].content)["error"]
    assert error["code"] == "budget_exceeded" and refused[0].headers["x-should-retry"] == "false"
