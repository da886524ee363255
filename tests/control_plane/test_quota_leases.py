"""control_plane.quota_leases: the lease split, simulated without servers."""

from __future__ import annotations

import random

from control_plane.quota_leases import BucketLedger, split
from keyplane.quota import LocalQuota

W = 6000


def test_split_is_proportional_and_exact() -> None:
    parts = split(10, {"a": 1.0, "b": 1.0, "c": 2.0})
    assert sum(parts.values()) == 10 and parts["c"] == 5
    assert split(7, {"a": 0.0, "b": 0.0}) == {"a": 0, "b": 0}
    assert split(100, {"a": 3.0, "b": 1.0}) == {"a": 75, "b": 25}


def simulate(limit: int, rates: dict[str, float], windows: int, seed: int = 1) -> list[int]:
    """Sidecars asking at ``rates`` per second (Poisson-ish), reports and
    rebalances once a second, leases delivered at once: admitted per window."""
    rng = random.Random(seed)
    ledger = BucketLedger(limit=limit, window_ms=W)
    start = 600_000
    for s in rates:
        ledger.connect(s, start)
    leases = ledger.rebalance(start)
    quotas = {s: LocalQuota(leases[s]) for s in rates}
    admitted: dict[int, int] = {}
    step = 10
    for now in range(start, start + windows * W, step):
        for s, rate in rates.items():
            asks = sum(1 for _ in range(3) if rng.random() < rate * step / 1000 / 3)
            for _ in range(asks):
                if quotas[s].take(now) == 0:
                    w = now - now % W
                    admitted[w] = admitted.get(w, 0) + 1
        if now % 1000 == 0:
            for s, q in quotas.items():
                ledger.report(s, *q.report(now), now_ms=now)
            for s, lease in ledger.rebalance(now).items():
                quotas[s].update(lease, now)
    return [admitted.get(w, 0) for w in sorted(admitted)]


def test_four_sidecars_at_three_times_the_limit_get_the_limit_per_window() -> None:
    limit = 120
    per_window = simulate(limit, dict.fromkeys("abcd", 3 * limit / 6 / 4), windows=10)
    print(f"simulated fleet admitted per window (limit {limit}): {per_window}")
    assert all(n <= limit for n in per_window), per_window
    assert all(n >= 0.95 * limit for n in per_window[1:]), per_window


def test_uneven_demand_still_holds_the_limit_and_feeds_the_busy_sidecar() -> None:
    limit = 300
    per_window = simulate(limit, {"busy": 120.0, "idle": 1.0, "mid": 20.0}, windows=8)
    assert all(n <= limit for n in per_window), per_window
    assert all(n >= 0.95 * limit for n in per_window[1:]), per_window


def test_under_the_limit_everything_is_admitted() -> None:
    per_window = simulate(600, {"a": 10.0, "b": 10.0}, windows=5)
    assert all(90 <= n <= 150 for n in per_window[1:]), per_window


def test_fallbacks_follow_demand_and_a_gone_sidecar_keeps_its_reservation() -> None:
    ledger = BucketLedger(limit=100, window_ms=W)
    ledger.connect("a", 0)
    ledger.connect("b", 0)
    ledger.report("a", 0, 0, 0, 0)
    ledger.report("b", 0, 0, 0, 0)
    ledger.report("a", 0, 0, 30, 1000)
    ledger.report("b", 0, 0, 10, 1000)
    leases = ledger.rebalance(1000)
    assert leases["a"].fallback + leases["b"].fallback == 100
    assert leases["a"].fallback > leases["b"].fallback
    fallback_b = leases["b"].fallback
    ledger.disconnect("b", 2000)
    leases = ledger.rebalance(7000)  # next window: b enforces its fallback alone
    assert set(leases) == {"a"}
    assert leases["a"].fallback == 100 - fallback_b
    assert ledger.holders["b"].granted == fallback_b
    assert leases["a"].granted + fallback_b <= 100
    ledger.rebalance(7000 + 200_000)
    assert "b" not in ledger.holders  # forgotten after forget_ms


def test_grants_never_pass_the_limit_even_when_demand_moves() -> None:
    ledger = BucketLedger(limit=50, window_ms=W)
    rng = random.Random(3)
    for s in "abcdef":
        ledger.connect(s, 0)
    for now in range(0, 60_000, 1000):
        for s in "abcdef":
            h = ledger.holders[s]
            ledger.report(s, now - now % W, min(h.granted, rng.randint(0, 30)), rng.randint(0, 40), now)
        ledger.rebalance(now)
        assert sum(h.granted for h in ledger.holders.values()) <= 50
        assert sum(h.next_granted for h in ledger.holders.values()) <= 50
