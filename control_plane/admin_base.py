"""What every part of the admin service shares: its collaborators (store,
hub, master keys, clock, aggregator, URL policy) and the two steps after a
write: publishing it to the sidecar streams and clearing a key's learnt
health. ``AdminService`` (control_plane/admin_service.py) is assembled from
the parts that build on this class, one module per resource."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from control_plane.affinity import Affinity
from control_plane.aggregator import HealthAggregator
from control_plane.fleet import FleetTracker
from control_plane.hub import SnapshotHub
from control_plane.quota_broker import QuotaBroker
from control_plane.store.base import AuditEntry, Store
from control_plane.url_policy import DEFAULT_URL_POLICY, UrlPolicy
from keyplane.crypto import SecretBox
from keyplane.keyring import MasterKeys, as_master_keys

__all__ = ["AdminBase", "Context"]

log = logging.getLogger("control_plane.admin_service")

Context = aio.ServicerContext[Any, Any]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AdminBase:
    def __init__(
        self,
        store: Store,
        hub: SnapshotHub,
        secret_box: SecretBox | MasterKeys,
        clock: Callable[[], datetime] = _utcnow,
        *,
        health: HealthAggregator | None = None,
        url_policy: UrlPolicy = DEFAULT_URL_POLICY,
        fleet: FleetTracker | None = None,
        affinity: Affinity | None = None,
        quota: QuotaBroker | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._keys = as_master_keys(secret_box)  # seals with the primary master key
        self._clock = clock
        self._health = health
        self._url_policy = url_policy  # which hosts base URLs and vLLM node URLs may name
        self._fleet = fleet  # the fleet's sync state (GetProxyStatus, WaitForVersion)
        self._affinity = affinity  # binding stats (control_plane.node_admin)
        self._quota = quota  # the limits' leases (control_plane.limits_admin)

    async def _reset_key_health(self, tenant: str, key_id: str, audit: AuditEntry | None = None) -> int:
        """Clear the key's learnt health in the store and in the aggregator's
        books, and publish the HEALTHY changes; returns a version at or after them."""
        if self._health is not None:
            await self._health.reset_key(tenant, key_id, audit=audit)
        else:
            await self._store.clear_key_health(tenant, key_id, audit=audit)
        return await self._publish()

    async def _publish(self) -> int:
        """Push the write just made to the sidecar streams; returns a version
        at or after it (what write responses carry, for WaitForVersion), 0 if
        none can be read. The write is committed either way: on failure the
        hub's poller catches up later."""
        try:
            return await self._hub.catch_up()
        except Exception as exc:
            log.warning("write committed but not yet published to sidecars: %s", type(exc).__name__)
        try:
            return await self._store.latest_version()
        except Exception:
            return 0
