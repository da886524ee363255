"""The admin service's affinity RPCs (issue 14): nodes of vllm targets (add,
drain, remove, list) and bindings (list, delete, stats).

Nodes of a target's node_urls are kept in step with the route by
``sync_route_nodes`` (called after every route write and at start); AddNode
adds more. Every write is audited and published like the other resources.
Log lines name nodes and tenants, never a client key id with a model name.
"""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime

from control_plane import admin_requests, limits
from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from control_plane.store.base import BindingFilter, Store
from keyplane import affinity_convert
from keyplane.affinity import NodeState, SelfHostedNode, node_id_for
from keyplane.domain import Provider, Route
from keyplane.errors import FailedPrecondition, InvalidArgument
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import resources_pb2

__all__ = ["NodeAdmin", "route_pool", "sync_route_nodes"]

log = logging.getLogger("control_plane.admin_service")

_MAX_PAGE = 1000
_DEFAULT_PAGE = 100


def route_pool(route: Route) -> list[tuple[str, str]]:
    """(upstream model, node URL) of every node URL of the route's vllm targets."""
    return [(t.upstream_model, url) for t in route.targets if t.provider is Provider.VLLM for url in t.node_urls]


async def sync_route_nodes(store: Store, route: Route, now: datetime) -> list[int]:
    return await store.sync_route_nodes(route.tenant, route.id, route_pool(route), now)


async def sync_all_nodes(store: Store, now: datetime) -> int:
    """At start: every route's node_urls have their nodes (routes written
    before nodes existed, or by a replica that crashed before syncing).
    Returns the number of changes logged."""
    logged = 0
    for tenant in await store.list_tenants():
        for route in await store.list_routes(tenant.name):
            logged += len(await sync_route_nodes(store, route, now))
    return logged


def _page_token(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        client_key_id, sep, public_model = base64.urlsafe_b64decode(token.encode()).decode().partition("\n")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not a token this API returned") from None
    if not sep:
        raise InvalidArgument("page_token is not a token this API returned")
    return client_key_id, public_model


def _next_token(client_key_id: str, public_model: str) -> str:
    return base64.urlsafe_b64encode(f"{client_key_id}\n{public_model}".encode()).decode()


class NodeAdmin(AdminBase):
    async def _node_proto(self, node: SelfHostedNode) -> resources_pb2.Node:
        message = affinity_convert.node_to_proto(node)
        health = await self._store.get_node_health(node.tenant, node.id)
        if health is not None:
            message.health.CopyFrom(affinity_convert.node_health_to_proto(health))
        return message

    @map_errors
    @audited("node")
    async def AddNode(self, request: pb.AddNodeRequest, context: Context, audit: AuditDraft) -> pb.AddNodeResponse:
        tenant = v.validate_tenant_name(request.tenant)
        route_id = v.validate_id(request.route_id, field="route_id")
        url = v.validate_url(request.url, field="url")
        self._url_policy.check(url, field="url")
        node_id = node_id_for(route_id, url)
        audit.about(tenant, node_id, ("url",))
        route = await self._store.get_route(tenant, route_id)
        targets = [t for t in route.targets if t.provider is Provider.VLLM]
        if request.upstream_model:
            targets = [t for t in targets if t.upstream_model == request.upstream_model]
        if not targets:
            which = " with that upstream_model" if request.upstream_model else ""
            raise FailedPrecondition(f"route {route_id!r} has no vllm target{which}")
        if len(await self._store.list_nodes(tenant, route_id)) >= limits.MAX_NODE_URLS_PER_TARGET * len(targets):
            raise InvalidArgument(f"route {route_id!r} already has the most nodes a route may have")
        now = self._clock()
        node = SelfHostedNode(
            node_id, tenant, route_id, url, targets[0].upstream_model, NodeState.ACTIVE, False, now, now
        )
        stored, changed = await audit.write(lambda entry: self._store.add_node(node, audit=entry))
        version = await self._publish()
        if changed is not None:
            log.info("added node %s (%s) to route %s of tenant %s", node_id, url, route_id, tenant)
        return pb.AddNodeResponse(node=await self._node_proto(stored), version=version)

    async def _set_state(
        self, request: pb.DrainNodeRequest | pb.RemoveNodeRequest, audit: AuditDraft, state: NodeState
    ) -> tuple[SelfHostedNode, int, int]:
        tenant = v.validate_tenant_name(request.tenant)
        node_id = v.validate_id(request.id)
        audit.about(tenant, node_id, ("state",))
        expected = admin_requests.expected_revision(request.etag, "", resource="node")
        now = self._clock()
        node, deleted, _ = await audit.write(
            lambda entry: self._store.set_node_state(
                tenant, node_id, state, now, expected_revision=expected, audit=entry
            )
        )
        version = await self._publish()
        log.info("node %s of tenant %s is %s (%d bindings deleted)", node_id, tenant, state.value, deleted)
        return node, deleted, version

    @map_errors
    @audited("node")
    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: Context, audit: AuditDraft
    ) -> pb.DrainNodeResponse:
        node, _, version = await self._set_state(request, audit, NodeState.DRAINING)
        return pb.DrainNodeResponse(node=await self._node_proto(node), version=version)

    @map_errors
    @audited("node")
    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: Context, audit: AuditDraft
    ) -> pb.RemoveNodeResponse:
        node, deleted, version = await self._set_state(request, audit, NodeState.REMOVED)
        return pb.RemoveNodeResponse(node=await self._node_proto(node), version=version, bindings_deleted=deleted)

    @map_errors
    async def ListNodes(self, request: pb.ListNodesRequest, context: Context) -> pb.ListNodesResponse:
        tenant = v.validate_tenant_name(request.tenant)
        route_id = v.validate_id(request.route_id, field="route_id") if request.route_id else ""
        nodes = await self._store.list_nodes(tenant, route_id, include_removed=request.show_removed)
        health = {h.node_id: h for h in await self._store.list_node_health(tenant)}
        counts = await self._store.count_bindings(tenant, self._clock())
        messages = []
        for node in nodes:
            message = affinity_convert.node_to_proto(node)
            if node.id in health:
                message.health.CopyFrom(affinity_convert.node_health_to_proto(health[node.id]))
            messages.append(message)
        return pb.ListNodesResponse(
            nodes=messages,
            binding_counts=[pb.NodeBindingCount(node_id=n.id, bindings=counts.get(n.id, 0)) for n in nodes],
        )

    @map_errors
    async def ListBindings(self, request: pb.ListBindingsRequest, context: Context) -> pb.ListBindingsResponse:
        where = _filter(request)
        size = request.page_size if request.page_size > 0 else _DEFAULT_PAGE
        size = min(size, _MAX_PAGE)
        rows = await self._store.list_bindings(where, after=_page_token(request.page_token), limit=size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = _next_token(rows[-1].key.client_key_id, rows[-1].key.public_model)
        return pb.ListBindingsResponse(
            bindings=[affinity_convert.binding_to_proto(b) for b in rows], next_page_token=token
        )

    @map_errors
    @audited("binding")
    async def DeleteBindings(
        self, request: pb.DeleteBindingsRequest, context: Context, audit: AuditDraft
    ) -> pb.DeleteBindingsResponse:
        where = _filter(request)
        if not (where.client_key_id or where.public_model or where.node_id):
            raise InvalidArgument("name a client_key_id, public_model or node_id (or several)")
        audit.about(where.tenant, where.node_id or where.client_key_id, ("bindings",))
        deleted, _ = await audit.write(lambda entry: self._store.delete_bindings(where, audit=entry))
        version = await self._publish()
        log.info("deleted %d bindings of tenant %s", deleted, where.tenant)
        return pb.DeleteBindingsResponse(deleted=deleted, version=version)

    @map_errors
    async def GetBindingStats(self, request: pb.GetBindingStatsRequest, context: Context) -> pb.GetBindingStatsResponse:
        tenant = v.validate_tenant_name(request.tenant)
        live = sum((await self._store.count_bindings(tenant, self._clock())).values())
        if self._affinity is None:
            return pb.GetBindingStatsResponse(bindings=live)
        stats = self._affinity.stats(tenant)
        return pb.GetBindingStatsResponse(
            bindings=live,
            hits=stats.hits,
            misses=stats.misses,
            created=stats.created,
            moves=stats.moves,
            sidecar_hits=stats.sidecar_hits,
            overrides=stats.overrides,
            fallbacks=stats.fallbacks,
            swept=self._affinity.swept,
        )


def _filter(request: pb.ListBindingsRequest | pb.DeleteBindingsRequest) -> BindingFilter:
    tenant = v.validate_tenant_name(request.tenant)
    for name in ("client_key_id", "node_id"):
        value = getattr(request, name)
        if value:
            v.validate_id(value, field=name)
    if request.public_model:
        v.validate_public_model(request.public_model)
    return BindingFilter(tenant, request.client_key_id, request.public_model, request.node_id)
