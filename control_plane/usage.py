"""Usage folded into per-minute rollups, costed, and written in batches.

Every valid outcome of a sidecar report (``control_plane.sidecar_service``)
goes through ``UsageFolder.fold``: a dictionary update per outcome, keyed by
(minute, tenant, client key, public model, provider key, upstream model); no
I/O. Each outcome is one upstream attempt (``attempts``); only an outcome not
``superseded`` (the app request's last attempt) counts a request, failed when
that attempt failed, so a request that failed over to another key is one
request (in the row of the key that answered it) and two attempts. Outcomes of
sidecars that do not set ``superseded`` count as requests each, as before.

``UsageRecorder`` flushes what was folded every ``flush_interval``: one
additive upsert per rollup row per flush (``Store.put_usage``), never one
write per request. A flush that fails keeps its rows and adds them to the
next one (bounded: past ``max_pending_rows`` the oldest minutes are dropped,
counted and logged).

Cost is computed here, at flush time, in integer micro-dollars from the
tenant's price table (``Price``: micro-dollars per million tokens; cached
input at its own price, cache writes at the input price), by
``keyplane.pricing.cost_picos``, the formula the sidecars' cost counter uses. The sub-micro-dollar
remainder of each row is carried to the row's next flush while its minute is
recent, so many tiny requests add up exactly. Rows whose (provider, model) has
no price count their requests as ``unpriced_requests``. Prices are re-read from
the store every ``price_refresh`` seconds (another replica may have set one)
and at once after a local change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from control_plane.usage_records import DIMENSIONS, Price, UsageQuery, UsageRow, UsageTotals
from keyplane import convert
from keyplane.domain import Provider
from keyplane.pricing import PICOS_PER_MICRO, cost_picos
from keyplane.v1 import sidecar_service_pb2

if TYPE_CHECKING:
    from control_plane.store.base import Store

__all__ = [
    "DIMENSIONS",
    "Price",
    "RollupKey",
    "UsageFolder",
    "UsageQuery",
    "UsageRecorder",
    "UsageRow",
    "UsageTotals",
    "cost_picos",
]

log = logging.getLogger(__name__)

_SUCCESS = sidecar_service_pb2.OUTCOME_CLASS_SUCCESS
# Rollup rows: (minute epoch seconds, tenant, client key id, public model, provider key id, upstream model).
RollupKey = tuple[int, str, str, str, str, str]
# Indexes into a pending row's counters.
_REQ, _FAILED, _EST, _METERED, _IN, _CACHED, _WRITE, _OUT, _REASON, _ATT = range(10)
# Rows whose remainder is kept: minutes newer than this many seconds.
_CARRY_WINDOW = 180


class UsageFolder:
    """The rollups folded since the last ``take``; pure, no I/O, no clock but the one given."""

    __slots__ = ("_clock", "_pending", "_providers", "folded")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[RollupKey, list[int]] = {}
        self._providers: dict[RollupKey, int] = {}
        self.folded = 0

    def fold(self, outcomes: Iterable[sidecar_service_pb2.Outcome]) -> None:
        """Add validated outcomes to their rollup rows (one dict update each)."""
        pending = self._pending
        now_minute = int(self._clock()) // 60 * 60
        count = 0
        for o in outcomes:
            count += 1
            seconds = o.time.seconds
            minute = seconds - seconds % 60 if 0 < seconds <= now_minute + 60 else now_minute
            key = (minute, o.tenant, o.client_key_id, o.public_model, o.key_id, o.model)
            row = pending.get(key)
            if row is None:
                row = pending[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                self._providers[key] = o.provider
            row[_ATT] += 1
            if not o.superseded:  # the request's last attempt: the request counts here
                row[_REQ] += 1
                if o.outcome_class != _SUCCESS:
                    row[_FAILED] += 1
            if o.HasField("usage"):
                u = o.usage
                row[_METERED] += 1
                if u.estimated:
                    row[_EST] += 1
                row[_IN] += u.input_tokens
                row[_CACHED] += u.cached_input_tokens
                row[_WRITE] += u.cache_write_input_tokens
                row[_OUT] += u.output_tokens
                row[_REASON] += u.reasoning_tokens
        self.folded += count

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> tuple[dict[RollupKey, list[int]], dict[RollupKey, int]]:
        """The rows folded so far (and their providers, as proto values); starts afresh."""
        taken, providers = self._pending, self._providers
        self._pending, self._providers = {}, {}
        return taken, providers


class UsageRecorder:
    """Turns folded rows into costed ``UsageRow`` writes, one batch per flush."""

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 1.0,
        price_refresh: float = 10.0,
        retention_days: float = 90.0,
        max_pending_rows: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.folder = UsageFolder(clock)
        self._store = store
        self._flush_interval = flush_interval
        self._price_refresh = price_refresh
        self._retention = retention_days * 86400.0
        self._max_pending = max_pending_rows
        self._clock = clock
        # (tenant, provider value, model) -> price
        self._prices: dict[tuple[str, int, str], Price] = {}
        self._prices_at = float("-inf")
        # Picos below one micro-dollar not yet written, per recent row.
        self._carry: dict[RollupKey, int] = {}
        # Rows a failed flush kept, added to the next.
        self._unwritten: dict[RollupKey, tuple[int, list[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.dropped_rows = 0
        self.flushes = 0
        self.rows_written = 0

    # --- prices -------------------------------------------------------------------------

    def prices_changed(self) -> None:
        """Re-read the price table before the next flush."""
        self._prices_at = float("-inf")

    async def _refresh_prices(self) -> None:
        now = self._clock()
        if now - self._prices_at < self._price_refresh:
            return
        prices = await self._store.list_prices(None)
        self._prices = {(p.tenant, _provider_number(p.provider), p.model): p for p in prices}
        self._prices_at = now

    # --- flushing -----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()  # a last try

    async def _run(self) -> None:
        last_sweep = 0.0
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
                now = self._clock()
                if self._retention > 0 and now - last_sweep >= 3600:
                    last_sweep = now
                    swept = await self._store.sweep_usage(int(now - self._retention) // 60 * 60)
                    if swept:
                        log.info(
                            "usage retention: %d rollup rows older than %g days deleted", swept, self._retention / 86400
                        )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("usage flush failed (kept for the next one): %s", exc)

    async def flush(self) -> int:
        """Write what was folded (and what a failed flush kept); the rows written."""
        async with self._lock:
            taken, providers = self.folder.take()
            for key, row in taken.items():
                kept = self._unwritten.get(key)
                if kept is None:
                    self._unwritten[key] = (providers[key], row)
                else:
                    _add(kept[1], row)
            if not self._unwritten:
                return 0
            self._bound()
            try:
                await self._refresh_prices()
            except Exception as exc:  # costs with the prices held; unpriced if none
                log.warning("could not re-read prices: %s", exc)
            rows, carry = self._cost(self._unwritten)
            await self._store.put_usage(rows)
            # Only once written: a failed write is costed again, from the same remainders.
            self._carry.update(carry)
            for key in self._unwritten:
                if key not in carry:
                    self._carry.pop(key, None)
            self._unwritten = {}
            self.flushes += 1
            self.rows_written += len(rows)
            self._forget_old_carry()
            return len(rows)

    def _bound(self) -> None:
        excess = len(self._unwritten) - self._max_pending
        if excess <= 0:
            return
        for key in sorted(self._unwritten)[:excess]:
            del self._unwritten[key]
        self.dropped_rows += excess
        log.warning("usage: %d rollup rows dropped (the store has been unwritable for long)", excess)

    def _cost(self, pending: Mapping[RollupKey, tuple[int, list[int]]]) -> tuple[list[UsageRow], dict[RollupKey, int]]:
        """The rows to write and the new sub-micro-dollar remainders."""
        rows: list[UsageRow] = []
        carry: dict[RollupKey, int] = {}
        for key, (provider_number, c) in pending.items():
            minute, tenant, client_key_id, public_model, key_id, model = key
            provider = _provider_from_number(provider_number)
            price = self._prices.get((tenant, provider_number, model))
            micros = unpriced = 0
            if price is None:
                if c[_METERED] and (c[_IN] or c[_OUT]):
                    unpriced = c[_METERED]
            else:
                picos = cost_picos(price, c[_IN], c[_CACHED], c[_OUT]) + self._carry.get(key, 0)
                micros, rest = divmod(picos, PICOS_PER_MICRO)
                if rest:
                    carry[key] = rest
            totals = UsageTotals(
                requests=c[_REQ],
                failed_requests=c[_FAILED],
                estimated_requests=c[_EST],
                input_tokens=c[_IN],
                cached_input_tokens=c[_CACHED],
                cache_write_input_tokens=c[_WRITE],
                output_tokens=c[_OUT],
                reasoning_tokens=c[_REASON],
                cost_micros=micros,
                unpriced_requests=unpriced,
                attempts=c[_ATT],
            )
            rows.append(UsageRow(minute, tenant, client_key_id, public_model, key_id, provider, model, totals))
        return rows, carry

    def _forget_old_carry(self) -> None:
        if len(self._carry) < 1024:
            return
        horizon = int(self._clock()) - _CARRY_WINDOW
        self._carry = {k: v for k, v in self._carry.items() if k[0] >= horizon}


def _add(into: list[int], row: Sequence[int]) -> None:
    for i, value in enumerate(row):
        into[i] += value


def _provider_number(provider: Provider) -> int:
    return int(convert.provider_to_proto(provider))


def _provider_from_number(number: int) -> Provider:
    # Outcomes were validated: their provider is known.
    found = convert.provider_from_proto(number)
    return found if found is not None else Provider.OPENAI_COMPATIBLE


def minute_of(moment: datetime) -> int:
    """The epoch second its minute starts at."""
    seconds = int(moment.astimezone(UTC).timestamp())
    return seconds - seconds % 60
