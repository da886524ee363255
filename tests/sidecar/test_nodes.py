"""Nodes and bindings as the watch stream feeds them (``sidecar.nodes``, ``SidecarState``)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as pb
from sidecar.bindings import Binding
from sidecar.nodes import TenantNodes, node_id_for
from sidecar.state import SidecarState

ACTIVE, DRAINING, REMOVED = rpb.NODE_STATE_ACTIVE, rpb.NODE_STATE_DRAINING, rpb.NODE_STATE_REMOVED


def node(n: int, state: rpb.NodeState.ValueType = ACTIVE, route: str = "rt_1") -> rpb.Node:
    url = f"http://10.0.0.{n}:8000"
    return rpb.Node(id=node_id_for(route, url), route_id=route, url=url, upstream_model="llama", state=state)


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def test_node_id_matches_the_documented_derivation() -> None:
    import hashlib

    expected = "nd_" + hashlib.sha256(b"rt_1\nhttp://10.0.0.1:8000").hexdigest()[:24]
    assert node_id_for("rt_1", "http://10.0.0.1:8000") == expected


def test_states_and_health() -> None:
    nodes = TenantNodes(local_cooldown=5)
    a, b, c = node(1), node(2, DRAINING), node(3)
    unhealthy = rpb.NodeHealth(node_id=c.id, state=rpb.HEALTH_STATE_UNHEALTHY)
    nodes.replace([a, b, c, node(4, REMOVED)], [unhealthy])
    assert [v.id for v in nodes.of_target("rt_1", "llama")] == sorted([a.id, b.id, c.id])
    assert nodes.usable(a.id, 0) and nodes.bound_usable(a.id, 0)
    assert not nodes.usable(b.id, 0) and nodes.bound_usable(b.id, 0)  # draining keeps its bindings
    assert not nodes.usable(c.id, 0) and not nodes.bound_usable(c.id, 0)
    nodes.apply_health(rpb.NodeHealth(node_id=c.id, state=rpb.HEALTH_STATE_HEALTHY))
    assert nodes.usable(c.id, 0)
    nodes.apply_health(rpb.NodeHealth(node_id=c.id, state=rpb.HEALTH_STATE_COOLDOWN, until=stamp(100)))
    assert not nodes.usable(c.id, 99) and nodes.usable(c.id, 100)
    nodes.failed(a.id, now=10)  # this sidecar's own finding
    assert not nodes.usable(a.id, 14.9) and nodes.usable(a.id, 15)
    nodes.put(node(1, REMOVED))
    assert nodes.node(a.id) is None and not nodes.bound_usable(a.id, 20)


def _snapshot(state: SidecarState, *nodes: rpb.Node) -> None:
    tenant = pb.TenantState(
        tenant="t1",
        client_keys=[pb.SidecarClientKey(id="ck_1", token_sha256=__import__("hashlib").sha256(b"tok").digest())],
        nodes=nodes,
    )
    state.apply(pb.WatchResponse(version=1, snapshot=pb.Snapshot(tenants=[tenant])))


def _delta(state: SidecarState, change: pb.Change) -> None:
    change.tenant = "t1"
    state.apply(pb.WatchResponse(version=change.version, delta=pb.Delta(changes=[change])))


def test_state_feeds_nodes_bindings_and_client_ids() -> None:
    state = SidecarState()
    a, b = node(1), node(2)
    _snapshot(state, a, b)
    assert state.authenticate("tok") == "t1"
    assert state.client_key_id("tok") == "ck_1"
    assert state.client_key_id("other") == ""
    nodes = state.nodes_of("t1")
    assert nodes is not None and len(nodes) == 2
    key = ("t1", "ck_1", "llama")
    state.bindings.put(key, Binding(a.id, 1000))
    moved = rpb.Binding(tenant="t1", client_key_id="ck_1", public_model="llama", node_id=b.id, expire_time=stamp(2000))
    _delta(state, pb.Change(version=2, binding_put=moved))
    assert state.bindings.peek(key) == Binding(b.id, 2000)
    other = rpb.Binding(tenant="t1", client_key_id="ck_2", public_model="llama", node_id=b.id, expire_time=stamp(2000))
    _delta(state, pb.Change(version=3, binding_put=other))  # not held here: ignored
    assert ("t1", "ck_2", "llama") not in state.bindings
    _delta(state, pb.Change(version=4, node_put=node(2, DRAINING)))
    assert not nodes.usable(b.id, 0) and nodes.bound_usable(b.id, 0)
    _delta(state, pb.Change(version=5, node_health=rpb.NodeHealth(node_id=a.id, state=rpb.HEALTH_STATE_UNHEALTHY)))
    assert not nodes.bound_usable(a.id, 0)
    _delta(
        state,
        pb.Change(version=6, binding_deleted=pb.BindingRef(tenant="t1", client_key_id="ck_1", public_model="llama")),
    )
    assert key not in state.bindings
    state.bindings.put(key, Binding(a.id, 1000))
    _delta(state, pb.Change(version=7, client_key_deleted="ck_1"))
    assert key not in state.bindings


def test_the_persisted_snapshot_keeps_nodes_and_their_health() -> None:
    """A sidecar restarting from its snapshot file (``SnapshotFold``) still knows the nodes."""
    from sidecar.snapshot_fold import SnapshotFold

    a, b, c = node(1), node(2), node(3)
    fold = SnapshotFold()
    first = pb.WatchResponse(version=1, snapshot=pb.Snapshot(tenants=[pb.TenantState(tenant="t1", nodes=[a, b])]))
    fold.apply(first)
    changes = [
        pb.Change(tenant="t1", version=2, node_put=c),
        pb.Change(tenant="t1", version=3, node_put=node(1, REMOVED)),
        pb.Change(tenant="t1", version=4, node_put=node(2, DRAINING)),
        pb.Change(tenant="t1", version=5, node_health=rpb.NodeHealth(node_id=c.id, state=rpb.HEALTH_STATE_UNHEALTHY)),
    ]
    fold.apply(pb.WatchResponse(version=5, delta=pb.Delta(changes=changes)))
    restored = SidecarState()
    restored.apply(fold.response())
    nodes = restored.nodes("t1")
    assert nodes.node(a.id) is None
    assert nodes.bound_usable(b.id, 0) and not nodes.usable(b.id, 0)
    assert nodes.node(c.id) is not None and not nodes.usable(c.id, 0)
