"""The admin gRPC service, assembled from one part per resource: tenants,
learnt health, connected sidecars and the audit log here; provider keys
(``key_admin``), routes (``route_admin``), client keys
(``client_key_admin``), API tokens (``token_service``), master keys
(``master_key_admin``) and prices and usage (``usage_admin``) in their own modules, all on ``AdminBase``.

Every write is audited (``control_plane.audit``): its event (caller, method,
resource, changed fields, never a secret) is written in the write's own
transaction, and a failed attempt is recorded with its status code. Every
write goes to the store first; once it returns, ``hub.catch_up()``
publishes the change to the sidecar streams before the RPC answers.

Health is read from the hub's memory (what the sidecars were told), never
from the store. An update that carries an etag (AIP-154; the request's
``etag``, else the resource's) is a compare-and-set in the store and fails
with ABORTED when the object changed since that etag was read.
"""

from __future__ import annotations

import logging

from google.protobuf.timestamp_pb2 import Timestamp

from control_plane import validation as v
from control_plane.admin_base import Context
from control_plane.audit import AuditDraft, audited, list_audit_events
from control_plane.client_key_admin import CLIENT_TOKEN_PREFIX, ClientKeyAdmin, new_client_token
from control_plane.key_admin import UPDATABLE_KEY_FIELDS, ProviderKeyAdmin
from control_plane.limits_admin import LimitsAdmin
from control_plane.master_key_admin import MasterKeyAdmin
from control_plane.node_admin import NodeAdmin
from control_plane.proxy_status_admin import ProxyStatusAdmin
from control_plane.route_admin import UPDATABLE_ROUTE_FIELDS, RouteAdmin
from control_plane.snapshot_cache import SubscriberInfo
from control_plane.status import map_errors
from control_plane.token_service import TokenAdminMixin
from control_plane.usage_admin import UsageAdmin
from keyplane import convert
from keyplane.domain import Tenant
from keyplane.errors import NotFound
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import admin_service_pb2_grpc

__all__ = [
    "CLIENT_TOKEN_PREFIX",
    "UPDATABLE_KEY_FIELDS",
    "UPDATABLE_ROUTE_FIELDS",
    "AdminService",
    "new_client_token",
]

log = logging.getLogger(__name__)


class AdminService(
    ProviderKeyAdmin,
    RouteAdmin,
    ClientKeyAdmin,
    TokenAdminMixin,
    MasterKeyAdmin,
    ProxyStatusAdmin,
    NodeAdmin,
    LimitsAdmin,
    UsageAdmin,
    admin_service_pb2_grpc.AdminServiceServicer,
):
    """``AdminService(store, hub, master_keys, clock, health=..., url_policy=..., fleet=...)``
    (the constructor is ``AdminBase``'s)."""

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
        version = await self._publish()
        log.info("created tenant %s", name)
        return pb.CreateTenantResponse(tenant=convert.tenant_to_proto(tenant), version=version)

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
        version = await self._publish()
        log.info("deleted tenant %s", name)
        return pb.DeleteTenantResponse(version=version)

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
    async def ListSidecars(self, request: pb.ListSidecarsRequest, context: Context) -> pb.ListSidecarsResponse:
        return pb.ListSidecarsResponse(sidecars=[_sidecar_info(i) for i in self._hub.cache.connected()])

    @map_errors
    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        return await list_audit_events(self._store, request)


def _sidecar_info(info: SubscriberInfo) -> pb.SidecarInfo:
    return pb.SidecarInfo(
        sidecar_id=info.sidecar_id,
        tenants=sorted(info.tenants) if info.tenants is not None else [],
        all_tenants=info.tenants is None,
        peer=info.peer,
        connect_time=convert.timestamp_from_datetime(info.connected_at),
        version=info.version,
    )
