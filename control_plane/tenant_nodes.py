"""A tenant's nodes as the snapshot cache holds them (affinity, issue 14):
ACTIVE and DRAINING nodes by id and the non-healthy health of those nodes,
in the form Watch sends them."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyplane.v1 import resources_pb2

__all__ = ["TenantNodes"]


@dataclass(slots=True)
class TenantNodes:
    nodes: dict[str, resources_pb2.Node] = field(default_factory=dict)
    health: dict[str, resources_pb2.NodeHealth] = field(default_factory=dict)

    def put(self, node: resources_pb2.Node) -> None:
        """A REMOVED node is forgotten, with its health."""
        if node.state == resources_pb2.NODE_STATE_REMOVED:
            self.nodes.pop(node.id, None)
            self.health.pop(node.id, None)
        else:
            self.nodes[node.id] = node

    def put_health(self, health: resources_pb2.NodeHealth) -> None:
        if health.state == resources_pb2.HEALTH_STATE_HEALTHY:
            self.health.pop(health.node_id, None)
        elif health.node_id in self.nodes:
            self.health[health.node_id] = health

    def drop_route(self, route_id: str) -> None:
        """A deleted route's nodes went with it (no change row each)."""
        for node_id in [n for n, node in self.nodes.items() if node.route_id == route_id]:
            del self.nodes[node_id]
            self.health.pop(node_id, None)

    def of_route(self, route_id: str) -> list[resources_pb2.Node]:
        return [n for n in self.nodes.values() if n.route_id == route_id]

    def sorted_health(self) -> list[resources_pb2.NodeHealth]:
        return [self.health[k] for k in sorted(self.health)]
