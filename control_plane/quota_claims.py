"""One limit leased by several control-plane replicas: each replica claims
its part of every limited bucket's window in the store and leases its own
sidecars out of that part only (hierarchical, like Envoy's RLQS behind a
global quota server).

Before each rebalance (about once a second) the broker asks every ledger what
more it would hand out, in this window and the next (``BucketLedger.wants``),
and claims that in one store transaction (``Store.claim_quota``). A claim is
made under a lock on the bucket's window and never pushes the claims of all
replicas past the limit, so the fleet admits at most the limit per window
whichever replica its sidecars talk to. The same write records what the
replica's sidecars used and their demand, which the other replicas read back:
the admin view's fleet-wide ``used``, and each replica's fair share of the
limit for its sidecars' fallbacks (what they enforce when leases stop).

Spend budgets (a day, a month) are windows like any other; the first claim of
a budget's window counts what the usage rollups already hold for it, so a
budget set mid-day or a store whose claims were swept does not start from
zero, and claims outlive control-plane restarts.

When the store does not answer, a replica grants nothing new for a few
seconds (a blip: its sidecars keep their leases); past that it grants up to
its last known share of the limit (fail-static, like the sidecars below it)
and claims what it granted once the store is back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.quota_leases import BucketLedger
from control_plane.store import Store
from control_plane.store.quota_records import QuotaClaim, QuotaClaimResult
from keyplane.quota import window_bounds
from keyplane.v1 import limits_pb2 as lpb

__all__ = ["ClaimKey", "QuotaClaims"]

log = logging.getLogger(__name__)

ClaimKey = tuple[str, str, int, int]  # tenant, client key id, QuotaKind, window start ms
_SPEND = frozenset({lpb.QUOTA_KIND_SPEND_DAY, lpb.QUOTA_KIND_SPEND_MONTH})


@dataclass(slots=True)
class _Written:
    at_ms: int
    used: int
    rate: float


class QuotaClaims:
    """The claims of one replica (``replica_id``) for the broker's ledgers."""

    def __init__(
        self,
        store: Store,
        replica_id: str,
        *,
        live_ms: int = 10_000,
        heartbeat_ms: int = 3_000,
        keep_ms: int = 3_600_000,
        sweep_interval_ms: int = 60_000,
        outage_grace_ms: int = 5_000,
    ) -> None:
        self._store = store
        self.replica_id = replica_id
        self._live_ms = live_ms  # another replica's demand counts while this fresh
        self._heartbeat_ms = heartbeat_ms  # a bucket's row is rewritten at least this often
        self._keep_ms = keep_ms  # claims of windows ended this long ago are swept
        self._sweep_interval_ms = sweep_interval_ms
        self._written: dict[ClaimKey, _Written] = {}
        self._next_sweep_ms = 0
        # A store failing this long is an outage (grant by share), not a blip.
        self._outage_grace_ms = outage_grace_ms
        self._failing_since_ms: int | None = None
        self.reachable = True
        self.claims_made = 0  # store transactions, for tests and metrics

    def claims_for(self, ledgers: Mapping[tuple[str, str, int], BucketLedger], now_ms: int) -> list[QuotaClaim]:
        """What to claim and record now: every bucket with sidecars whose
        ledger wants more, or whose used or demand changed, or whose row is
        due for a heartbeat; sorted by bucket (a lock order shared by every
        replica)."""
        claims: list[QuotaClaim] = []
        for (tenant, client_key_id, kind), ledger in sorted(ledgers.items()):
            if not ledger.holders:
                continue
            want_now, want_next = ledger.wants(now_ms)
            rate = sum(h.rate for h in ledger.holders.values() if h.connected)
            start, end = window_bounds(now_ms, ledger.window_ms)
            used = ledger.used(now_ms)
            seed = kind in _SPEND
            key: ClaimKey = (tenant, client_key_id, kind, start)
            if want_now > 0 or self._due(key, now_ms, used, rate):
                claims.append(
                    QuotaClaim(tenant, client_key_id, kind, start, end, ledger.limit, want_now, used, rate, seed)
                )
            if want_next > 0:
                next_end = window_bounds(end, ledger.window_ms)[1]
                claims.append(
                    QuotaClaim(tenant, client_key_id, kind, end, next_end, ledger.limit, want_next, 0, rate, seed)
                )
        return claims

    def _due(self, key: ClaimKey, now_ms: int, used: int, rate: float) -> bool:
        written = self._written.get(key)
        if written is None or now_ms - written.at_ms >= self._heartbeat_ms:
            return True
        return written.used != used or abs(written.rate - rate) > 0.05 * max(1.0, written.rate)

    async def claim(self, ledgers: Mapping[tuple[str, str, int], BucketLedger], now_ms: int) -> None:
        """Claim what the ledgers want and set their allowances; when the
        store fails, let each ledger grant up to its share (fail-static)."""
        if not ledgers:
            return  # nothing is limited: no store statement at all
        claims = self.claims_for(ledgers, now_ms)
        if claims:
            try:
                results = await self._store.claim_quota(self.replica_id, claims, now_ms, self._live_ms)
            except Exception as exc:
                if self._failing_since_ms is None:
                    self._failing_since_ms = now_ms
                if now_ms - self._failing_since_ms < self._outage_grace_ms:
                    # A blip: grant nothing new until the store answers (the
                    # sidecars keep their leases and pre-grants meanwhile).
                    log.info("could not claim quota in the store (%s); retrying", type(exc).__name__)
                    return
                if self.reachable:
                    log.warning(
                        "could not claim quota in the store for %.0f s (%s); granting up to this replica's last share",
                        (now_ms - self._failing_since_ms) / 1000,
                        type(exc).__name__,
                    )
                self.reachable = False
                for ledger in ledgers.values():
                    share = ledger.limit if ledger.fallback_pool is None else ledger.fallback_pool
                    ledger.allowance = max(ledger.allowance, share)
                    ledger.next_allowance = max(ledger.next_allowance, share)
                return
            self.claims_made += 1
            self._failing_since_ms = None
            if not self.reachable:
                log.info("quota claims reach the store again")
            self.reachable = True
            for claim, result in zip(claims, results, strict=True):
                self._apply(ledgers, claim, result, now_ms)
        await self._sweep(now_ms)

    def _apply(
        self,
        ledgers: Mapping[tuple[str, str, int], BucketLedger],
        claim: QuotaClaim,
        result: QuotaClaimResult,
        now_ms: int,
    ) -> None:
        ledger = ledgers.get((claim.tenant, claim.client_key_id, claim.kind))
        if ledger is None:
            return  # its limit went away meanwhile
        key: ClaimKey = (claim.tenant, claim.client_key_id, claim.kind, claim.window_start_ms)
        self._written[key] = _Written(now_ms, claim.used, claim.rate)
        if claim.window_start_ms == ledger.window_start_ms:
            # This replica's share of the limit by demand (read off the rows
            # of the current window, which every replica rewrites at least
            # every heartbeat): its sidecars' fallbacks.
            if result.fleet_rate > 0:
                share = math.ceil(ledger.limit * claim.rate / result.fleet_rate)
                ledger.fallback_pool = max(share, math.ceil(ledger.limit * ledger.policy.floor_fraction))
            ledger.allowance = max(ledger.allowance, result.claimed)
            ledger.others_claimed = result.fleet_claimed - result.claimed
            ledger.others_used = result.others_used
        elif claim.window_start_ms == window_bounds(ledger.window_start_ms, ledger.window_ms)[1]:
            ledger.next_allowance = max(ledger.next_allowance, result.claimed)

    async def _sweep(self, now_ms: int) -> None:
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + self._sweep_interval_ms
        self._written = {k: w for k, w in self._written.items() if now_ms - w.at_ms < self._keep_ms}
        try:
            await self._store.sweep_quota_claims(now_ms - self._keep_ms)
        except Exception as exc:
            log.warning("could not sweep old quota claims (%s)", type(exc).__name__)
