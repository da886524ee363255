"""The admin service's route RPCs: create, get, list, update (targets
and public model by update mask, an optional etag precondition) and delete,
within the configuration caps (control_plane/limits.py)."""

from __future__ import annotations

import logging

from control_plane import admin_requests, limits
from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.node_admin import route_pool, sync_route_nodes
from control_plane.status import map_errors
from control_plane.store.base import RouteUpdate
from keyplane import convert
from keyplane.domain import EntityKind, Route
from keyplane.errors import InvalidArgument
from keyplane.ids import ROUTE_PREFIX, new_id
from keyplane.v1 import admin_service_pb2 as pb

__all__ = ["UPDATABLE_ROUTE_FIELDS", "RouteAdmin"]

log = logging.getLogger("control_plane.admin_service")

UPDATABLE_ROUTE_FIELDS = ("targets", "public_model")
_ROUTE_CREATE_FIELDS = ("public_model", "targets")


class RouteAdmin(AdminBase):
    def _check_route_fits(self, route: Route, *, new: bool) -> None:
        size = convert.route_to_proto(route).ByteSize()
        limits.check_route_bytes(size)
        usage = self._hub.cache.usage(route.tenant)
        if new:
            limits.check_room(usage, "routes", route.tenant)
        removing = 0 if new else self._hub.cache.encoded_size(route.tenant, EntityKind.ROUTE, route.id)
        # Each node URL is also a Node in the snapshot (id, route id, URL, model, state).
        nodes = sum(len(url) + len(model) + 64 for model, url in route_pool(route)) if new else 0
        limits.check_snapshot_growth(usage, route.tenant, adding=size + 8 + nodes, removing=removing)

    @map_errors
    @audited("route")
    async def CreateRoute(
        self, request: pb.CreateRouteRequest, context: Context, audit: AuditDraft
    ) -> pb.CreateRouteResponse:
        tenant = v.validate_tenant_name(request.tenant)
        audit.about(tenant, "", _ROUTE_CREATE_FIELDS)
        public_model = v.validate_public_model(request.public_model)
        targets = admin_requests.route_targets(list(request.targets), self._url_policy)
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
        await sync_route_nodes(self._store, created, now)
        version = await self._publish()
        log.info("created route %s (%s) for tenant %s", route.id, public_model, tenant)
        return pb.CreateRouteResponse(route=convert.route_to_proto(created), version=version)

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
        expected = admin_requests.expected_revision(request.etag, request.route.etag, resource="route")
        paths = admin_requests.update_paths(list(request.update_mask.paths), UPDATABLE_ROUTE_FIELDS)
        audit.fields = tuple(paths) or ("targets",)
        policy = self._url_policy
        if not paths:
            # No mask: replace the targets (what UpdateRoute always did).
            update = RouteUpdate(
                updated_at=self._clock(), targets=admin_requests.route_targets(list(request.targets), policy)
            )
            paths = ["targets"]
        else:
            if request.targets:
                raise InvalidArgument("targets: with an update_mask, send the new targets in route.targets")
            wanted = request.route
            update = RouteUpdate(
                updated_at=self._clock(),
                targets=admin_requests.route_targets(list(wanted.targets), policy) if "targets" in paths else None,
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
        await sync_route_nodes(self._store, stored, update.updated_at)
        version = await self._publish()
        log.info("updated route %s of tenant %s (%s)", route_id, tenant, ", ".join(paths))
        return pb.UpdateRouteResponse(route=convert.route_to_proto(stored), version=version)

    @map_errors
    @audited("route")
    async def DeleteRoute(
        self, request: pb.DeleteRouteRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteRouteResponse:
        tenant = v.validate_tenant_name(request.tenant)
        route_id = v.validate_id(request.id)
        audit.about(tenant, route_id)
        await audit.write(lambda entry: self._store.delete_route(tenant, route_id, audit=entry))
        version = await self._publish()
        log.info("deleted route %s of tenant %s", route_id, tenant)
        return pb.DeleteRouteResponse(version=version)
