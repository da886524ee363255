"""control_plane.quota_claims: two control-plane replicas lease one limit to
their own sidecars out of what each claimed in a real store (SQLite file),
simulated in time (no servers): the fleet admits the limit per window, never
more, whichever replica serves whom; a replica cut off from its store grants
only its share of the limit."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.quota_claims import QuotaClaims
from control_plane.quota_leases import BucketLedger
from control_plane.store import SqliteStore
from keyplane.quota import LocalQuota
from keyplane.v1 import limits_pb2 as lpb

W = 6000
BUCKET = ("acme", "ck_1", lpb.QUOTA_KIND_REQUESTS)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "keyplane.db"))
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


async def simulate(
    store: SqliteStore, limit: int, replicas: dict[str, dict[str, float]], windows: int, seed: int = 1
) -> list[int]:
    """Each replica leases ``limit`` to its sidecars (sidecar -> asks per
    second); reports, claims and rebalances once a second: admitted per window."""
    rng = random.Random(seed)
    start = 600_000
    ledgers = {r: BucketLedger(limit=limit, window_ms=W, coordinated=True) for r in replicas}
    claims = {r: QuotaClaims(store, r) for r in replicas}
    quotas: dict[str, LocalQuota] = {}
    for r, rates in replicas.items():
        for s in rates:
            ledgers[r].connect(s, start)
        await claims[r].claim({BUCKET: ledgers[r]}, start)
        for s, lease in ledgers[r].rebalance(start).items():
            quotas[s] = LocalQuota(lease)
    admitted: dict[int, int] = {}
    step = 10
    for now in range(start, start + windows * W, step):
        for rates in replicas.values():
            for s, rate in rates.items():
                for _ in range(sum(1 for _ in range(3) if rng.random() < rate * step / 1000 / 3)):
                    if quotas[s].take(now) == 0:
                        admitted[now - now % W] = admitted.get(now - now % W, 0) + 1
        if now % 1000 == 0:
            for r, rates in replicas.items():
                for s in rates:
                    ledgers[r].report(s, *quotas[s].report(now), now_ms=now)
                await claims[r].claim({BUCKET: ledgers[r]}, now)
                for s, lease in ledgers[r].rebalance(now).items():
                    quotas[s].update(lease, now)
    return [admitted.get(w, 0) for w in sorted(admitted)]


async def test_two_replicas_at_three_times_the_limit_admit_the_limit(store: SqliteStore) -> None:
    limit = 120
    rate = 3 * limit / 6 / 4
    replicas = {"replica-a": {"a1": rate, "a2": rate}, "replica-b": {"b1": rate, "b2": rate}}
    per_window = await simulate(store, limit, replicas, windows=10)
    print(f"two replicas, four sidecars, limit {limit} per window: admitted {per_window}")
    assert all(n <= limit for n in per_window), per_window
    assert all(n >= 0.95 * limit for n in per_window[1:]), per_window


async def test_uneven_replicas_hold_the_limit_and_feed_the_busy_one(store: SqliteStore) -> None:
    limit = 300
    replicas = {"replica-a": {"busy": 120.0}, "replica-b": {"idle": 1.0, "mid": 20.0}}
    per_window = await simulate(store, limit, replicas, windows=8)
    assert all(n <= limit for n in per_window), per_window
    assert all(n >= 0.95 * limit for n in per_window[1:]), per_window


async def test_a_replica_without_its_store_grants_only_its_share(store: SqliteStore) -> None:
    limit, now = 100, 600_000
    busy, quiet = (
        BucketLedger(limit=limit, window_ms=W, coordinated=True),
        BucketLedger(limit=limit, window_ms=W, coordinated=True),
    )
    claims_busy, claims_quiet = QuotaClaims(store, "replica-busy"), QuotaClaims(store, "replica-quiet")
    busy.connect("s1", now)
    quiet.connect("s2", now)
    for t in range(now, now + 3000, 1000):  # three rebalances learn the demand: 30/s against 10/s
        busy.report("s1", t - t % W, 0, 30, t)
        quiet.report("s2", t - t % W, 0, 10, t)
        await claims_busy.claim({BUCKET: busy}, t)
        await claims_quiet.claim({BUCKET: quiet}, t)
    assert busy.fallback_pool is not None and 70 <= busy.fallback_pool <= 85  # about 3/4
    held = busy.allowance
    # The store goes away. A blip: nothing new is granted.
    await store.close()
    later = now + 2 * W
    busy.report("s1", later - later % W, 0, 10_000, later)
    await claims_busy.claim({BUCKET: busy}, later)
    assert claims_busy.reachable and busy.allowance <= held
    # An outage (5 s on): the busy replica grants up to its share, not the limit.
    later += 5_000
    busy.report("s1", later - later % W, 0, 10_000, later)
    await claims_busy.claim({BUCKET: busy}, later)
    assert not claims_busy.reachable
    lease = busy.rebalance(later)["s1"]
    assert 0 < lease.granted <= busy.fallback_pool < limit
