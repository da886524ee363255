"""Quota claims of control-plane replicas on SQLite and Postgres: the claims of
all replicas never pass the limit (also when two store instances, as two
replicas, claim at once), a replica's claim only grows, demand counts only
while fresh, a budget's first claim counts the rollups' spend, and old
windows are swept."""

from __future__ import annotations

import asyncio

from control_plane.store import Store
from control_plane.store.quota_records import QuotaClaim
from control_plane.usage import UsageRow, UsageTotals
from keyplane.domain import Provider
from keyplane.v1 import limits_pb2 as lpb

from .conftest import Backend

W0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms: a minute and day boundary
MINUTE = 60_000
DAY = 86_400_000


def claim(
    want: int,
    *,
    limit: int = 100,
    used: int = 0,
    rate: float = 1.0,
    start: int = W0,
    window: int = MINUTE,
    kind: int = lpb.QUOTA_KIND_REQUESTS,
    client: str = "ck_1",
) -> QuotaClaim:
    return QuotaClaim(
        "acme", client, kind, start, start + window, limit, want, used, rate, kind == lpb.QUOTA_KIND_SPEND_DAY
    )


async def test_claims_of_replicas_never_pass_the_limit(store: Store) -> None:
    [a] = await store.claim_quota("replica-a", [claim(70, rate=7.0)], W0 + 10, 10_000)
    assert (a.granted, a.claimed, a.fleet_claimed, a.others_used) == (70, 70, 70, 0)
    [b] = await store.claim_quota("replica-b", [claim(70, used=5, rate=3.0)], W0 + 20, 10_000)
    assert (b.granted, b.claimed, b.fleet_claimed) == (30, 30, 100)
    assert b.fleet_rate == 10.0  # a's 7/s (fresh) and b's own 3/s
    # Nothing left: a asks again, gets nothing, keeps its 70 and sees b's use.
    [a2] = await store.claim_quota("replica-a", [claim(10, used=60, rate=7.0)], W0 + 30, 10_000)
    assert (a2.granted, a2.claimed, a2.fleet_claimed, a2.others_used) == (0, 70, 100, 5)
    # Another window is another pot; a second bucket too.
    later, other = await store.claim_quota(
        "replica-b", [claim(40, start=W0 + MINUTE), claim(40, client="ck_2")], W0 + 40, 10_000
    )
    assert (later.granted, other.granted) == (40, 40)


async def test_demand_of_a_silent_replica_stops_counting(store: Store) -> None:
    await store.claim_quota("replica-a", [claim(1, rate=50.0)], W0, 10_000)
    [fresh] = await store.claim_quota("replica-b", [claim(1, rate=5.0)], W0 + 5_000, 10_000)
    assert fresh.fleet_rate == 55.0
    [stale] = await store.claim_quota("replica-b", [claim(0, rate=5.0)], W0 + 20_000, 10_000)
    assert stale.fleet_rate == 5.0
    assert stale.fleet_claimed == 2  # its claim still counts: it may be leased out


async def test_concurrent_claims_from_two_store_instances_sum_to_the_limit(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    await one.migrate()

    async def claim_many(store: Store, replica: str) -> int:
        got = 0
        for i in range(40):
            [result] = await store.claim_quota(replica, [claim(7, limit=500)], W0 + i, 10_000)
            got += result.granted
        return got

    got = await asyncio.gather(claim_many(one, "replica-a"), claim_many(two, "replica-b"))
    assert sum(got) == 500
    assert all(g > 0 for g in got)


async def test_a_budgets_first_claim_counts_the_spend_already_recorded(store: Store) -> None:
    totals = UsageTotals(requests=3, input_tokens=300, output_tokens=100, cost_micros=4_200)
    other_key = UsageTotals(requests=1, cost_micros=1_000)
    await store.put_usage(
        [
            UsageRow(W0 // 1000 + 3600, "acme", "ck_1", "gpt", "pk_1", Provider.OPENAI, "gpt-4o-mini", totals),
            UsageRow(W0 // 1000 + 7200, "acme", "ck_2", "gpt", "pk_1", Provider.OPENAI, "gpt-4o-mini", other_key),
            # The day before: not in this window.
            UsageRow(W0 // 1000 - 60, "acme", "ck_1", "gpt", "pk_1", Provider.OPENAI, "gpt-4o-mini", totals),
        ]
    )
    spend = lpb.QUOTA_KIND_SPEND_DAY
    [first] = await store.claim_quota("replica-a", [claim(10_000, limit=5_000, window=DAY, kind=spend)], W0, 10_000)
    assert (first.granted, first.fleet_claimed, first.others_used) == (800, 5_000, 4_200)
    # Tenant-wide: both client keys' spend.
    [tenant] = await store.claim_quota(
        "replica-a", [claim(1, limit=10_000, window=DAY, kind=spend, client="")], W0, 10_000
    )
    assert tenant.fleet_claimed == 5_200 + 1
    # The seed is taken once: later claims do not add the rollups again.
    [again] = await store.claim_quota("replica-b", [claim(10, limit=5_000, window=DAY, kind=spend)], W0 + 1, 10_000)
    assert (again.granted, again.fleet_claimed) == (0, 5_000)


async def test_old_windows_are_swept(store: Store) -> None:
    await store.claim_quota("replica-a", [claim(5), claim(5, start=W0 + MINUTE)], W0, 10_000)
    assert await store.sweep_quota_claims(W0 + MINUTE + 1) == 1  # the first window ended at W0 + MINUTE
    [left] = await store.claim_quota("replica-a", [claim(0, start=W0 + MINUTE)], W0 + 1, 10_000)
    assert left.claimed == 5
    [fresh] = await store.claim_quota("replica-a", [claim(0)], W0 + 2, 10_000)
    assert fresh.claimed == 0


async def test_the_fleets_use_is_read_back_per_window(store: Store) -> None:
    await store.claim_quota("replica-a", [claim(10, used=4)], W0, 10_000)
    await store.claim_quota("replica-b", [claim(10, used=3)], W0 + 1, 10_000)
    key = ("acme", "ck_1", lpb.QUOTA_KIND_REQUESTS, W0)
    unknown = ("acme", "ck_1", lpb.QUOTA_KIND_REQUESTS, W0 + MINUTE)
    assert await store.quota_used([key, unknown]) == {key: 7}


async def test_a_silent_replicas_unused_claim_is_released(store: Store) -> None:
    await store.claim_quota("replica-gone", [claim(80, used=30)], W0, 10_000)
    [live] = await store.claim_quota("replica-b", [claim(80)], W0 + 60_000, 10_000, release_ms=120_000)
    assert (live.granted, live.fleet_claimed) == (20, 100)  # still within release_ms: its 80 hold
    [later] = await store.claim_quota("replica-b", [claim(80)], W0 + 121_000, 10_000, release_ms=120_000)
    # Silent past release_ms: only the 30 its sidecars used still count.
    assert (later.granted, later.claimed, later.fleet_claimed) == (50, 70, 100)
