"""How the control plane splits one limit among the sidecars: pure lease
arithmetic (Envoy RLQS-style), no I/O, clock passed in (unix milliseconds).

Per window (aligned to multiples of ``window_ms`` since the epoch) each
sidecar holds a cumulative grant. Grants only grow within a window and their
sum never passes the limit, so the fleet never admits more than the limit in a
window, whatever the timing of reports. Every rebalance (about once a second)
tops each connected sidecar up to about ``horizon_ms`` of its recent demand
(never below ``floor``), splitting what is left in proportion to need when it
is short. Ahead of each window every connected sidecar gets a pre-grant for it
(its horizon's worth, capped by its share), which never shrinks once sent.

A sidecar's ``fallback`` is its share of the limit in proportion to its
recent demand (equal shares while nobody reported demand): what it enforces
per window when leases stop arriving (fail-static). A sidecar whose stream
ended keeps its fallback reserved in every window until ``forget_ms`` passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from keyplane.quota import Lease, window_bounds

__all__ = ["BucketLedger", "LeasePolicy", "split"]


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    # How much demand a top-up covers: two rebalances, so a sidecar does not
    # run dry before the next lease arrives.
    horizon_ms: int = 2000
    # The least headroom a connected sidecar gets: this fraction of the limit
    # shared by the connected sidecars (at least 1), so one whose demand is not
    # known yet can still serve while idle ones strand little.
    floor_fraction: float = 0.1
    # Weight of the newest demand sample in the moving average.
    demand_alpha: float = 0.5
    # A sidecar gone this long is forgotten (its fallback no longer reserved).
    forget_ms: int = 120_000


def split(amount: int, weights: dict[str, float]) -> dict[str, int]:
    """``amount`` split in proportion to ``weights`` (largest remainder); the
    parts sum to ``amount`` exactly when any weight is positive, else to 0."""
    total = sum(w for w in weights.values() if w > 0)
    if amount <= 0 or total <= 0:
        return dict.fromkeys(weights, 0)
    exact = {k: amount * max(0.0, w) / total for k, w in weights.items()}
    parts = {k: math.floor(v) for k, v in exact.items()}
    left = amount - sum(parts.values())
    for k in sorted(exact, key=lambda k: (parts[k] - exact[k], k))[:left]:
        parts[k] += 1
    return parts


@dataclass(slots=True)
class _Holder:
    connected: bool = True
    seen_ms: int = 0
    rate: float = 0.0  # demand per second, moving average
    last_report_ms: int | None = None
    used: int = 0  # in the ledger's window, as reported
    granted: int = 0  # in the ledger's window
    next_granted: int = 0  # for the window after
    fallback: int = 0


@dataclass(slots=True)
class BucketLedger:
    """One limit and its leases to every sidecar."""

    limit: int
    window_ms: int
    policy: LeasePolicy = field(default_factory=LeasePolicy)
    window_start_ms: int = -1
    holders: dict[str, _Holder] = field(default_factory=dict)
    exhausted: bool = False
    # Several replicas lease one limit: this one grants, per window, only what
    # it claimed in the store (``allowance``, ``next_allowance`` for the window
    # after; ``control_plane.quota_claims``), and its sidecars' fallbacks
    # split ``fallback_pool`` (its share of the fleet's demand) rather than
    # the whole limit. ``others_claimed``: what other replicas claimed.
    coordinated: bool = False
    allowance: int = 0
    next_allowance: int = 0
    fallback_pool: int | None = None
    others_claimed: int = 0
    others_used: int = 0  # used in this window through other replicas

    def connect(self, sidecar: str, now_ms: int) -> None:
        holder = self.holders.get(sidecar)
        if holder is None:
            self.holders[sidecar] = _Holder(seen_ms=now_ms)
        else:
            holder.connected, holder.seen_ms = True, now_ms

    def disconnect(self, sidecar: str, now_ms: int) -> None:
        holder = self.holders.get(sidecar)
        if holder is not None:
            holder.connected, holder.seen_ms = False, now_ms

    def report(self, sidecar: str, window_start_ms: int, used: int, demanded: int, now_ms: int) -> None:
        """One sidecar's usage report for this bucket."""
        self._roll(now_ms)
        holder = self.holders.get(sidecar)
        if holder is None:
            holder = self.holders[sidecar] = _Holder()
        holder.seen_ms = now_ms
        if window_start_ms == self.window_start_ms:
            holder.used = max(holder.used, used)
        if holder.last_report_ms is not None and now_ms > holder.last_report_ms:
            sample = demanded * 1000.0 / (now_ms - holder.last_report_ms)
            alpha = self.policy.demand_alpha
            holder.rate = alpha * sample + (1 - alpha) * holder.rate
        holder.last_report_ms = now_ms

    def used(self, now_ms: int) -> int:
        """What the fleet reported admitting in the current window."""
        self._roll(now_ms)
        return sum(h.used for h in self.holders.values())

    def _roll(self, now_ms: int) -> None:
        start, _ = window_bounds(now_ms, self.window_ms)
        if start == self.window_start_ms:
            return
        follows = self.window_start_ms >= 0 and start == window_bounds(self.window_start_ms, self.window_ms)[1]
        for holder in self.holders.values():
            if holder.connected:
                holder.granted = holder.next_granted if follows else 0
            else:
                holder.granted = holder.fallback  # it enforces its fallback on its own
            holder.next_granted = 0
            holder.used = 0
        self.allowance = self.next_allowance if follows else 0
        self.next_allowance = 0
        self.others_claimed = self.others_used = 0
        self.window_start_ms = start
        self.exhausted = False

    def _plan(self, now_ms: int) -> tuple[dict[str, _Holder], dict[str, float], dict[str, float], int]:
        """Forget long-gone sidecars, set fallbacks; (live holders, top-up
        needs this window, pre-grant wishes for the next, fallbacks reserved
        by gone sidecars)."""
        self._roll(now_ms)
        policy = self.policy
        gone = [s for s, h in self.holders.items() if not h.connected and now_ms - h.seen_ms > policy.forget_ms]
        for sidecar in gone:
            del self.holders[sidecar]
        holders = self.holders
        live = {s: h for s, h in holders.items() if h.connected}
        rates = {s: h.rate for s, h in live.items()}
        if sum(rates.values()) <= 0:
            rates = dict.fromkeys(live, 1.0)
        # Fallbacks: shares of the pool by demand among live sidecars; a gone
        # one keeps the fallback it was last sent.
        gone_reserved = sum(h.fallback for h in holders.values() if not h.connected)
        pool = self.limit if self.fallback_pool is None else min(self.limit, self.fallback_pool)
        for sidecar, share in split(max(0, pool - gone_reserved), rates).items():
            live[sidecar].fallback = share
        floor = max(1, math.ceil(self.limit * policy.floor_fraction / max(1, len(live))))

        def want(holder: _Holder) -> int:
            return max(floor, math.ceil(holder.rate * policy.horizon_ms / 1000.0))

        needs = {s: float(max(0, want(h) - max(0, h.granted - h.used))) for s, h in live.items()}
        wishes = {s: float(max(0, min(want(h), h.fallback) - h.next_granted)) for s, h in live.items()}
        return live, needs, wishes, gone_reserved

    def wants(self, now_ms: int) -> tuple[int, int]:
        """How much more allowance the next ``rebalance`` would hand out:
        (this window, the next), beyond what is allowed already. What a
        coordinated ledger claims in the store before rebalancing."""
        live, needs, wishes, gone_reserved = self._plan(now_ms)
        granted = sum(h.granted for h in self.holders.values())
        now = min(self.limit, granted + math.ceil(sum(needs.values()))) - self.allowance
        pre = sum(h.next_granted for h in live.values()) + gone_reserved + math.ceil(sum(wishes.values()))
        return max(0, now), max(0, min(self.limit, pre) - self.next_allowance)

    def rebalance(self, now_ms: int) -> dict[str, Lease]:
        """Top up and pre-grant; the lease of every connected sidecar."""
        live, needs, wishes, gone_reserved = self._plan(now_ms)
        holders = self.holders
        if not holders:
            return {}
        cap, next_cap = self.limit, self.limit
        if self.coordinated:
            cap, next_cap = min(cap, self.allowance), min(next_cap, self.next_allowance)
        # This window: top up towards each one's horizon of demand.
        remaining = max(0, cap - sum(h.granted for h in holders.values()))
        total_need = sum(needs.values())
        if total_need <= remaining:
            top_ups = {s: int(n) for s, n in needs.items()}
        else:
            top_ups = split(remaining, needs)
        for sidecar, extra in top_ups.items():
            live[sidecar].granted += extra
        left = remaining - sum(top_ups.values())
        # Exhausted: the limit itself is spent (not just this replica's claim).
        spent = sum(h.granted for h in holders.values()) + self.others_claimed >= self.limit
        self.exhausted = left <= 0 and total_need > 0 and spent
        # Next window: pre-grants, never lowered once sent.
        room = max(0, next_cap - gone_reserved - sum(h.next_granted for h in live.values()))
        if sum(wishes.values()) <= room:
            extra_next = {s: int(w) for s, w in wishes.items()}
        else:
            extra_next = split(room, wishes)
        for sidecar, extra in extra_next.items():
            live[sidecar].next_granted += extra
        return {
            sidecar: Lease(
                limit=self.limit,
                window_ms=self.window_ms,
                window_start_ms=self.window_start_ms,
                granted=h.granted,
                next_granted=h.next_granted,
                fallback=h.fallback,
                exhausted=self.exhausted,
            )
            for sidecar, h in live.items()
        }
