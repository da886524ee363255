"""The control plane's in-memory snapshot and its fan-out to sidecar streams.

``SnapshotHub`` loads every tenant from the store once at start, then follows
the store's change log (``catch_up``): each change record is re-read from the
store, applied to memory, turned into a ``Change`` message, kept in a bounded
ring (for resuming sidecars) and published to the subscribers that watch its
tenant. Snapshots are built from memory, never from the store, so a fleet of
reconnecting sidecars never touches the database.

Every subscriber has its own bounded queue; ``publish`` only appends to it and
never waits. A subscriber that falls more than ``max_pending`` changes behind
loses its queued changes and gets one fresh snapshot instead.

Learnt health (KEY_HEALTH / PROVIDER_HEALTH changes) is kept the same way:
only entries that are not healthy stay in memory and go into snapshots; a
change to HEALTHY (or a DELETE) is published as a ``KeyHealth`` /
``ProviderHealth`` with state HEALTHY, meaning "forget any earlier entry". A
deleted key's health goes with it.

Invariant: between two awaits, memory reflects exactly ``version`` and every
change up to ``version`` has been published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

from control_plane.limits import TenantUsage
from control_plane.store.base import Store
from keyplane import convert
from keyplane.crypto import MasterKeyError, SecretBox
from keyplane.domain import (
    ChangeOp,
    ChangeRecord,
    EntityKind,
    KeyStatus,
    Provider,
    ProviderKey,
    key_health_entity_id,
    provider_health_entity_id,
    split_health_entity_id,
)
from keyplane.errors import KeyplaneError, NotFound
from keyplane.limits import MAX_DELTA_MESSAGE_BYTES, MAX_WATCH_MESSAGE_BYTES
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["ChangeListener", "SnapshotHub", "SnapshotTooLarge", "SubscriberInfo", "Subscription"]

log = logging.getLogger(__name__)

_PAGE = 1000

# Told of every published change, in version order, right after memory moved
# (synchronously: it must not block; exceptions are logged and swallowed).
ChangeListener = Callable[[ChangeRecord, sidecar_service_pb2.Change], None]


class SnapshotTooLarge(KeyplaneError):
    """The snapshot a watcher asked for would pass the sidecar's receive limit."""


@dataclass(frozen=True, slots=True)
class SubscriberInfo:
    """One connected watch stream, for the admin's view of the fleet."""

    sidecar_id: str
    tenants: frozenset[str] | None  # None: every tenant
    peer: str
    connected_at: datetime
    version: int  # the version of the last message handed to the stream


@dataclass(slots=True)
class _TenantState:
    keys: dict[str, sidecar_service_pb2.SidecarProviderKey] = field(default_factory=dict)
    routes: dict[str, resources_pb2.Route] = field(default_factory=dict)
    client_keys: dict[str, sidecar_service_pb2.SidecarClientKey] = field(default_factory=dict)
    # Only entries that are not healthy, by change-log entity id.
    key_health: dict[str, resources_pb2.KeyHealth] = field(default_factory=dict)
    provider_health: dict[str, resources_pb2.ProviderHealth] = field(default_factory=dict)
    cached: sidecar_service_pb2.TenantState | None = None
    cached_size: int = -1

    def size(self, name: str) -> int:
        """The encoded size of ``to_proto(name)``."""
        if self.cached is None or self.cached_size < 0:
            self.cached_size = self.to_proto(name).ByteSize()
        return self.cached_size

    def to_proto(self, name: str) -> sidecar_service_pb2.TenantState:
        if self.cached is None:
            self.cached_size = -1
            self.cached = sidecar_service_pb2.TenantState(
                tenant=name,
                keys=list(self.keys.values()),
                routes=list(self.routes.values()),
                client_keys=list(self.client_keys.values()),
                key_health=[self.key_health[k] for k in sorted(self.key_health)],
                provider_health=[self.provider_health[k] for k in sorted(self.provider_health)],
            )
        return self.cached

    def put_key_health(self, health: resources_pb2.KeyHealth) -> None:
        entity_id = key_health_entity_id(health.key_id, health.model)
        if health.state == resources_pb2.HEALTH_STATE_HEALTHY:
            self.key_health.pop(entity_id, None)
        elif health.key_id in self.keys:
            self.key_health[entity_id] = health

    def put_provider_health(self, health: resources_pb2.ProviderHealth) -> None:
        provider = convert.provider_from_proto(health.provider)
        if provider is None:
            return
        entity_id = provider_health_entity_id(provider, health.model)
        if health.state == resources_pb2.HEALTH_STATE_HEALTHY:
            self.provider_health.pop(entity_id, None)
        else:
            self.provider_health[entity_id] = health

    def drop_key(self, key_id: str) -> None:
        self.keys.pop(key_id, None)
        prefix = key_health_entity_id(key_id, "")
        for entity_id in [e for e in self.key_health if e.startswith(prefix)]:
            del self.key_health[entity_id]


class Subscription:
    """One watcher's view: iterate it for ``WatchResponse`` messages; it ends
    when closed (by the watcher or by ``SnapshotHub.close``)."""

    def __init__(
        self,
        hub: SnapshotHub,
        tenants: frozenset[str] | None,
        *,
        max_pending: int,
        sidecar_id: str,
        peer: str,
        connected_at: datetime,
    ) -> None:
        self._hub = hub
        self.tenants = tenants
        self._max_pending = max_pending
        # Each queued change with its encoded size.
        self._pending: deque[tuple[sidecar_service_pb2.Change, int]] = deque()
        self._snapshot_due = False
        self._send_empty_delta = False
        self._wake = asyncio.Event()
        self._closed = False
        self._delivered = 0
        self._sidecar_id = sidecar_id
        self._peer = peer
        self._connected_at = connected_at

    # producer side (the hub) ---------------------------------------------------
    def matches(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def _start_with_snapshot(self) -> None:
        self._snapshot_due = True
        self._wake.set()

    def _start_with_delta(self, missed: list[tuple[sidecar_service_pb2.Change, int]]) -> None:
        self._pending.extend(missed)
        self._send_empty_delta = True
        self._wake.set()

    def _push(self, change: sidecar_service_pb2.Change, size: int) -> None:
        if self._closed or self._snapshot_due:
            return  # the snapshot still to be built will include it
        if len(self._pending) >= self._max_pending:
            self._pending.clear()
            self._snapshot_due = True
        else:
            self._pending.append((change, size))
        self._wake.set()

    # consumer side (the stream) ------------------------------------------------
    @property
    def pending(self) -> int:
        """Changes queued and not yet taken by the stream."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    async def next(self) -> sidecar_service_pb2.WatchResponse | None:
        """The next message (queued changes coalesced into one delta of at
        most ``MAX_DELTA_MESSAGE_BYTES``, the rest following in the next), or
        None once the subscription is closed. ``SnapshotTooLarge`` when the
        snapshot due would not fit in one message."""
        while not self._closed:
            if self._snapshot_due:
                self._snapshot_due = False
                self._send_empty_delta = False
                self._pending.clear()
                response = self._hub.snapshot(self.tenants)
                self._delivered = response.version
                return response
            if self._pending or self._send_empty_delta:
                self._send_empty_delta = False
                changes: list[sidecar_service_pb2.Change] = []
                taken = 0
                pending = self._pending
                while pending and (not changes or taken + pending[0][1] <= MAX_DELTA_MESSAGE_BYTES):
                    change, size = pending.popleft()
                    changes.append(change)
                    taken += size
                # With nothing left, every change up to hub.version for our
                # tenants is in the delta; else only those up to the last one.
                self._delivered = changes[-1].version if pending else self._hub.version
                if pending:
                    self._wake.set()
                delta = sidecar_service_pb2.Delta(changes=changes)
                return sidecar_service_pb2.WatchResponse(version=self._delivered, delta=delta)
            self._wake.clear()
            await self._wake.wait()
        return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> sidecar_service_pb2.WatchResponse:
        response = await self.next()
        if response is None:
            raise StopAsyncIteration
        return response

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._wake.set()
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def info(self) -> SubscriberInfo:
        return SubscriberInfo(
            sidecar_id=self._sidecar_id,
            tenants=self.tenants,
            peer=self._peer,
            connected_at=self._connected_at,
            version=self._delivered,
        )


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SnapshotHub:
    def __init__(
        self,
        store: Store,
        secret_box: SecretBox,
        *,
        log_size: int = 10000,
        max_pending: int = 1000,
        poll_interval: float | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if log_size < 1 or max_pending < 1:
            raise ValueError("log_size and max_pending must be at least 1")
        self._store = store
        self._box = secret_box
        self._max_pending = max_pending
        self._poll_interval = poll_interval
        self._clock = clock
        self._lock = asyncio.Lock()
        self._tenants: dict[str, _TenantState] = {}
        self._version = 0
        self._ring: deque[tuple[sidecar_service_pb2.Change, int]] = deque(maxlen=log_size)
        # The ring holds every published change with floor < version <= current.
        self._ring_floor = 0
        self._subscribers: set[Subscription] = set()
        self._listeners: list[ChangeListener] = []
        self._poller: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # state ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def has_tenant(self, name: str) -> bool:
        return name in self._tenants

    def tenant_names(self) -> list[str]:
        return sorted(self._tenants)

    def connected(self) -> list[SubscriberInfo]:
        return sorted((s.info for s in self._subscribers), key=lambda i: (i.connected_at, i.sidecar_id))

    def key_provider(self, tenant: str, key_id: str) -> Provider | None:
        """The provider of a key the sidecars know, or None (no such tenant or key)."""
        state = self._tenants.get(tenant)
        key = state.keys.get(key_id) if state is not None else None
        return convert.provider_from_proto(key.provider) if key is not None else None

    def health(self, tenant: str) -> tuple[list[resources_pb2.KeyHealth], list[resources_pb2.ProviderHealth]] | None:
        """The tenant's entries that are not healthy (key health ordered by key
        id then model, provider health by provider then model), as last
        written; None for an unknown tenant. Cooldowns whose ``until`` has
        passed are included: callers decide what "now" is."""
        state = self._tenants.get(tenant)
        if state is None:
            return None
        return (
            [state.key_health[k] for k in sorted(state.key_health)],
            [state.provider_health[k] for k in sorted(state.provider_health)],
        )

    def usage(self, tenant: str) -> TenantUsage:
        """What the tenant holds as sent to sidecars (all zero for an unknown tenant)."""
        state = self._tenants.get(tenant)
        if state is None:
            return TenantUsage()
        return TenantUsage(
            keys=len(state.keys),
            routes=len(state.routes),
            client_keys=len(state.client_keys),
            snapshot_bytes=state.size(tenant),
        )

    def encoded_size(self, tenant: str, kind: EntityKind, entity_id: str) -> int:
        """The encoded size of one key, route or client key as sidecars hold it (0 if absent)."""
        state = self._tenants.get(tenant)
        if state is None:
            return 0
        found: dict[str, sidecar_service_pb2.SidecarProviderKey] | dict[str, resources_pb2.Route] | None = None
        if kind is EntityKind.PROVIDER_KEY:
            found = state.keys
        elif kind is EntityKind.ROUTE:
            found = state.routes
        if found is None or entity_id not in found:
            return 0
        return found[entity_id].ByteSize()

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener`` for every change published from now on."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Load everything from the store, then follow its change log."""
        async with self._lock:
            # Read the version first: anything written while we load is
            # replayed by catch_up, and replaying is idempotent.
            self._version = await self._store.latest_version()
            self._ring_floor = self._version
            for tenant in await self._store.list_tenants():
                try:
                    await self._load_tenant(tenant.name)
                except NotFound:
                    continue  # deleted meanwhile; its TENANT/DELETE change follows
            self._started = True
        log.info("snapshot hub loaded %d tenants at version %d", len(self._tenants), self._version)
        # Listen before catching up, so no write from another replica falls in between.
        await self._store.listen_changes(self._on_store_change)
        await self.catch_up()
        if self._poll_interval is not None:
            self._poller = asyncio.create_task(self._poll(self._poll_interval), name="snapshot-hub-poll")

    async def _on_store_change(self, version: int) -> None:
        """Store listener: another process wrote ``version``."""
        if version > self._version:
            try:
                await self.catch_up()
            except Exception as exc:
                log.warning("snapshot hub could not read the change log: %s", type(exc).__name__)

    async def _load_tenant(self, name: str) -> None:
        state = _TenantState()
        for key in await self._store.list_provider_keys(name):
            sidecar_key = self._open_key(key)
            if sidecar_key is not None:
                state.keys[key.id] = sidecar_key
        for route in await self._store.list_routes(name):
            state.routes[route.id] = convert.route_to_proto(route)
        for client_key in await self._store.list_client_keys(name):
            state.client_keys[client_key.id] = convert.sidecar_client_key_to_proto(client_key)
        for key_health in await self._store.list_key_health(name):
            state.put_key_health(convert.key_health_to_proto(key_health))
        for provider_health in await self._store.list_provider_health(name):
            state.put_provider_health(convert.provider_health_to_proto(provider_health))
        self._tenants[name] = state

    async def close(self) -> None:
        """End every subscription and stop following the store."""
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for subscription in list(self._subscribers):
            subscription.close()

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.catch_up()
            except Exception as exc:
                log.warning("snapshot hub could not read the change log: %s", type(exc).__name__)

    # following the change log ------------------------------------------------------
    async def catch_up(self) -> int:
        """Apply and publish every change newer than ``version``; returns the
        new version. Serialised: concurrent callers wait for each other."""
        async with self._lock:
            if not self._started:
                raise RuntimeError("SnapshotHub.start() has not been called")
            while True:
                records = await self._store.changes_since(self._version, limit=_PAGE)
                for record in records:
                    if record.version <= self._version:
                        continue
                    change = await self._read_change(record)
                    # No await from here on: memory, version and subscribers move together.
                    self._apply(record, change)
                if len(records) < _PAGE:
                    return self._version

    async def _read_change(self, record: ChangeRecord) -> sidecar_service_pb2.Change | None:
        """The Change message for ``record``, re-reading the entity for a PUT.

        None for a PUT of an entity that a later change deleted (that change
        follows). A tenant PUT gives a Change without payload, kept to memory.
        """
        base = sidecar_service_pb2.Change(version=record.version, tenant=record.tenant)
        if record.kind in (EntityKind.KEY_HEALTH, EntityKind.PROVIDER_HEALTH):
            return await self._read_health_change(record, base)
        if record.op is ChangeOp.DELETE:
            if record.kind is EntityKind.TENANT:
                base.tenant_deleted = True
            elif record.kind is EntityKind.PROVIDER_KEY:
                base.key_deleted = record.entity_id
            elif record.kind is EntityKind.ROUTE:
                base.route_deleted = record.entity_id
            else:
                base.client_key_deleted = record.entity_id
            return base
        try:
            if record.kind is EntityKind.TENANT:
                await self._store.get_tenant(record.tenant)
                return base  # no payload: the tenant exists (not sent to sidecars)
            if record.kind is EntityKind.PROVIDER_KEY:
                key = self._open_key(await self._store.get_provider_key(record.tenant, record.entity_id))
                if key is None:
                    base.key_deleted = record.entity_id  # unusable: sidecars must drop it
                else:
                    base.key_put.CopyFrom(key)
            elif record.kind is EntityKind.ROUTE:
                route = await self._store.get_route(record.tenant, record.entity_id)
                base.route_put.CopyFrom(convert.route_to_proto(route))
            else:
                client_key = await self._store.get_client_key(record.tenant, record.entity_id)
                base.client_key_put.CopyFrom(convert.sidecar_client_key_to_proto(client_key))
        except NotFound:
            return None
        return base

    async def _read_health_change(
        self, record: ChangeRecord, base: sidecar_service_pb2.Change
    ) -> sidecar_service_pb2.Change | None:
        """A health change re-read from the store; an absent entry (or a
        DELETE) is published as HEALTHY. None for a malformed entity id."""
        head, model = split_health_entity_id(record.entity_id)
        healthy = resources_pb2.HEALTH_STATE_HEALTHY
        update_time = convert.timestamp_from_datetime(record.created_at)
        if record.kind is EntityKind.KEY_HEALTH:
            key_health = None
            if record.op is ChangeOp.PUT:
                key_health = await self._store.get_key_health(record.tenant, head, model)
            if key_health is None:
                base.key_health.CopyFrom(
                    resources_pb2.KeyHealth(key_id=head, model=model, state=healthy, update_time=update_time)
                )
            else:
                base.key_health.CopyFrom(convert.key_health_to_proto(key_health))
            return base
        try:
            provider = Provider(head)
        except ValueError:
            log.warning("change %d names an unknown provider in its health entity id; skipped", record.version)
            return None
        provider_health = None
        if record.op is ChangeOp.PUT:
            provider_health = await self._store.get_provider_health(record.tenant, provider, model)
        if provider_health is None:
            base.provider_health.CopyFrom(
                resources_pb2.ProviderHealth(
                    provider=convert.provider_to_proto(provider), model=model, state=healthy, update_time=update_time
                )
            )
        else:
            base.provider_health.CopyFrom(convert.provider_health_to_proto(provider_health))
        return base

    def _apply(self, record: ChangeRecord, change: sidecar_service_pb2.Change | None) -> None:
        self._version = record.version
        if change is None:
            return
        if record.kind is EntityKind.TENANT:
            if record.op is ChangeOp.DELETE:
                self._tenants.pop(record.tenant, None)
            else:
                # A tenant PUT carries no payload: the tenant exists, empty at first.
                self._tenants.setdefault(record.tenant, _TenantState())
                return
        elif record.op is ChangeOp.PUT or record.tenant in self._tenants:
            # A PUT was just read back from the store, so its tenant exists.
            state = self._tenants.setdefault(record.tenant, _TenantState())
            state.cached = None
            which = change.WhichOneof("change")
            if which == "key_put":
                state.keys[change.key_put.id] = change.key_put
            elif which == "key_deleted":
                state.drop_key(change.key_deleted)
            elif which == "route_put":
                state.routes[change.route_put.id] = change.route_put
            elif which == "route_deleted":
                state.routes.pop(change.route_deleted, None)
            elif which == "client_key_put":
                state.client_keys[change.client_key_put.id] = change.client_key_put
            elif which == "client_key_deleted":
                state.client_keys.pop(change.client_key_deleted, None)
            elif which == "key_health":
                state.put_key_health(change.key_health)
            elif which == "provider_health":
                state.put_provider_health(change.provider_health)
        self._publish(change)
        for listener in list(self._listeners):
            try:
                listener(record, change)
            except Exception:
                log.exception("snapshot hub change listener failed")

    def _publish(self, change: sidecar_service_pb2.Change) -> None:
        if self._ring.maxlen is not None and len(self._ring) == self._ring.maxlen:
            self._ring_floor = self._ring[0][0].version
        size = change.ByteSize()
        self._ring.append((change, size))
        for subscription in self._subscribers:
            if subscription.matches(change.tenant):
                subscription._push(change, size)

    def _open_key(self, key: ProviderKey) -> sidecar_service_pb2.SidecarProviderKey | None:
        """The key as sidecars get it; only an active key carries its secret
        (a disabled or revoked one is sent by id and state alone)."""
        if key.status is not KeyStatus.ACTIVE:
            return convert.sidecar_key_to_proto(key, "")
        try:
            secret = self._box.open(key.secret_ciphertext, associated_data=key.id)
        except MasterKeyError:
            log.error(
                "provider key %s of tenant %s does not open with this master key; not sent to sidecars",
                key.id,
                key.tenant,
            )
            return None
        return convert.sidecar_key_to_proto(key, secret)

    # subscribers -------------------------------------------------------------------
    def snapshot(self, tenants: frozenset[str] | None) -> sidecar_service_pb2.WatchResponse:
        """A full snapshot of ``tenants`` (None: all) from memory, at ``version``."""
        names = sorted(self._tenants if tenants is None else (t for t in tenants if t in self._tenants))
        size = sum(self._tenants[n].size(n) for n in names)
        if size > MAX_WATCH_MESSAGE_BYTES - 1024 * 1024:
            raise SnapshotTooLarge(
                f"the snapshot of {len(names)} tenant(s) is {size // (1024 * 1024)} MiB, more than one watch "
                f"message may carry ({MAX_WATCH_MESSAGE_BYTES // (1024 * 1024)} MiB): watch fewer tenants "
                "(keyplane sidecar --tenant)"
            )
        snapshot = sidecar_service_pb2.Snapshot(tenants=[self._tenants[n].to_proto(n) for n in names])
        return sidecar_service_pb2.WatchResponse(version=self._version, snapshot=snapshot)

    def subscribe(
        self,
        tenants: frozenset[str] | None,
        resume_version: int,
        *,
        sidecar_id: str = "",
        peer: str = "",
    ) -> Subscription:
        """Watch ``tenants`` (None: every tenant, present and future).

        The first message is a delta of the changes after ``resume_version``
        (possibly empty) when the ring still holds them all, else a snapshot.
        """
        if not self._started:
            raise RuntimeError("SnapshotHub.start() has not been called")
        subscription = Subscription(
            self,
            tenants,
            max_pending=self._max_pending,
            sidecar_id=sidecar_id,
            peer=peer,
            connected_at=self._clock(),
        )
        if 0 < resume_version <= self._version and resume_version >= self._ring_floor:
            missed = [e for e in self._ring if e[0].version > resume_version and subscription.matches(e[0].tenant)]
            if len(missed) > self._max_pending:
                subscription._start_with_snapshot()
            else:
                subscription._start_with_delta(missed)
        else:
            subscription._start_with_snapshot()
        if self._closed:
            subscription.close()
        else:
            self._subscribers.add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
