"""The change-log follower that feeds the control plane's snapshot cache.

``SnapshotHub`` loads every tenant from the store once at start and hands it
to its ``SnapshotCache`` (``hub.cache``, which serves the watch streams),
then follows the store's change log (``catch_up``): each change record is
re-read from the store, decrypted where it is a key, turned into a ``Change``
message and applied to the cache, in version order. It learns of new changes
from the store's listener (Postgres LISTEN/NOTIFY), from a poller as a safety
net, and from the admin service right after each write.

API token changes (ADMIN_TOKEN / SIDECAR_TOKEN, tenant "") are no tenant's
business: they are re-read and fed to the hub's ``TokenRegistry``
(``hub.tokens``, which the Authenticator consults) and never reach the cache
beyond moving its version.

Only an active key carries its secret to the cache (and on to sidecars); a
disabled or revoked key goes by id and state alone. A key whose secret does
not open with the master keyring (a master key id it does not hold, or a
wrong key) is not sent at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from control_plane.affinity_changes import AFFINITY_KINDS, read_affinity_change
from control_plane.snapshot_cache import SnapshotCache, TenantContents
from control_plane.store.base import Store
from control_plane.token_registry import TokenRegistry
from keyplane import affinity_convert, convert
from keyplane.crypto import MasterKeyError, SecretBox
from keyplane.domain import (
    ChangeOp,
    ChangeRecord,
    EntityKind,
    KeyStatus,
    Provider,
    ProviderKey,
    TokenKind,
    split_health_entity_id,
)
from keyplane.errors import NotFound
from keyplane.keyring import MasterKeys, UnknownMasterKey, as_master_keys
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["SnapshotHub"]

log = logging.getLogger(__name__)

_PAGE = 1000
_TOKEN_KINDS = {EntityKind.ADMIN_TOKEN: TokenKind.ADMIN, EntityKind.SIDECAR_TOKEN: TokenKind.SIDECAR}


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SnapshotHub:
    def __init__(
        self,
        store: Store,
        secret_box: SecretBox | MasterKeys,
        *,
        log_size: int = 10000,
        max_pending: int = 1000,
        poll_interval: float | None = None,
        clock: Callable[[], datetime] = _utcnow,
        tokens: TokenRegistry | None = None,
    ) -> None:
        self._store = store
        # The managed API tokens that authenticate now (fed from the change log).
        self.tokens = tokens if tokens is not None else TokenRegistry()
        self._keys = as_master_keys(secret_box)  # opens with the master key a ciphertext names
        self._poll_interval = poll_interval
        self._lock = asyncio.Lock()
        self.cache = SnapshotCache(log_size=log_size, max_pending=max_pending, clock=clock)
        self._poller: asyncio.Task[None] | None = None

    @property
    def version(self) -> int:
        """The version the cache holds."""
        return self.cache.version

    # lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Load everything from the store, then follow its change log."""
        async with self._lock:
            # Read the version first: anything written while we load is
            # replayed by catch_up, and replaying is idempotent.
            version = await self._store.latest_version()
            tenants: dict[str, TenantContents] = {}
            for tenant in await self._store.list_tenants():
                try:
                    tenants[tenant.name] = await self._load_tenant(tenant.name)
                except NotFound:
                    continue  # deleted meanwhile; its TENANT/DELETE change follows
            self.tokens.load([t for kind in TokenKind for t in await self._store.list_tokens(kind)])
            self.cache.load(version, tenants)
        log.info("snapshot hub loaded %d tenants at version %d", len(tenants), version)
        # Listen before catching up, so no write from another replica falls in between.
        await self._store.listen_changes(self._on_store_change)
        await self.catch_up()
        if self._poll_interval is not None:
            self._poller = asyncio.create_task(self._poll(self._poll_interval), name="snapshot-hub-poll")

    async def _on_store_change(self, version: int) -> None:
        """Store listener: another process wrote ``version``."""
        if version > self.cache.version:
            try:
                await self.catch_up()
            except Exception as exc:
                log.warning("snapshot hub could not read the change log: %s", type(exc).__name__)

    async def _load_tenant(self, name: str) -> TenantContents:
        keys = [self._open_key(key) for key in await self._store.list_provider_keys(name)]
        return TenantContents(
            keys=tuple(k for k in keys if k is not None),
            routes=tuple(convert.route_to_proto(r) for r in await self._store.list_routes(name)),
            client_keys=tuple(convert.sidecar_client_key_to_proto(c) for c in await self._store.list_client_keys(name)),
            key_health=tuple(convert.key_health_to_proto(h) for h in await self._store.list_key_health(name)),
            provider_health=tuple(
                convert.provider_health_to_proto(h) for h in await self._store.list_provider_health(name)
            ),
            nodes=tuple(affinity_convert.sidecar_node_to_proto(n) for n in await self._store.list_nodes(name)),
            node_health=tuple(
                affinity_convert.node_health_to_proto(h) for h in await self._store.list_node_health(name)
            ),
        )

    async def close(self) -> None:
        """End every subscription and stop following the store."""
        self.cache.close()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

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
            if not self.cache.loaded:
                raise RuntimeError("SnapshotHub.start() has not been called")
            while True:
                records = await self._store.changes_since(self.cache.version, limit=_PAGE)
                for record in records:
                    if record.version <= self.cache.version:
                        continue
                    kind = _TOKEN_KINDS.get(record.kind)
                    if kind is not None:
                        await self._follow_token(kind, record.entity_id)
                        self.cache.apply(record, None)  # only the version moves
                        continue
                    change = await self._read_change(record)
                    # No await between reading and applying: the cache moves in version order.
                    self.cache.apply(record, change)
                if len(records) < _PAGE:
                    return self.cache.version

    async def _follow_token(self, kind: TokenKind, token_id: str) -> None:
        try:
            token = await self._store.get_token(kind, token_id)
        except NotFound:
            self.tokens.remove(token_id)
            return
        self.tokens.apply(token)
        if token.revoked:
            log.info("%s token %s revoked; it authenticates nothing from now on", kind.value, token_id)

    async def _read_change(self, record: ChangeRecord) -> sidecar_service_pb2.Change | None:
        """The Change message for ``record``, re-reading the entity for a PUT.

        None for a PUT of an entity that a later change deleted (that change
        follows). A tenant PUT gives a Change without payload, kept to memory.
        """
        base = sidecar_service_pb2.Change(version=record.version, tenant=record.tenant)
        if record.kind in (EntityKind.KEY_HEALTH, EntityKind.PROVIDER_HEALTH):
            return await self._read_health_change(record, base)
        if record.kind in AFFINITY_KINDS:
            return await read_affinity_change(self._store, record, base)
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

    def _open_key(self, key: ProviderKey) -> sidecar_service_pb2.SidecarProviderKey | None:
        """The key as sidecars get it; only an active key carries its secret
        (a disabled or revoked one is sent by id and state alone)."""
        if key.status is not KeyStatus.ACTIVE:
            return convert.sidecar_key_to_proto(key, "")
        try:
            secret = self._keys.open(key.secret_ciphertext, associated_data=key.id)
        except UnknownMasterKey as exc:
            log.error(
                "provider key %s of tenant %s is sealed with master key %s, which is not in the keyring; "
                "not sent to sidecars",
                key.id,
                key.tenant,
                exc.key_id,
            )
            return None
        except MasterKeyError:
            log.error(
                "provider key %s of tenant %s does not open with this master key; not sent to sidecars",
                key.id,
                key.tenant,
            )
            return None
        return convert.sidecar_key_to_proto(key, secret)
