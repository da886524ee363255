"""Folds the outcome reports of every sidecar into per-tenant health books and
turns their transitions into store writes that the hub publishes.

The fold is pure and synchronous (``keyplane.health.HealthBook.record``, one
book per tenant): a report costs a dictionary lookup and a few comparisons
per outcome, and touches the store only when some scope actually changes
state. Transitions wait in ``_dirty`` (the newest verdict per scope wins)
until ``flush`` writes them with ``put_key_health`` / ``put_provider_health``
and calls ``hub.catch_up()``, which publishes them to every sidecar of the
tenant over Watch. A flush that fails (store down) keeps them and a
background task retries, so memory stays authoritative meanwhile.

The aggregator also follows the hub (``SnapshotHub.add_listener``): a deleted
key or tenant leaves the books, and health written by someone else (another
replica, an admin reset there) is adopted with ``HealthBook.apply``. Our own
writes are recognised by the versions the store returned for them; changes
that arrive while a flush is between a write and learning its version wait
in ``_inbox`` until the flush is done.

At start the books adopt the non-healthy entries the hub loaded from the
store, so cooldowns and credential failures survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from control_plane.hub import SnapshotHub
from control_plane.store.base import AuditEntry, Store
from keyplane import convert
from keyplane.domain import ChangeRecord, HealthState, KeyHealth
from keyplane.errors import NotFound
from keyplane.health.classify import counts_against_key
from keyplane.health.machine import HealthBook, HealthChange, HealthPolicy, KeyScope, Outcome, ProviderScope, Verdict
from keyplane.timefmt import until_text
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["AggregatorStats", "HealthAggregator", "ReportedOutcome"]

log = logging.getLogger(__name__)

Scope = KeyScope | ProviderScope
_MAX_OWN_VERSIONS = 100_000


@dataclass(frozen=True, slots=True)
class ReportedOutcome:
    """One outcome of a sidecar report, with the tenant it belongs to."""

    tenant: str
    outcome: Outcome


@dataclass(slots=True)
class AggregatorStats:
    """Counters since start (for logs, metrics and tests)."""

    accepted: int = 0
    # Rejected by the sidecar service before reaching the books.
    invalid: int = 0
    out_of_scope: int = 0
    # Unknown tenant or key, or a provider that is not the key's.
    unknown: int = 0
    # Outcomes the sidecars said they dropped before reporting.
    dropped_by_sidecars: int = 0
    transitions: int = 0
    persisted: int = 0
    persist_failures: int = 0
    evicted: int = 0


class HealthAggregator:
    def __init__(
        self,
        store: Store,
        hub: SnapshotHub,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.time,
        *,
        sweep_interval: float = 60.0,
        retry_interval: float = 2.0,
    ) -> None:
        if sweep_interval <= 0 or retry_interval <= 0:
            raise ValueError("sweep_interval and retry_interval must be positive")
        self._store = store
        self._hub = hub
        self._policy = policy if policy is not None else HealthPolicy()
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._retry_interval = retry_interval
        self._books: dict[str, HealthBook] = {}
        self._dirty: dict[tuple[str, Scope], HealthChange] = {}
        self._flush_lock = asyncio.Lock()
        self._own_versions: set[int] = set()
        self._inbox: deque[tuple[int, sidecar_service_pb2.Change]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.stats = AggregatorStats()

    # lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Adopt the health the hub loaded from the store, follow the hub and
        start the retry/sweep task. Call after ``hub.start()``."""
        # No await between these: nothing published can fall in between.
        self._hub.cache.add_listener(self._on_change)
        loaded = 0
        for tenant in self._hub.cache.tenant_names():
            health = self._hub.cache.health(tenant)
            if health is None:
                continue
            messages: list[resources_pb2.KeyHealth | resources_pb2.ProviderHealth] = [*health[0], *health[1]]
            for message in messages:
                change = _change_from_proto(message)
                if change is not None:
                    self._book(tenant).apply(change)
                    loaded += 1
        self._task = asyncio.create_task(self._background(), name="health-aggregator")
        log.info("health aggregator adopted %d stored health entries", loaded)

    async def close(self) -> None:
        """Stop the background task and try one last flush."""
        self._hub.cache.remove_listener(self._on_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._dirty:
            await self.flush(publish=False)
        if self._dirty:
            log.warning("health aggregator stopped with %d health change(s) not persisted", len(self._dirty))

    # the fold --------------------------------------------------------------------
    def _book(self, tenant: str) -> HealthBook:
        book = self._books.get(tenant)
        if book is None:
            book = self._books[tenant] = HealthBook(self._policy)
        return book

    def fold(
        self, outcomes: Sequence[ReportedOutcome], messages: Sequence[sidecar_service_pb2.Outcome] | None = None
    ) -> int:
        """Record ``outcomes`` in the books (no I/O); returns how many were
        accepted. Transitions wait for ``flush``. ``messages``, parallel to
        ``outcomes``: the reports they came from, for the time each attempt
        began (read only when the tenant's book holds anything it could
        matter to)."""
        now = self._clock()
        accepted = 0
        # Per tenant in this batch: does its book hold anything a start time matters
        # to? Asked once, and set again by a transition (which adds what it matters to).
        holds: dict[str, bool] = {}
        for index, item in enumerate(outcomes):
            outcome = item.outcome
            tenant = item.tenant
            if self._hub.cache.key_provider(tenant, outcome.key_id) is not outcome.provider:
                self.stats.unknown += 1
                continue
            accepted += 1
            if messages is not None and not counts_against_key(
                outcome.classification.error_class, on_node=bool(messages[index].node_id)
            ):
                continue  # a node's own failure: folded into the node's health (control_plane.node_health)
            book = self._book(tenant)
            started: float | None = None
            if messages is not None:
                held = holds.get(tenant)
                if held is None:
                    held = holds[tenant] = len(book) > 0
                if held:
                    stamp = messages[index].time
                    started = (stamp.seconds + stamp.nanos * 1e-9) or None
            changes = book.record(outcome, now, started=started)
            if changes:
                holds[tenant] = True
                for change in changes:
                    self._dirty[(tenant, change.scope)] = change
                    self.stats.transitions += 1
                    _log_transition(tenant, change, now)
        self.stats.accepted += accepted
        return accepted

    async def ingest(
        self, outcomes: Sequence[ReportedOutcome], messages: Sequence[sidecar_service_pb2.Outcome] | None = None
    ) -> int:
        """Fold ``outcomes``, then persist and publish the transitions they
        caused, so they reach the sidecars before this returns. Never raises
        for store trouble (the transitions are kept and retried later)."""
        transitions = self.stats.transitions
        accepted = self.fold(outcomes, messages)
        if self.stats.transitions != transitions:
            # Only for new transitions: older unpersisted ones are the retry
            # task's business, so a store outage does not stall every report.
            await self.flush()
        return accepted

    def note_rejected(self, *, invalid: int = 0, out_of_scope: int = 0, dropped_by_sidecar: int = 0) -> None:
        self.stats.invalid += invalid
        self.stats.out_of_scope += out_of_scope
        self.stats.dropped_by_sidecars += dropped_by_sidecar

    def verdicts(self, tenant: str) -> list[HealthChange]:
        """What this replica's book thinks is not healthy now (for tests and debugging)."""
        book = self._books.get(tenant)
        return book.unhealthy(self._clock()) if book is not None else []

    @property
    def pending(self) -> int:
        """Transitions not yet persisted."""
        return len(self._dirty)

    # persisting ------------------------------------------------------------------
    async def flush(self, *, publish: bool = True) -> None:
        """Write the pending transitions (stopping at the first store failure),
        then publish them. Concurrent callers coalesce."""
        async with self._flush_lock:
            wrote = False
            now = self._clock()
            for slot, change in list(self._dirty.items()):
                tenant = slot[0]
                try:
                    version = await self._persist(tenant, change, now)
                except NotFound:
                    # The key or tenant is gone; its health went with it.
                    self._forget_dirty(slot, change)
                    continue
                except Exception as exc:
                    self.stats.persist_failures += 1
                    log.warning(
                        "could not persist %d health change(s), will retry: %s",
                        len(self._dirty),
                        type(exc).__name__,
                    )
                    break
                self._forget_dirty(slot, change)
                self.stats.persisted += 1
                if version is not None:
                    self._remember_own(version)
                    wrote = True
            if wrote and publish:
                try:
                    await self._hub.catch_up()
                except Exception as exc:
                    log.warning("health persisted but not yet published to sidecars: %s", type(exc).__name__)
            self._drain_inbox()

    def _forget_dirty(self, slot: tuple[str, Scope], change: HealthChange) -> None:
        # Only if no newer transition replaced it during the write.
        if self._dirty.get(slot) is change:
            del self._dirty[slot]

    def _remember_own(self, version: int) -> None:
        if len(self._own_versions) >= _MAX_OWN_VERSIONS:
            self._own_versions.clear()
        self._own_versions.add(version)

    async def _persist(self, tenant: str, change: HealthChange, now: float) -> int | None:
        record = convert.health_record(tenant, change, updated_at=convert.datetime_from_epoch(now))
        if isinstance(record, KeyHealth):
            return await self._store.put_key_health(record)
        return await self._store.put_provider_health(record)

    async def reset_key(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> None:
        """Clear every learnt entry of one key: in the store (publishing
        HEALTHY for each, and always one for the key-wide scope, so that
        every sidecar drops its own findings about the key even when the
        store held nothing), in the book and in the pending transitions.
        ``audit`` (an admin reset) is recorded with the store write. Raises
        what the store raises."""
        async with self._flush_lock:
            try:
                for version in await self._store.clear_key_health(tenant, key_id, audit=audit):
                    self._remember_own(version)
                book = self._books.get(tenant)
                if book is not None:
                    book.reset_key(key_id)
                self._drop_dirty_key(tenant, key_id)
                try:
                    await self._hub.catch_up()
                except Exception as exc:
                    log.warning("health reset but not yet published to sidecars: %s", type(exc).__name__)
            finally:
                self._drain_inbox()

    def _drop_dirty_key(self, tenant: str, key_id: str) -> None:
        for slot in [s for s in self._dirty if s[0] == tenant and isinstance(s[1], KeyScope) and s[1].key_id == key_id]:
            del self._dirty[slot]

    # following the hub -----------------------------------------------------------
    def _on_change(self, record: ChangeRecord, change: sidecar_service_pb2.Change) -> None:
        self._inbox.append((record.version, change))
        if not self._flush_lock.locked():
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        while self._inbox:
            version, change = self._inbox.popleft()
            if version in self._own_versions:
                self._own_versions.discard(version)
                continue
            tenant = change.tenant
            which = change.WhichOneof("change")
            if which == "tenant_deleted":
                self._books.pop(tenant, None)
                for slot in [s for s in self._dirty if s[0] == tenant]:
                    del self._dirty[slot]
            elif which == "key_deleted":
                book = self._books.get(tenant)
                if book is not None:
                    book.forget_key(change.key_deleted)
                self._drop_dirty_key(tenant, change.key_deleted)
            elif which in ("key_health", "provider_health"):
                # Learnt elsewhere (another replica, or a reset through it).
                message = change.key_health if which == "key_health" else change.provider_health
                health_change = _change_from_proto(message)
                if health_change is None or not self._hub.cache.has_tenant(tenant):
                    continue
                if _is_key_reset(health_change):
                    # Only a reset makes a key-wide entry HEALTHY: forget the whole key,
                    # as the sidecars do.
                    book = self._books.get(tenant)
                    if book is not None:
                        book.reset_key(change.key_health.key_id)
                    self._drop_dirty_key(tenant, change.key_health.key_id)
                else:
                    self._book(tenant).apply(health_change)

    # background ------------------------------------------------------------------
    async def _background(self) -> None:
        next_sweep = time.monotonic() + self._sweep_interval
        while True:
            await asyncio.sleep(min(self._retry_interval, max(0.0, next_sweep - time.monotonic())))
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_interval
                    self.sweep()
                if self._dirty:
                    await self.flush()
            except Exception:
                log.exception("health aggregator background pass failed")

    def sweep(self) -> int:
        """Bound memory: evict idle healthy entries from every book, drop the
        books of deleted tenants, and queue HEALTHY for stored cooldowns that
        ran out long ago (so the store and snapshots do not keep them
        forever). Returns how many book entries were evicted."""
        now = self._clock()
        evicted = 0
        for tenant in list(self._books):
            if not self._hub.cache.has_tenant(tenant):
                del self._books[tenant]
                continue
            evicted += self._books[tenant].evict(now)
        self.stats.evicted += evicted
        stale_before = now - self._policy.idle_ttl
        for tenant in self._hub.cache.tenant_names():
            health = self._hub.cache.health(tenant)
            if health is None:
                continue
            messages: list[resources_pb2.KeyHealth | resources_pb2.ProviderHealth] = [*health[0], *health[1]]
            for message in messages:
                if not message.HasField("until") or message.until.ToSeconds() > stale_before:
                    continue
                change = _change_from_proto(message)
                if change is None:
                    continue
                book = self._books.get(tenant)
                if book is not None and book.verdict(change.scope, now).state is not HealthState.HEALTHY:
                    continue
                slot = (tenant, change.scope)
                if slot not in self._dirty:
                    self._dirty[slot] = HealthChange(change.scope, Verdict(HealthState.HEALTHY, None, "expired"))
        if evicted:
            log.debug("health aggregator evicted %d idle entries", evicted)
        return evicted


def _change_from_proto(message: resources_pb2.KeyHealth | resources_pb2.ProviderHealth) -> HealthChange | None:
    try:
        return convert.health_change_from_proto(message)
    except ValueError:
        return None


def _is_key_reset(change: HealthChange) -> bool:
    scope = change.scope
    return isinstance(scope, KeyScope) and not scope.model and change.verdict.state is HealthState.HEALTHY


def _log_transition(tenant: str, change: HealthChange, now: float) -> None:
    scope = change.scope
    verdict = change.verdict
    what = (
        f"key {scope.key_id} model {scope.model or '*'}"
        if isinstance(scope, KeyScope)
        else f"provider {scope.provider.value} model {scope.model}"
    )
    until = f" until {until_text(verdict.until, now)}" if verdict.until is not None else ""
    log.info("tenant %s: %s is now %s%s (%s)", tenant, what, verdict.state.value, until, verdict.reason)
