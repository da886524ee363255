"""Where a node target's attempts go (``sidecar.node_affinity._with_nodes``): pure, by tables."""

from __future__ import annotations

from keyplane.domain import Provider
from keyplane.v1 import resources_pb2 as rpb
from sidecar.model import Key, Target
from sidecar.node_affinity import NodeAttempt, _with_nodes
from sidecar.nodes import TenantNodes, node_id_for
from sidecar.router import Attempt

ROUTE = "rt_1"
VLLM = Target(Provider.VLLM, "llama", 0, 1, ("http://a/v1",))
HOSTED = Target(Provider.OPENAI, "gpt-4o", 1, 1, ())
KEY = ("t1", "ck_1", "llama")


def pool(count: int, *, draining: tuple[int, ...] = (), unhealthy: tuple[int, ...] = ()) -> TenantNodes:
    nodes = TenantNodes()
    members = []
    health = []
    for i in range(count):
        url = f"http://10.0.0.{i}/v1"
        state = rpb.NODE_STATE_DRAINING if i in draining else rpb.NODE_STATE_ACTIVE
        members.append(
            rpb.Node(id=node_id_for(ROUTE, url), route_id=ROUTE, url=url, upstream_model="llama", state=state)
        )
        if i in unhealthy:
            health.append(rpb.NodeHealth(node_id=members[-1].id, state=rpb.HEALTH_STATE_UNHEALTHY))
    nodes.replace(members, health)
    return nodes


def urls(plan: list[Attempt]) -> list[str | None]:
    return [a.node_url for a in plan]


def nid(i: int) -> str:
    return node_id_for(ROUTE, f"http://10.0.0.{i}/v1")


def test_a_keyless_target_tries_the_bound_node_then_the_others_in_turn() -> None:
    nodes = pool(4)
    members = nodes.of_target(ROUTE, "llama")
    plan: list[Attempt] = [Attempt(VLLM, None, "http://a/v1")]
    out = _with_nodes(plan, VLLM, members, nodes, nid(2), KEY, 0, start=0, limit=8)
    order = [m.id for m in members]
    assert out[0].node_url == "http://10.0.0.2/v1"
    assert isinstance(out[0], NodeAttempt) and out[0].binding == KEY and out[0].node_id == nid(2)
    assert [a.node_id for a in out[1:] if isinstance(a, NodeAttempt)] == [i for i in order if i != nid(2)]
    assert all(isinstance(a, NodeAttempt) and a.binding is None for a in out[1:])  # retries refresh nothing


def test_the_limit_bounds_the_nodes_visited() -> None:
    nodes = pool(50)
    members = nodes.of_target(ROUTE, "llama")
    plan: list[Attempt] = [Attempt(VLLM, None, "http://a/v1")]
    assert len(_with_nodes(plan, VLLM, members, nodes, None, None, 0, start=7, limit=3)) == 3
    first = _with_nodes(plan, VLLM, members, nodes, None, None, 0, start=7, limit=1)
    second = _with_nodes(plan, VLLM, members, nodes, None, None, 0, start=8, limit=1)
    assert urls(first) == [members[7].url] and urls(second) == [members[8].url]  # round robin by start


def test_unusable_nodes_are_skipped_for_unbound_traffic_and_draining_keeps_bound() -> None:
    nodes = pool(3, draining=(0,), unhealthy=(1,))
    members = nodes.of_target(ROUTE, "llama")
    plan: list[Attempt] = [Attempt(VLLM, None, "http://a/v1")]
    out = _with_nodes(plan, VLLM, members, nodes, None, None, 0, start=0, limit=8)
    assert urls(out) == ["http://10.0.0.2/v1"]
    bound = _with_nodes(plan, VLLM, members, nodes, nid(0), KEY, 0, start=0, limit=8)
    assert urls(bound) == ["http://10.0.0.0/v1", "http://10.0.0.2/v1"]


def test_other_targets_keep_their_place_and_keys_are_kept() -> None:
    nodes = pool(2)
    members = nodes.of_target(ROUTE, "llama")
    key = Key("vk", Provider.VLLM, "", "s", True, 1, frozenset(), "v")
    hosted = Key("ok", Provider.OPENAI, "", "s", True, 1, frozenset(), "o")
    plan: list[Attempt] = [Attempt(VLLM, key, "http://a/v1"), Attempt(HOSTED, hosted)]
    out = _with_nodes(plan, VLLM, members, nodes, nid(1), KEY, 0, start=0, limit=8)
    assert [(a.target, a.key, a.node_url) for a in out] == [
        (VLLM, key, "http://10.0.0.1/v1"),
        (VLLM, key, "http://10.0.0.0/v1"),
        (HOSTED, hosted, None),
    ]


def test_no_usable_node_leaves_the_plan_as_it_was() -> None:
    nodes = pool(2, unhealthy=(0, 1))
    plan: list[Attempt] = [Attempt(VLLM, None, "http://a/v1")]
    assert _with_nodes(plan, VLLM, nodes.of_target(ROUTE, "llama"), nodes, None, None, 0, start=0, limit=8) is plan


def test_unbound_attempts_are_made_once() -> None:
    nodes = pool(3)
    members = nodes.of_target(ROUTE, "llama")
    plan: list[Attempt] = [Attempt(VLLM, None, "http://a/v1")]
    one = _with_nodes(plan, VLLM, members, nodes, nid(0), KEY, 0, start=0, limit=8)
    two = _with_nodes(plan, VLLM, members, nodes, nid(0), KEY, 0, start=0, limit=8)
    assert one[0] is not two[0]  # the bound attempt names its binding
    assert all(a is b for a, b in zip(one[1:], two[1:], strict=True))
