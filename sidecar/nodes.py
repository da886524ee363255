"""Self-hosted nodes (vLLM and alike) as the sidecar sees them: state and health.

The watch stream carries each tenant's ACTIVE and DRAINING nodes
(``TenantState.nodes``, ``Change.node_put``; a REMOVED node is a put with that
state) and their learnt health (``node_health``: only entries that are not
healthy; a pushed HEALTHY clears). Beside the pushed health, this sidecar's
own findings: a node whose attempt failed with an upstream error (connect
error, timeout before the first byte, 5xx) is kept out locally for
``local_cooldown`` seconds, at once, before any round trip.

Which nodes a request may use:

- bound traffic (a request following its affinity binding): the node is
  ACTIVE or DRAINING (a draining node keeps its bindings until they expire)
  and healthy;
- unbound traffic (a new binding, or the normal strategy): ACTIVE and healthy.

Pure: wall-clock epoch seconds are passed in. Mutated only on the event loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from keyplane.v1 import resources_pb2

__all__ = ["DEFAULT_LOCAL_COOLDOWN", "NodeView", "TenantNodes", "node_id_for", "node_view_from_proto"]

DEFAULT_LOCAL_COOLDOWN = 10.0

_ACTIVE = resources_pb2.NODE_STATE_ACTIVE
_DRAINING = resources_pb2.NODE_STATE_DRAINING
_HEALTHY = resources_pb2.HEALTH_STATE_HEALTHY


def node_id_for(route_id: str, url: str) -> str:
    """A node's stable id, as the control plane derives it (``resources.proto`` Node)."""
    return "nd_" + hashlib.sha256(f"{route_id}\n{url}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class NodeView:
    id: str
    route_id: str
    url: str
    upstream_model: str
    # False: draining (keeps its bindings until they expire, takes no new traffic).
    active: bool


def node_view_from_proto(msg: resources_pb2.Node) -> NodeView | None:
    """None for a node that serves nothing (REMOVED, or a state this build does not know)."""
    if msg.state not in (_ACTIVE, _DRAINING) or not msg.id:
        return None
    return NodeView(
        id=msg.id,
        route_id=msg.route_id,
        url=msg.url.rstrip("/"),
        upstream_model=msg.upstream_model,
        active=msg.state == _ACTIVE,
    )


class TenantNodes:
    """One tenant's nodes, their pushed health and this sidecar's own findings."""

    __slots__ = ("_by_target", "_local", "_nodes", "_pushed", "local_cooldown")

    def __init__(self, local_cooldown: float | None = None) -> None:
        self.local_cooldown = DEFAULT_LOCAL_COOLDOWN if local_cooldown is None else local_cooldown
        self._nodes: dict[str, NodeView] = {}
        # (route id, upstream model) -> its nodes by id order; rebuilt on change.
        self._by_target: dict[tuple[str, str], tuple[NodeView, ...]] = {}
        # node id -> until (epoch seconds; None: until told otherwise)
        self._pushed: dict[str, float | None] = {}
        self._local: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    # --- what the watch stream drives ---------------------------------------------

    def replace(self, nodes: Iterable[resources_pb2.Node], health: Iterable[resources_pb2.NodeHealth]) -> None:
        """A snapshot: exactly these nodes and pushed health; local findings start over."""
        self._nodes = {v.id: v for v in map(node_view_from_proto, nodes) if v is not None}
        self._pushed = {}
        self._local = {}
        for entry in health:
            self.apply_health(entry)
        self._rebuild()

    def put(self, msg: resources_pb2.Node) -> None:
        view = node_view_from_proto(msg)
        if view is None:
            self._nodes.pop(msg.id, None)
            self._pushed.pop(msg.id, None)
            self._local.pop(msg.id, None)
        else:
            self._nodes[view.id] = view
        self._rebuild()

    def apply_health(self, msg: resources_pb2.NodeHealth) -> None:
        if not msg.node_id:
            return
        if msg.state == _HEALTHY:
            self._pushed.pop(msg.node_id, None)
            self._local.pop(msg.node_id, None)
            return
        self._pushed[msg.node_id] = msg.until.ToNanoseconds() / 1e9 if msg.HasField("until") else None

    def _rebuild(self) -> None:
        by: dict[tuple[str, str], list[NodeView]] = {}
        for view in sorted(self._nodes.values(), key=lambda v: v.id):
            by.setdefault((view.route_id, view.upstream_model), []).append(view)
        self._by_target = {k: tuple(v) for k, v in by.items()}

    # --- this sidecar's findings ----------------------------------------------------

    def failed(self, node_id: str, now: float) -> None:
        """An attempt to the node failed with an upstream error: keep it out for a while."""
        if node_id in self._nodes:
            self._local[node_id] = now + self.local_cooldown

    # --- reads (request path) ---------------------------------------------------------

    def node(self, node_id: str) -> NodeView | None:
        return self._nodes.get(node_id)

    def of_target(self, route_id: str, upstream_model: str) -> tuple[NodeView, ...]:
        return self._by_target.get((route_id, upstream_model), ())

    def healthy(self, node_id: str, now: float) -> bool:
        local = self._local.get(node_id)
        if local is not None:
            if local > now:
                return False
            del self._local[node_id]
        if node_id in self._pushed:
            until = self._pushed[node_id]
            return until is not None and until <= now
        return True

    def bound_usable(self, node_id: str, now: float) -> bool:
        """Whether a request may follow a binding to the node (ACTIVE or DRAINING, healthy)."""
        return node_id in self._nodes and self.healthy(node_id, now)

    def usable(self, node_id: str, now: float) -> bool:
        """Whether the node may take unbound traffic (ACTIVE, healthy)."""
        view = self._nodes.get(node_id)
        return view is not None and view.active and self.healthy(node_id, now)
