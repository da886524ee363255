"""The Watch changes of affinity's change-log rows (kinds NODE, NODE_HEALTH,
BINDING), re-read from the store like every other change: ``node_put``
(REMOVED nodes included: sidecars forget them and their bindings),
``node_health`` (an absent entry is HEALTHY), ``binding_put`` for a moved
binding and ``binding_deleted`` for a deleted one."""

from __future__ import annotations

from control_plane.store.base import Store
from keyplane import affinity_convert, convert
from keyplane.affinity import BindingKey, split_binding_entity_id
from keyplane.domain import ChangeOp, ChangeRecord, EntityKind
from keyplane.errors import NotFound
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = ["AFFINITY_KINDS", "read_affinity_change"]

AFFINITY_KINDS = frozenset({EntityKind.NODE, EntityKind.NODE_HEALTH, EntityKind.BINDING})


async def read_affinity_change(
    store: Store, record: ChangeRecord, base: sidecar_service_pb2.Change
) -> sidecar_service_pb2.Change | None:
    """``base`` filled with the change ``record`` stands for; None when the
    entity is gone (a later change says so)."""
    if record.kind is EntityKind.NODE:
        try:
            node = await store.get_node(record.tenant, record.entity_id)
        except NotFound:
            return None
        base.node_put.CopyFrom(affinity_convert.sidecar_node_to_proto(node))
        return base
    if record.kind is EntityKind.NODE_HEALTH:
        health = None
        if record.op is ChangeOp.PUT:
            health = await store.get_node_health(record.tenant, record.entity_id)
        if health is None:
            base.node_health.CopyFrom(
                resources_pb2.NodeHealth(
                    node_id=record.entity_id,
                    state=resources_pb2.HEALTH_STATE_HEALTHY,
                    update_time=convert.timestamp_from_datetime(record.created_at),
                )
            )
        else:
            base.node_health.CopyFrom(affinity_convert.node_health_to_proto(health))
        return base
    client_key_id, public_model = split_binding_entity_id(record.entity_id)
    key = BindingKey(record.tenant, client_key_id, public_model)
    view = None if record.op is ChangeOp.DELETE else await store.find_binding(key)
    if view is None:
        base.binding_deleted.CopyFrom(affinity_convert.binding_ref_to_proto(key, ""))
    else:
        base.binding_put.CopyFrom(affinity_convert.binding_to_proto(view.binding))
    return base
