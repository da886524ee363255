"""The control plane's in-memory snapshot and its fan-out to watch streams.

``SnapshotCache`` is fed from outside and only serves (go-control-plane's
snapshot cache is the model): ``load`` hands it every tenant once, ``apply``
moves it one change-log record at a time, in version order. It keeps each
tenant's state as sidecars get it, a bounded ring of recent changes (for
resuming sidecars) and the subscribers. No I/O: the follower in
``control_plane.hub`` reads the store and feeds it, and tests feed it by hand.

Every subscriber (``control_plane.watch_subscription``) has its own bounded
queue; ``apply`` only appends to it and never waits. Snapshots are built from
memory (each tenant a ``control_plane.cached_tenant.CachedTenant``), never
from the store, so a fleet of reconnecting sidecars never touches the
database.

Learnt health (KEY_HEALTH / PROVIDER_HEALTH changes) is kept the same way:
only entries that are not healthy stay in memory and go into snapshots; a
change to HEALTHY is published as a ``KeyHealth`` / ``ProviderHealth`` with
state HEALTHY, meaning "forget any earlier entry". A deleted key's health
goes with it.

Invariant: memory reflects exactly ``version`` and every change up to
``version`` has been published to the subscribers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from control_plane.cached_tenant import CachedTenant, TenantContents
from control_plane.limits import TenantUsage
from control_plane.watch_subscription import SubscriberInfo, Subscription
from keyplane import convert
from keyplane.domain import ChangeOp, ChangeRecord, EntityKind, Provider
from keyplane.errors import KeyplaneError
from keyplane.limits import MAX_WATCH_MESSAGE_BYTES
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = [
    "ChangeListener",
    "SnapshotCache",
    "SnapshotTooLarge",
    "SubscriberInfo",
    "Subscription",
    "TenantContents",
]

log = logging.getLogger(__name__)

# Told of every published change, in version order, right after memory moved
# (synchronously: it must not block; exceptions are logged and swallowed).
ChangeListener = Callable[[ChangeRecord, sidecar_service_pb2.Change], None]


class SnapshotTooLarge(KeyplaneError):
    """The snapshot a watcher asked for would pass the sidecar's receive limit."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SnapshotCache:
    def __init__(
        self,
        *,
        log_size: int = 10000,
        max_pending: int = 1000,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if log_size < 1 or max_pending < 1:
            raise ValueError("log_size and max_pending must be at least 1")
        self._max_pending = max_pending
        self._clock = clock
        self._tenants: dict[str, CachedTenant] = {}
        self._version = 0
        self._ring: deque[tuple[sidecar_service_pb2.Change, int]] = deque(maxlen=log_size)
        # The ring holds every published change with floor < version <= current.
        self._ring_floor = 0
        self._subscribers: set[Subscription] = set()
        self._listeners: list[ChangeListener] = []
        self._loaded = False
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

    def route_nodes(
        self, tenant: str, public_model: str
    ) -> tuple[list[resources_pb2.Node], dict[str, resources_pb2.NodeHealth]] | None:
        """Affinity: the ACTIVE and DRAINING nodes of the tenant's route for
        ``public_model`` and the non-healthy health of the tenant's nodes;
        None when the tenant has no such route."""
        state = self._tenants.get(tenant)
        if state is None:
            return None
        route = next((r for r in state.routes.values() if r.public_model == public_model), None)
        return None if route is None else (state.nodes.of_route(route.id), state.nodes.health)

    def has_node(self, tenant: str, node_id: str) -> bool:
        state = self._tenants.get(tenant)
        return state is not None and node_id in state.nodes.nodes

    def has_client_key(self, tenant: str, client_key_id: str) -> bool:
        state = self._tenants.get(tenant)
        return state is not None and client_key_id in state.client_keys

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

    # feeding -------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self, version: int, tenants: Mapping[str, TenantContents]) -> None:
        """Start from ``tenants`` as they were at ``version`` (before any subscriber)."""
        if self._subscribers:
            raise RuntimeError("SnapshotCache.load() after subscribers joined")
        self._version = version
        self._ring_floor = version
        self._ring.clear()
        self._tenants = {name: contents.to_state() for name, contents in tenants.items()}
        self._loaded = True

    def apply(self, record: ChangeRecord, change: sidecar_service_pb2.Change | None) -> None:
        """Move to ``record.version``: apply ``change`` (None: nothing to apply,
        e.g. a PUT of an entity a later change deleted) and publish it."""
        self._version = record.version
        if change is None:
            return
        if record.kind is EntityKind.TENANT:
            if record.op is ChangeOp.DELETE:
                self._tenants.pop(record.tenant, None)
            else:
                # A tenant PUT carries no payload: the tenant exists, empty at first.
                self._tenants.setdefault(record.tenant, CachedTenant())
                return
        elif record.op is ChangeOp.PUT or record.tenant in self._tenants:
            # A PUT was just read back from the store, so its tenant exists.
            self._tenants.setdefault(record.tenant, CachedTenant()).apply(change)
        self._publish(change)
        for listener in list(self._listeners):
            try:
                listener(record, change)
            except Exception:
                log.exception("snapshot cache change listener failed")

    def _publish(self, change: sidecar_service_pb2.Change) -> None:
        if self._ring.maxlen is not None and len(self._ring) == self._ring.maxlen:
            self._ring_floor = self._ring[0][0].version
        size = change.ByteSize()
        self._ring.append((change, size))
        for subscription in self._subscribers:
            if subscription.matches(change.tenant):
                subscription._push(change, size)

    def close(self) -> None:
        """End every subscription; later subscriptions end at once."""
        self._closed = True
        for subscription in list(self._subscribers):
            subscription.close()

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
        if not self._loaded:
            raise RuntimeError("SnapshotCache.load() has not been called")
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
