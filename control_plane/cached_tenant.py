"""One tenant as the snapshot cache (``control_plane.snapshot_cache``) holds it.

``TenantContents`` is a tenant as loaded from the store; ``CachedTenant`` is
what the cache keeps of it in memory, moved one change at a time, with its
``TenantState`` message for snapshots. Learnt health is kept the same way:
only entries that are not healthy stay; a change to HEALTHY means "forget any
earlier entry"; a deleted key's health goes with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from control_plane.tenant_nodes import TenantNodes
from keyplane import convert
from keyplane.domain import key_health_entity_id, provider_health_entity_id
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["CachedTenant", "TenantContents"]


@dataclass(slots=True)
class CachedTenant:
    """One tenant as sidecars get it, moved one change at a time; its ``TenantState``
    message is built once and kept until the next change."""

    keys: dict[str, sidecar_service_pb2.SidecarProviderKey] = field(default_factory=dict)
    routes: dict[str, resources_pb2.Route] = field(default_factory=dict)
    client_keys: dict[str, sidecar_service_pb2.SidecarClientKey] = field(default_factory=dict)
    # Only entries that are not healthy, by change-log entity id.
    key_health: dict[str, resources_pb2.KeyHealth] = field(default_factory=dict)
    provider_health: dict[str, resources_pb2.ProviderHealth] = field(default_factory=dict)
    nodes: TenantNodes = field(default_factory=TenantNodes)  # affinity
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
                nodes=list(self.nodes.nodes.values()),
                node_health=self.nodes.sorted_health(),
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

    def apply(self, change: sidecar_service_pb2.Change) -> None:
        """Fold in one change to its keys, routes, client keys, health or nodes (a change
        to the tenant itself is the cache's)."""
        self.cached = None
        which = change.WhichOneof("change")
        if which == "key_put":
            self.keys[change.key_put.id] = change.key_put
        elif which == "key_deleted":
            self.drop_key(change.key_deleted)
        elif which == "route_put":
            self.routes[change.route_put.id] = change.route_put
        elif which == "route_deleted":
            self.routes.pop(change.route_deleted, None)
            self.nodes.drop_route(change.route_deleted)
        elif which == "client_key_put":
            self.client_keys[change.client_key_put.id] = change.client_key_put
        elif which == "client_key_deleted":
            self.client_keys.pop(change.client_key_deleted, None)
        elif which == "key_health":
            self.put_key_health(change.key_health)
        elif which == "provider_health":
            self.put_provider_health(change.provider_health)
        elif which == "node_put":
            self.nodes.put(change.node_put)
        elif which == "node_health":
            self.nodes.put_health(change.node_health)


@dataclass(frozen=True, slots=True)
class TenantContents:
    """One tenant as loaded from the store, in the form sidecars get it."""

    keys: tuple[sidecar_service_pb2.SidecarProviderKey, ...] = ()
    routes: tuple[resources_pb2.Route, ...] = ()
    client_keys: tuple[sidecar_service_pb2.SidecarClientKey, ...] = ()
    key_health: tuple[resources_pb2.KeyHealth, ...] = ()
    provider_health: tuple[resources_pb2.ProviderHealth, ...] = ()
    nodes: tuple[resources_pb2.Node, ...] = ()
    node_health: tuple[resources_pb2.NodeHealth, ...] = ()

    def to_state(self) -> CachedTenant:
        state = CachedTenant()
        state.keys = {k.id: k for k in self.keys}
        state.routes = {r.id: r for r in self.routes}
        state.client_keys = {c.id: c for c in self.client_keys}
        for key_health in self.key_health:
            state.put_key_health(key_health)
        for provider_health in self.provider_health:
            state.put_provider_health(provider_health)
        for node in self.nodes:
            state.nodes.put(node)
        for node_health in self.node_health:
            state.nodes.put_health(node_health)
        return state
