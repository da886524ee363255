"""Affinity objects (keyplane.affinity) to and from their protos."""

from __future__ import annotations

from keyplane.affinity import Binding, BindingKey, NodeHealth, NodeState, SelfHostedNode
from keyplane.convert import etag_from_revision, health_state_to_proto, timestamp_from_datetime
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = [
    "binding_ref_to_proto",
    "binding_to_proto",
    "node_health_to_proto",
    "node_state_from_proto",
    "node_state_to_proto",
    "node_to_proto",
    "sidecar_node_to_proto",
]

_STATES = {
    NodeState.ACTIVE: resources_pb2.NODE_STATE_ACTIVE,
    NodeState.DRAINING: resources_pb2.NODE_STATE_DRAINING,
    NodeState.REMOVED: resources_pb2.NODE_STATE_REMOVED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}


def node_state_to_proto(state: NodeState) -> resources_pb2.NodeState.ValueType:
    return _STATES[state]


def node_state_from_proto(state: resources_pb2.NodeState.ValueType) -> NodeState | None:
    return _STATES_BACK.get(state)


def node_to_proto(node: SelfHostedNode) -> resources_pb2.Node:
    return resources_pb2.Node(
        id=node.id,
        tenant=node.tenant,
        route_id=node.route_id,
        url=node.url,
        upstream_model=node.upstream_model,
        state=_STATES[node.state],
        from_route=node.from_route,
        create_time=timestamp_from_datetime(node.created_at),
        update_time=timestamp_from_datetime(node.updated_at),
        etag=etag_from_revision(node.revision),
    )


def sidecar_node_to_proto(node: SelfHostedNode) -> resources_pb2.Node:
    """A node as Watch sends it: what a sidecar routes by, nothing more
    (every byte counts against the tenant's snapshot cap)."""
    return resources_pb2.Node(
        id=node.id, route_id=node.route_id, url=node.url, upstream_model=node.upstream_model, state=_STATES[node.state]
    )


def node_health_to_proto(health: NodeHealth) -> resources_pb2.NodeHealth:
    message = resources_pb2.NodeHealth(
        node_id=health.node_id,
        state=health_state_to_proto(health.state),
        reason=health.reason,
        update_time=timestamp_from_datetime(health.updated_at),
    )
    if health.until is not None:
        message.until.CopyFrom(timestamp_from_datetime(health.until))
    return message


def binding_to_proto(binding: Binding) -> resources_pb2.Binding:
    return resources_pb2.Binding(
        tenant=binding.key.tenant,
        client_key_id=binding.key.client_key_id,
        public_model=binding.key.public_model,
        node_id=binding.node_id,
        node_url=binding.node_url,
        create_time=timestamp_from_datetime(binding.created_at),
        update_time=timestamp_from_datetime(binding.updated_at),
        expire_time=timestamp_from_datetime(binding.expires_at),
        moves=binding.moves,
    )


def binding_ref_to_proto(key: BindingKey, node_id: str) -> sidecar_service_pb2.BindingRef:
    return sidecar_service_pb2.BindingRef(
        tenant=key.tenant, client_key_id=key.client_key_id, public_model=key.public_model, node_id=node_id
    )
