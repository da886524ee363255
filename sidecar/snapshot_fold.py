"""What the sidecar applied, folded back into one snapshot message (pure, no I/O).

``SnapshotFold`` sees every watch message the sidecar applied, in order, and
keeps each tenant's keys, routes, client keys and not-healthy health entries
as protos, the way ``SidecarState`` applies them: a snapshot replaces
everything, a delta patches it (changes already held are skipped, as on a
resume overlap). ``response()`` is the equivalent full snapshot at the held
version: what the sidecar persists, and what it applies again on a restart
to get the same state back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["SnapshotFold"]

_HEALTHY = resources_pb2.HEALTH_STATE_HEALTHY


@dataclass(slots=True)
class _Tenant:
    keys: dict[str, sidecar_service_pb2.SidecarProviderKey] = field(default_factory=dict)
    routes: dict[str, resources_pb2.Route] = field(default_factory=dict)
    client_keys: dict[str, sidecar_service_pb2.SidecarClientKey] = field(default_factory=dict)
    key_health: dict[tuple[str, str], resources_pb2.KeyHealth] = field(default_factory=dict)
    provider_health: dict[tuple[int, str], resources_pb2.ProviderHealth] = field(default_factory=dict)
    # Self-hosted nodes (ACTIVE or DRAINING) and their not-healthy health (``sidecar.nodes``).
    nodes: dict[str, resources_pb2.Node] = field(default_factory=dict)
    node_health: dict[str, resources_pb2.NodeHealth] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, ts: sidecar_service_pb2.TenantState) -> _Tenant:
        tenant = cls(
            keys={k.id: k for k in ts.keys},
            routes={r.id: r for r in ts.routes},
            client_keys={c.id: c for c in ts.client_keys},
        )
        for kh in ts.key_health:
            tenant.put_key_health(kh)
        for ph in ts.provider_health:
            tenant.put_provider_health(ph)
        for node in ts.nodes:
            tenant.put_node(node)
        for nh in ts.node_health:
            tenant.put_node_health(nh)
        return tenant

    def to_proto(self, name: str) -> sidecar_service_pb2.TenantState:
        return sidecar_service_pb2.TenantState(
            tenant=name,
            keys=[self.keys[k] for k in sorted(self.keys)],
            routes=[self.routes[r] for r in sorted(self.routes)],
            client_keys=[self.client_keys[c] for c in sorted(self.client_keys)],
            key_health=[self.key_health[k] for k in sorted(self.key_health)],
            provider_health=[self.provider_health[p] for p in sorted(self.provider_health)],
            nodes=[self.nodes[n] for n in sorted(self.nodes)],
            node_health=[self.node_health[n] for n in sorted(self.node_health)],
        )

    def put_node(self, node: resources_pb2.Node) -> None:
        if node.state in (resources_pb2.NODE_STATE_ACTIVE, resources_pb2.NODE_STATE_DRAINING):
            self.nodes[node.id] = node
        else:  # removed: forgotten, with its health
            self.nodes.pop(node.id, None)
            self.node_health.pop(node.id, None)

    def put_node_health(self, health: resources_pb2.NodeHealth) -> None:
        if health.state == _HEALTHY:
            self.node_health.pop(health.node_id, None)
        else:
            self.node_health[health.node_id] = health

    def put_key_health(self, health: resources_pb2.KeyHealth) -> None:
        # As the control plane's cache keeps it: HEALTHY forgets that one scope.
        scope = (health.key_id, health.model)
        if health.state == _HEALTHY:
            self.key_health.pop(scope, None)
        elif health.key_id in self.keys:
            self.key_health[scope] = health

    def put_provider_health(self, health: resources_pb2.ProviderHealth) -> None:
        scope = (int(health.provider), health.model)
        if health.state == _HEALTHY:
            self.provider_health.pop(scope, None)
        else:
            self.provider_health[scope] = health

    def drop_key(self, key_id: str) -> None:
        self.keys.pop(key_id, None)
        for found in [s for s in self.key_health if s[0] == key_id]:
            del self.key_health[found]


class SnapshotFold:
    """The applied watch messages, as one snapshot; ``version`` 0 until the first snapshot."""

    __slots__ = ("_has_snapshot", "_tenants", "_version")

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._version = 0
        self._has_snapshot = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def has_snapshot(self) -> bool:
        return self._has_snapshot

    def apply(self, message: sidecar_service_pb2.WatchResponse) -> None:
        """Fold one message that ``SidecarState.apply`` accepted."""
        kind = message.WhichOneof("payload")
        if kind == "snapshot":
            self._tenants = {ts.tenant: _Tenant.from_proto(ts) for ts in message.snapshot.tenants}
            self._version = message.version
            self._has_snapshot = True
        elif kind == "delta":
            for change in message.delta.changes:
                if change.version and change.version <= self._version:
                    continue
                self._apply_change(change)
            self._version = max(self._version, message.version)

    def _apply_change(self, change: sidecar_service_pb2.Change) -> None:
        which = change.WhichOneof("change")
        if which == "tenant_deleted":
            self._tenants.pop(change.tenant, None)
            return
        tenant = self._tenants.get(change.tenant)
        if tenant is None:
            tenant = self._tenants[change.tenant] = _Tenant()
        if which == "key_put":
            tenant.keys[change.key_put.id] = change.key_put
        elif which == "key_deleted":
            tenant.drop_key(change.key_deleted)
        elif which == "route_put":
            tenant.routes[change.route_put.id] = change.route_put
        elif which == "route_deleted":
            tenant.routes.pop(change.route_deleted, None)
        elif which == "client_key_put":
            tenant.client_keys[change.client_key_put.id] = change.client_key_put
        elif which == "client_key_deleted":
            tenant.client_keys.pop(change.client_key_deleted, None)
        elif which == "key_health":
            tenant.put_key_health(change.key_health)
        elif which == "provider_health":
            tenant.put_provider_health(change.provider_health)
        elif which == "node_put":
            tenant.put_node(change.node_put)
        elif which == "node_health":
            tenant.put_node_health(change.node_health)

    def response(self, tenants: frozenset[str] | None = None) -> sidecar_service_pb2.WatchResponse:
        """The full snapshot at ``version`` (only ``tenants`` when given)."""
        names = sorted(n for n in self._tenants if tenants is None or n in tenants)
        snapshot = sidecar_service_pb2.Snapshot(tenants=[self._tenants[n].to_proto(n) for n in names])
        return sidecar_service_pb2.WatchResponse(version=self._version, snapshot=snapshot)
