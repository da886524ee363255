"""The control plane's side of the limits: it holds one ``BucketLedger`` per
limited bucket, takes the sidecars' usage reports and, about once a second,
rebalances every ledger and hands each connected sidecar its leases
(``StreamQuota``, ``control_plane.quota_stream``).

Limits are read from the store at start, after every admin write through this
process (``reload``) and every ``reload_interval`` (writes made through
another replica). The lease arithmetic is ``control_plane.quota_leases``;
this module only routes reports and leases, and the price table: every
tenant's prices, sent to a sidecar with its leases when the part of the table
in its scope changed (``prices_included``; the sidecars charge spend budgets
and count cost with it). With ``claims`` (the server always passes them)
several replicas share each limit: every replica leases only what it claimed
in the store (``control_plane.quota_claims``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from control_plane.quota_claims import QuotaClaims
from control_plane.quota_leases import BucketLedger, LeasePolicy
from control_plane.store import Store
from control_plane.usage_records import price_to_proto
from keyplane import convert
from keyplane.limit_set import LimitSet
from keyplane.quota import MONTH, Lease, window_bounds
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import usage_pb2 as upb

__all__ = ["BucketKey", "QuotaBroker", "QuotaSubscriber", "bucket_limits"]

log = logging.getLogger(__name__)

BucketKey = tuple[str, str, int]  # tenant, client key id ('' tenant-wide), QuotaKind
DAY_MS = 86_400_000
_SPEND = (lpb.QUOTA_KIND_SPEND_DAY, lpb.QUOTA_KIND_SPEND_MONTH)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def bucket_limits(limits: LimitSet, window_ms: int) -> dict[BucketKey, tuple[int, int]]:
    """The enforced buckets of one ``LimitSet``: key -> (limit per window, window ms).
    Per-minute limits count in windows of ``window_ms`` (60 s unless scaled down
    for tests), the limit scaled to the window (rounded up)."""
    out: dict[BucketKey, tuple[int, int]] = {}
    for per_minute, kind in (
        (limits.requests_per_minute, lpb.QUOTA_KIND_REQUESTS),
        (limits.tokens_per_minute, lpb.QUOTA_KIND_TOKENS),
    ):
        if per_minute:
            per_window = max(1, math.ceil(per_minute * window_ms / 60_000))
            out[(limits.tenant, limits.client_key_id, kind)] = (per_window, window_ms)
    # Budgets: micro-dollars per UTC day and per calendar month (never scaled).
    if limits.daily_budget_micros:
        out[(limits.tenant, limits.client_key_id, lpb.QUOTA_KIND_SPEND_DAY)] = (limits.daily_budget_micros, DAY_MS)
    if limits.monthly_budget_micros:
        out[(limits.tenant, limits.client_key_id, lpb.QUOTA_KIND_SPEND_MONTH)] = (limits.monthly_budget_micros, MONTH)
    return out


@dataclass(eq=False, slots=True)
class QuotaSubscriber:
    """One sidecar's StreamQuota call: it gets the latest leases (coalesced)."""

    sidecar_id: str
    tenants: frozenset[str] | None
    # It keeps the prices it holds when a response has none (StreamQuotaRequest.prices_on_change).
    prices_on_change: bool = False
    pending: lpb.StreamQuotaResponse | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # The price table version last looked at, and the prices last sent (None: none yet).
    prices_version: int = -1
    prices_sent: list[upb.Price] | None = None

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def offer(self, response: lpb.StreamQuotaResponse) -> None:
        pending = self.pending
        if pending is not None and pending.prices_included and not response.prices_included:
            response.prices.extend(pending.prices)  # never skip a price table
            response.prices_included = True
        self.pending = response  # a slow stream skips to the newest set
        self.ready.set()

    async def next(self) -> lpb.StreamQuotaResponse:
        await self.ready.wait()
        self.ready.clear()
        response, self.pending = self.pending, None
        return response or lpb.StreamQuotaResponse(complete=True)


class QuotaBroker:
    def __init__(
        self,
        store: Store,
        *,
        window_ms: int = 60_000,
        rebalance_interval: float = 1.0,
        reload_interval: float = 1.0,
        policy: LeasePolicy | None = None,
        clock_ms: Callable[[], int] = _now_ms,
        claims: QuotaClaims | None = None,
    ) -> None:
        self._store = store
        self._claims = claims
        self.window_ms = window_ms
        self._rebalance_interval = rebalance_interval
        self._reload_interval = reload_interval
        self._policy = policy or LeasePolicy(horizon_ms=max(500, round(2000 * rebalance_interval)))
        self._clock_ms = clock_ms
        self._ledgers: dict[BucketKey, BucketLedger] = {}
        # Every tenant's prices (the sidecars charge spend and count cost), the
        # tenants with a budget, and a version bumped when the prices change.
        self._prices: dict[str, list[upb.Price]] = {}
        self._budgeted: frozenset[str] = frozenset()
        self._prices_version = 0
        self._subscribers: set[QuotaSubscriber] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._run(), name="keyplane-quota-broker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> None:
        """Read every limit from the store; a failure keeps the limits held."""
        try:
            limit_sets = await self._store.list_limits()
            listed = await self._store.list_prices(None)
        except Exception as exc:
            log.warning("could not read limits from the store (%s); keeping the ones held", type(exc).__name__)
            return
        self.set_limits(limit_sets)
        self._budgeted = frozenset(x.tenant for x in limit_sets if x.daily_budget_micros or x.monthly_budget_micros)
        prices: dict[str, list[upb.Price]] = {}
        for p in sorted(listed, key=lambda p: (p.tenant, convert.provider_to_proto(p.provider), p.model)):
            prices.setdefault(p.tenant, []).append(price_to_proto(p))
        if prices != self._prices:
            self._prices = prices
            self._prices_version += 1

    def set_limits(self, limit_sets: Iterable[LimitSet]) -> None:
        wanted: dict[BucketKey, tuple[int, int]] = {}
        for limits in limit_sets:
            wanted.update(bucket_limits(limits, self.window_ms))
        for key in [k for k in self._ledgers if k not in wanted]:
            del self._ledgers[key]
        for key, (limit, window_ms) in wanted.items():
            ledger = self._ledgers.get(key)
            if ledger is None or ledger.window_ms != window_ms:
                self._ledgers[key] = BucketLedger(
                    limit=limit, window_ms=window_ms, policy=self._policy, coordinated=self._claims is not None
                )
            else:
                ledger.limit = limit

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_reload = loop.time() + self._reload_interval
        while True:
            await asyncio.sleep(self._rebalance_interval)
            if loop.time() >= next_reload:
                next_reload = loop.time() + self._reload_interval
                await self.reload()
            try:
                if self._claims is not None:
                    await self._claims.claim(self._ledgers, self._clock_ms())
                self.rebalance()
            except Exception:
                log.exception("rebalancing the quota leases failed")

    # streams -----------------------------------------------------------------

    def subscribe(
        self, sidecar_id: str, tenants: frozenset[str] | None, *, prices_on_change: bool = False
    ) -> QuotaSubscriber:
        subscriber = QuotaSubscriber(sidecar_id, tenants, prices_on_change)
        self._subscribers.add(subscriber)
        now = self._clock_ms()
        for (tenant, _, _), ledger in self._ledgers.items():
            if subscriber.allows(tenant):
                ledger.connect(sidecar_id, now)
        return subscriber

    def unsubscribe(self, subscriber: QuotaSubscriber) -> None:
        self._subscribers.discard(subscriber)
        if any(s.sidecar_id == subscriber.sidecar_id for s in self._subscribers):
            return  # its newer stream took over
        now = self._clock_ms()
        for ledger in self._ledgers.values():
            ledger.disconnect(subscriber.sidecar_id, now)

    def report(self, subscriber: QuotaSubscriber, usage: Iterable[lpb.QuotaUsage]) -> int:
        """Fold one report; returns how many entries were refused (unknown
        bucket or out of the sidecar's scope)."""
        now = self._clock_ms()
        refused = 0
        for item in usage:
            b = item.bucket
            ledger = self._ledgers.get((b.tenant, b.client_key_id, b.kind))
            if ledger is None or not subscriber.allows(b.tenant):
                refused += 1
                continue
            ledger.report(subscriber.sidecar_id, item.window_start_ms, item.used, item.demanded, now)
        return refused

    def rebalance(self) -> None:
        """Rebalance every ledger and offer each subscriber its leases."""
        now = self._clock_ms()
        per_sidecar: dict[str, list[lpb.QuotaLease]] = {s.sidecar_id: [] for s in self._subscribers}
        scopes = {s.sidecar_id: s for s in self._subscribers}
        for (tenant, client_key_id, kind), ledger in self._ledgers.items():
            for sidecar_id, subscriber in scopes.items():
                if subscriber.allows(tenant) and sidecar_id not in ledger.holders:
                    ledger.connect(sidecar_id, now)
            bucket = lpb.QuotaBucket(tenant=tenant, client_key_id=client_key_id, kind=kind)  # type: ignore[arg-type]
            for sidecar_id, lease in ledger.rebalance(now).items():
                leases = per_sidecar.get(sidecar_id)
                if leases is not None:
                    leases.append(_lease_proto(bucket, lease))
        for subscriber in self._subscribers:
            response = lpb.StreamQuotaResponse(leases=per_sidecar[subscriber.sidecar_id], complete=True)
            self._add_prices(subscriber, response)
            subscriber.offer(response)

    def _add_prices(self, subscriber: QuotaSubscriber, response: lpb.StreamQuotaResponse) -> None:
        """The price table in the subscriber's scope when it differs from the one
        it was sent last (or, to a sidecar that does not keep prices, the budgeted
        tenants' prices in every response)."""
        if not subscriber.prices_on_change:
            budgeted = (t for t in sorted(self._budgeted) if subscriber.allows(t))
            response.prices.extend(p for t in budgeted for p in self._prices.get(t, ()))
            return
        if subscriber.prices_version == self._prices_version:
            return  # no price changed since it was last looked at
        subscriber.prices_version = self._prices_version
        scoped = [p for tenant, listed in self._prices.items() if subscriber.allows(tenant) for p in listed]
        if scoped == subscriber.prices_sent:
            return  # a change out of its scope
        subscriber.prices_sent = scoped
        response.prices.extend(scoped)
        response.prices_included = True

    # admin view --------------------------------------------------------------

    async def usage(self, limits: LimitSet) -> list[lpb.LimitUsage]:
        """Each enforced limit of ``limits`` with what the fleet used of it in
        the current window (as reported, about a second old): this replica's
        sidecars, and with several replicas what the store recorded of all
        (a replica none of the bucket's sidecars talk to still answers)."""
        now = self._clock_ms()
        buckets = bucket_limits(limits, self.window_ms)
        recorded: dict[tuple[str, str, int, int], int] = {}
        if self._claims is not None:
            windows = [(*key, window_bounds(now, window_ms)[0]) for key, (_, window_ms) in buckets.items()]
            try:
                recorded = await self._store.quota_used(windows)
            except Exception as exc:
                log.warning("could not read the fleet's quota use (%s); showing this replica's", type(exc).__name__)
        out = []
        for key, (limit, window_ms) in buckets.items():
            ledger = self._ledgers.get(key)
            start_ms, end_ms = window_bounds(now, window_ms)
            used = ledger.used(now) + ledger.others_used if ledger is not None else 0
            used = max(used, recorded.get((*key, start_ms), 0))
            item = lpb.LimitUsage(
                kind=key[2],  # type: ignore[arg-type]
                limit=limit,
                used=used,
                remaining=max(0, limit - used),
                window_seconds=max(1, (end_ms - start_ms) // 1000),
            )
            item.window_start.FromMilliseconds(start_ms)
            out.append(item)
        return out


def _lease_proto(bucket: lpb.QuotaBucket, lease: Lease) -> lpb.QuotaLease:
    return lpb.QuotaLease(
        bucket=bucket,
        limit=lease.limit,
        window_ms=lease.window_ms,
        window_start_ms=lease.window_start_ms,
        granted=lease.granted,
        next_granted=lease.next_granted,
        fallback=lease.fallback,
        exhausted=lease.exhausted,
    )
