"""The admin gRPC service: tenants, provider keys, routes, client keys, and
the learnt health and connected sidecars, and the audit log (API tokens:
``token_service``).

Every write is audited (``control_plane.audit``): its event (caller, method,
resource, changed fields, never a secret) is written in the write's own
transaction, and a failed attempt is recorded with its status code.

Every write goes to the store first; once it returns, ``hub.catch_up()``
publishes the change to the sidecar streams before the RPC answers. Secrets
are sealed with the key id as associated data and never returned.

Health is read from the hub's memory (what the sidecars were told), never
from the store. Resetting a key's health, re-enabling a key (status ACTIVE)
or rotating its secret clears its learnt health through the aggregator, so
its in-memory books forget the key too.

Updates write only what they name (the update_mask fields, or the secret of
a rotation), so concurrent updates of different fields never undo each
other. An update that carries an etag (AIP-154; the request's ``etag``, else
the resource's) is a compare-and-set in the store and fails with ABORTED
when the object changed since that etag was read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from control_plane import limits
from control_plane import validation as v
from control_plane.aggregator import HealthAggregator
from control_plane.audit import AuditDraft, audited, list_audit_events
from control_plane.hub import SnapshotHub
from control_plane.master_key_admin import MasterKeyAdmin
from control_plane.snapshot_cache import SubscriberInfo
from control_plane.status import map_errors
from control_plane.store.base import AuditEntry, ProviderKeyUpdate, RouteUpdate, SealedSecret, Store
from control_plane.token_service import TokenAdminMixin
from control_plane.url_policy import DEFAULT_URL_POLICY, UrlPolicy
from keyplane import convert
from keyplane.crypto import SecretBox, fingerprint, last4
from keyplane.domain import ClientKey, EntityKind, KeyStatus, ProviderKey, Route, RouteTarget, Tenant
from keyplane.errors import InvalidArgument, NotFound
from keyplane.ids import CLIENT_KEY_PREFIX, PROVIDER_KEY_PREFIX, ROUTE_PREFIX, new_id
from keyplane.keyring import MasterKeys, as_master_keys
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import admin_service_pb2_grpc, resources_pb2

__all__ = [
    "CLIENT_TOKEN_PREFIX",
    "UPDATABLE_KEY_FIELDS",
    "UPDATABLE_ROUTE_FIELDS",
    "AdminService",
    "new_client_token",
]

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
CLIENT_TOKEN_PREFIX = "kp-"
UPDATABLE_KEY_FIELDS = ("label", "status", "weight", "allowed_models", "base_url")
UPDATABLE_ROUTE_FIELDS = ("targets", "public_model")
# What a creation sets, as its audit event names it.
_KEY_CREATE_FIELDS = ("provider", "label", "secret", "base_url", "weight", "allowed_models")
_ROUTE_CREATE_FIELDS = ("public_model", "targets")
_CLIENT_KEY_CREATE_FIELDS = ("label", "token")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def new_client_token() -> str:
    """A fresh client bearer token: ``kp-`` and 43 URL-safe characters."""
    return CLIENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def _expected_revision(request_etag: str, resource_etag: str, *, resource: str) -> int | None:
    """The revision an update's etag precondition names; None: unconditional.
    The request's ``etag`` wins; the resource's own etag counts when it is
    the only one (AIP-154); both set and different is a client bug."""
    if request_etag and resource_etag and request_etag != resource_etag:
        raise InvalidArgument(f"etag and {resource}.etag differ; send one etag")
    etag = request_etag or resource_etag
    if not etag:
        return None
    try:
        return convert.revision_from_etag(etag)
    except ValueError:
        field = "etag" if request_etag else f"{resource}.etag"
        raise InvalidArgument(f"{field}: not an etag this API returned; use the etag from a Get or List") from None


def _mask(paths: list[str], updatable: tuple[str, ...]) -> list[str]:
    unique = list(dict.fromkeys(paths))
    unknown = [p for p in unique if p not in updatable]
    if unknown:
        hint = " (rotate the secret with new_secret)" if "secret" in unknown else ""
        raise InvalidArgument(
            f"update_mask: cannot update {', '.join(repr(p) for p in unknown)}; "
            f"updatable fields: {', '.join(updatable)}{hint}"
        )
    return unique


def _targets(messages: list[resources_pb2.RouteTarget], policy: UrlPolicy) -> tuple[RouteTarget, ...]:
    if not messages:
        raise InvalidArgument("targets: a route needs at least one target")
    limits.check_route_shape([len(m.node_urls) for m in messages])
    return tuple(
        v.validate_route_target(
            index,
            provider=convert.provider_from_proto(m.provider),
            upstream_model=m.upstream_model,
            priority=m.priority,
            weight=m.weight,
            node_urls=list(m.node_urls),
            policy=policy,
        )
        for index, m in enumerate(messages)
    )


class AdminService(TokenAdminMixin, MasterKeyAdmin, admin_service_pb2_grpc.AdminServiceServicer):
    """Tenants, keys, routes, client keys and health here; the API token
    RPCs come from ``TokenAdminMixin`` (control_plane/token_service.py), the
    master-key ones from ``MasterKeyAdmin`` (control_plane/master_key_admin.py)."""

    def __init__(
        self,
        store: Store,
        hub: SnapshotHub,
        secret_box: SecretBox | MasterKeys,
        clock: Callable[[], datetime] = _utcnow,
        *,
        health: HealthAggregator | None = None,
        url_policy: UrlPolicy = DEFAULT_URL_POLICY,
    ) -> None:
        self._store = store
        self._hub = hub
        self._keys = as_master_keys(secret_box)  # seals with the primary master key
        self._clock = clock
        self._health = health
        self._url_policy = url_policy  # which hosts base URLs and vLLM node URLs may name

    async def _reset_key_health(self, tenant: str, key_id: str, audit: AuditEntry | None = None) -> None:
        """Clear the key's learnt health in the store and in the aggregator's
        books, and publish the HEALTHY changes."""
        if self._health is not None:
            await self._health.reset_key(tenant, key_id, audit=audit)
        else:
            await self._store.clear_key_health(tenant, key_id, audit=audit)
            await self._publish()

    async def _publish(self) -> None:
        """Push the write just made to the sidecar streams. The write is
        committed either way: on failure the hub's poller catches up later."""
        try:
            await self._hub.catch_up()
        except Exception as exc:
            log.warning("write committed but not yet published to sidecars: %s", type(exc).__name__)

    # configuration caps --------------------------------------------------------
    def _check_key_fits(self, key: ProviderKey, secret_chars: int, *, new: bool) -> None:
        """The key, as sidecars will hold it, fits in its tenant's caps."""
        usage = self._hub.cache.usage(key.tenant)
        if new:
            limits.check_room(usage, "keys", key.tenant)
        # Tags and length prefixes: a few bytes on top of the fields.
        adding = convert.sidecar_key_to_proto(key, "").ByteSize() + secret_chars + 8
        removing = 0 if new else self._hub.cache.encoded_size(key.tenant, EntityKind.PROVIDER_KEY, key.id)
        limits.check_snapshot_growth(usage, key.tenant, adding=adding, removing=removing)

    def _check_route_fits(self, route: Route, *, new: bool) -> None:
        size = convert.route_to_proto(route).ByteSize()
        limits.check_route_bytes(size)
        usage = self._hub.cache.usage(route.tenant)
        if new:
            limits.check_room(usage, "routes", route.tenant)
        removing = 0 if new else self._hub.cache.encoded_size(route.tenant, EntityKind.ROUTE, route.id)
        limits.check_snapshot_growth(usage, route.tenant, adding=size + 8, removing=removing)

    def _check_client_key_fits(self, client_key: ClientKey) -> None:
        usage = self._hub.cache.usage(client_key.tenant)
        limits.check_room(usage, "client_keys", client_key.tenant)
        adding = convert.sidecar_client_key_to_proto(client_key).ByteSize() + 8
        limits.check_snapshot_growth(usage, client_key.tenant, adding=adding)

    # tenants -------------------------------------------------------------------
    @map_errors
    @audited("tenant")
    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateTenantResponse:
        name = v.validate_tenant_name(request.name, field="name")
        audit.about(name, name, ("name",))
        new = Tenant(name=name, created_at=self._clock())
        tenant = await audit.write(lambda entry: self._store.create_tenant(new, audit=entry))
        await self._publish()
        log.info("created tenant %s", name)
        return pb.CreateTenantResponse(tenant=convert.tenant_to_proto(tenant))

    @map_errors
    async def GetTenant(self, request: pb.GetTenantRequest, context: Context) -> pb.GetTenantResponse:
        tenant = await self._store.get_tenant(v.validate_tenant_name(request.name, field="name"))
        return pb.GetTenantResponse(tenant=convert.tenant_to_proto(tenant))

    @map_errors
    async def ListTenants(self, request: pb.ListTenantsRequest, context: Context) -> pb.ListTenantsResponse:
        tenants = await self._store.list_tenants()
        return pb.ListTenantsResponse(tenants=[convert.tenant_to_proto(t) for t in tenants])

    @map_errors
    @audited("tenant")
    async def DeleteTenant(
        self, request: pb.DeleteTenantRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteTenantResponse:
        name = v.validate_tenant_name(request.name, field="name")
        audit.about(name, name)
        await audit.write(lambda entry: self._store.delete_tenant(name, audit=entry))
        await self._publish()
        log.info("deleted tenant %s", name)
        return pb.DeleteTenantResponse()

    # provider keys ---------------------------------------------------------------
    def _seal(self, key_id: str, secret: str) -> SealedSecret:
        return SealedSecret(
            ciphertext=self._keys.seal(secret, associated_data=key_id),
            fingerprint=fingerprint(secret),
            last4=last4(secret),
        )

    @map_errors
    @audited("provider_key")
    async def CreateProviderKey(
        self, request: pb.CreateProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _KEY_CREATE_FIELDS)
        provider = v.validate_provider(convert.provider_from_proto(request.provider))
        label = v.validate_label(request.label)
        secret = v.validate_secret(request.secret, provider)
        base_url = v.validate_base_url(request.base_url, provider, policy=self._url_policy)
        weight = v.validate_weight(request.weight)
        limits.check_allowed_models(len(request.allowed_models))
        allowed_models = v.validate_allowed_models(request.allowed_models)
        key_id = new_id(PROVIDER_KEY_PREFIX)
        now = self._clock()
        sealed = self._seal(key_id, secret)
        key = ProviderKey(
            id=key_id,
            tenant=tenant,
            provider=provider,
            label=label,
            base_url=base_url,
            status=KeyStatus.ACTIVE,
            weight=weight,
            allowed_models=allowed_models,
            created_at=now,
            updated_at=now,
            secret_ciphertext=sealed.ciphertext,
            fingerprint=sealed.fingerprint,
            last4=sealed.last4,
        )
        audit.about(tenant, key_id, _KEY_CREATE_FIELDS, sealed.fingerprint)
        self._check_key_fits(key, len(secret), new=True)
        created = await audit.write(lambda entry: self._store.create_provider_key(key, audit=entry))
        await self._publish()
        log.info("created provider key %s (%s) for tenant %s", key_id, provider.value, tenant)
        return pb.CreateProviderKeyResponse(key=convert.provider_key_to_proto(created))

    @map_errors
    async def GetProviderKey(self, request: pb.GetProviderKeyRequest, context: Context) -> pb.GetProviderKeyResponse:
        key = await self._store.get_provider_key(v.validate_tenant_name(request.tenant), v.validate_id(request.id))
        return pb.GetProviderKeyResponse(key=convert.provider_key_to_proto(key))

    @map_errors
    async def ListProviderKeys(
        self, request: pb.ListProviderKeysRequest, context: Context
    ) -> pb.ListProviderKeysResponse:
        keys = await self._store.list_provider_keys(v.validate_tenant_name(request.tenant))
        return pb.ListProviderKeysResponse(keys=[convert.provider_key_to_proto(k) for k in keys])

    @map_errors
    @audited("provider_key")
    async def UpdateProviderKey(
        self, request: pb.UpdateProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.UpdateProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.id)
        audit.about(tenant, key_id)
        paths = _mask(list(request.update_mask.paths), UPDATABLE_KEY_FIELDS)
        audit.fields = tuple(paths) + (("secret",) if request.new_secret else ())
        expected = _expected_revision(request.etag, request.key.etag, resource="key")
        if not paths and not request.new_secret:
            raise InvalidArgument(
                f"nothing to update: name fields in update_mask ({', '.join(UPDATABLE_KEY_FIELDS)}) or set new_secret"
            )
        # Read for the provider only, which never changes; the write below
        # takes nothing else from this read.
        current = await self._store.get_provider_key(tenant, key_id)
        wanted = request.key
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "label":
                changes["label"] = v.validate_label(wanted.label, field="key.label")
            elif path == "status":
                changes["status"] = v.validate_key_status(
                    convert.key_status_from_proto(wanted.status), field="key.status"
                )
            elif path == "weight":
                changes["weight"] = v.validate_weight(wanted.weight, field="key.weight")
            elif path == "allowed_models":
                limits.check_allowed_models(len(wanted.allowed_models), field="key.allowed_models")
                changes["allowed_models"] = v.validate_allowed_models(wanted.allowed_models, field="key.allowed_models")
            elif path == "base_url":
                changes["base_url"] = v.validate_base_url(
                    wanted.base_url, current.provider, field="key.base_url", policy=self._url_policy
                )
        if request.new_secret:
            secret = v.validate_secret(request.new_secret, current.provider, field="new_secret")
            changes["secret"] = self._seal(key_id, secret)
            audit.fingerprint = changes["secret"].fingerprint
        update = ProviderKeyUpdate(updated_at=self._clock(), **changes)
        preview = dataclasses.replace(current, **{name: value for name, value in changes.items() if name != "secret"})
        self._check_key_fits(preview, len(request.new_secret) or v.MAX_SECRET_CHARS, new=False)
        stored = await audit.write(
            lambda entry: self._store.update_provider_key(
                tenant, key_id, update, expected_revision=expected, audit=entry
            )
        )
        await self._publish()
        if changes.get("status") is KeyStatus.ACTIVE or request.new_secret:
            # Re-enabled or rotated: whatever was learnt about the old state is moot.
            await self._reset_key_health(tenant, key_id)
        log.info(
            "updated provider key %s of tenant %s (%s)",
            key_id,
            tenant,
            ", ".join(paths + (["secret"] if request.new_secret else [])),
        )
        return pb.UpdateProviderKeyResponse(key=convert.provider_key_to_proto(stored))

    @map_errors
    @audited("provider_key")
    async def DeleteProviderKey(
        self, request: pb.DeleteProviderKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteProviderKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.id)
        audit.about(tenant, key_id)
        await audit.write(lambda entry: self._store.delete_provider_key(tenant, key_id, audit=entry))
        await self._publish()
        log.info("deleted provider key %s of tenant %s", key_id, tenant)
        return pb.DeleteProviderKeyResponse()

    # routes ------------------------------------------------------------------------
    @map_errors
    @audited("route")
    async def CreateRoute(
        self, request: pb.CreateRouteRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateRouteResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _ROUTE_CREATE_FIELDS)
        public_model = v.validate_public_model(request.public_model)
        targets = _targets(list(request.targets), self._url_policy)
        now = self._clock()
        route = Route(
            id=new_id(ROUTE_PREFIX),
            tenant=tenant,
            public_model=public_model,
            targets=targets,
            created_at=now,
            updated_at=now,
        )
        audit.about(tenant, route.id, _ROUTE_CREATE_FIELDS)
        self._check_route_fits(route, new=True)
        created = await audit.write(lambda entry: self._store.create_route(route, audit=entry))
        await self._publish()
        log.info("created route %s (%s) for tenant %s", route.id, public_model, tenant)
        return pb.CreateRouteResponse(route=convert.route_to_proto(created))

    @map_errors
    async def GetRoute(self, request: pb.GetRouteRequest, context: Context) -> pb.GetRouteResponse:
        route = await self._store.get_route(v.validate_tenant_name(request.tenant), v.validate_id(request.id))
        return pb.GetRouteResponse(route=convert.route_to_proto(route))

    @map_errors
    async def ListRoutes(self, request: pb.ListRoutesRequest, context: Context) -> pb.ListRoutesResponse:
        routes = await self._store.list_routes(v.validate_tenant_name(request.tenant))
        return pb.ListRoutesResponse(routes=[convert.route_to_proto(r) for r in routes])

    @map_errors
    @audited("route")
    async def UpdateRoute(
        self, request: pb.UpdateRouteRequest, context: Context, audit: AuditDraft
    ) -> pb.UpdateRouteResponse:
        tenant = v.validate_tenant_name(request.tenant)
        route_id = v.validate_id(request.id)
        audit.about(tenant, route_id)
        expected = _expected_revision(request.etag, request.route.etag, resource="route")
        paths = _mask(list(request.update_mask.paths), UPDATABLE_ROUTE_FIELDS)
        audit.fields = tuple(paths) or ("targets",)
        if not paths:
            # No mask: replace the targets (what UpdateRoute always did).
            update = RouteUpdate(updated_at=self._clock(), targets=_targets(list(request.targets), self._url_policy))
            paths = ["targets"]
        else:
            if request.targets:
                raise InvalidArgument("targets: with an update_mask, send the new targets in route.targets")
            wanted = request.route
            update = RouteUpdate(
                updated_at=self._clock(),
                targets=_targets(list(wanted.targets), self._url_policy) if "targets" in paths else None,
                public_model=(
                    v.validate_public_model(wanted.public_model, field="route.public_model")
                    if "public_model" in paths
                    else None
                ),
            )
        if update.targets is not None:
            now = update.updated_at
            preview = Route(route_id, tenant, update.public_model or "", update.targets, now, now)
            self._check_route_fits(preview, new=False)
        stored = await audit.write(
            lambda entry: self._store.update_route(tenant, route_id, update, expected_revision=expected, audit=entry)
        )
        await self._publish()
        log.info("updated route %s of tenant %s (%s)", route_id, tenant, ", ".join(paths))
        return pb.UpdateRouteResponse(route=convert.route_to_proto(stored))

    @map_errors
    @audited("route")
    async def DeleteRoute(
        self, request: pb.DeleteRouteRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteRouteResponse:
        tenant = v.validate_tenant_name(request.tenant)
        route_id = v.validate_id(request.id)
        audit.about(tenant, route_id)
        await audit.write(lambda entry: self._store.delete_route(tenant, route_id, audit=entry))
        await self._publish()
        log.info("deleted route %s of tenant %s", route_id, tenant)
        return pb.DeleteRouteResponse()

    # client keys -------------------------------------------------------------------
    @map_errors
    @audited("client_key")
    async def CreateClientKey(
        self, request: pb.CreateClientKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateClientKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _CLIENT_KEY_CREATE_FIELDS)
        label = v.validate_label(request.label)
        token = new_client_token()
        client_key = ClientKey(
            id=new_id(CLIENT_KEY_PREFIX),
            tenant=tenant,
            label=label,
            prefix=token[:10],
            token_sha256=hashlib.sha256(token.encode()).digest(),
            created_at=self._clock(),
        )
        audit.about(tenant, client_key.id, _CLIENT_KEY_CREATE_FIELDS, fingerprint(token))
        self._check_client_key_fits(client_key)
        created = await audit.write(lambda entry: self._store.create_client_key(client_key, audit=entry))
        await self._publish()
        log.info("created client key %s for tenant %s", client_key.id, tenant)
        return pb.CreateClientKeyResponse(client_key=convert.client_key_to_proto(created), token=token)

    @map_errors
    async def ListClientKeys(self, request: pb.ListClientKeysRequest, context: Context) -> pb.ListClientKeysResponse:
        client_keys = await self._store.list_client_keys(v.validate_tenant_name(request.tenant))
        return pb.ListClientKeysResponse(client_keys=[convert.client_key_to_proto(c) for c in client_keys])

    @map_errors
    @audited("client_key")
    async def DeleteClientKey(
        self, request: pb.DeleteClientKeyRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteClientKeyResponse:
        tenant = v.validate_tenant_name(request.tenant)
        client_key_id = v.validate_id(request.id)
        audit.about(tenant, client_key_id)
        await audit.write(lambda entry: self._store.delete_client_key(tenant, client_key_id, audit=entry))
        await self._publish()
        log.info("deleted client key %s of tenant %s", client_key_id, tenant)
        return pb.DeleteClientKeyResponse()

    # health and fleet ----------------------------------------------------------------
    @map_errors
    async def GetHealth(self, request: pb.GetHealthRequest, context: Context) -> pb.GetHealthResponse:
        tenant = v.validate_tenant_name(request.tenant)
        health = self._hub.cache.health(tenant)
        if health is None:
            raise NotFound(f"tenant {tenant!r} not found")
        key_health, provider_health = health
        now = self._clock()

        def current(until: Timestamp | None) -> bool:
            # A cooldown that has run out reads as healthy (half-open).
            return until is None or convert.datetime_from_timestamp(until) > now

        return pb.GetHealthResponse(
            key_health=[h for h in key_health if current(h.until if h.HasField("until") else None)],
            provider_health=[h for h in provider_health if current(h.until if h.HasField("until") else None)],
        )

    @map_errors
    @audited("provider_key")
    async def ResetKeyHealth(
        self, request: pb.ResetKeyHealthRequest, context: Context, audit: AuditDraft
    ) -> pb.ResetKeyHealthResponse:
        tenant = v.validate_tenant_name(request.tenant)
        key_id = v.validate_id(request.key_id, field="key_id")
        audit.about(tenant, key_id, ("health",))
        await self._store.get_provider_key(tenant, key_id)  # NotFound for an unknown tenant or key
        await audit.write(lambda entry: self._reset_key_health(tenant, key_id, entry))
        log.info("reset the health of provider key %s of tenant %s", key_id, tenant)
        return pb.ResetKeyHealthResponse()

    @map_errors
    async def ListSidecars(self, request: pb.ListSidecarsRequest, context: Context) -> pb.ListSidecarsResponse:
        return pb.ListSidecarsResponse(sidecars=[_sidecar_info(i) for i in self._hub.cache.connected()])

    @map_errors
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        return await list_audit_events(self._store, request)


def _sidecar_info(info: SubscriberInfo) -> pb.SidecarInfo:
    return pb.SidecarInfo(
        sidecar_id=info.sidecar_id,
        tenants=sorted(info.tenants) if info.tenants is not None else [],
        peer=info.peer,
        connect_time=convert.timestamp_from_datetime(info.connected_at),
        version=info.version,
    )
