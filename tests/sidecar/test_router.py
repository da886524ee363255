"""Table-driven tests of the pure selection logic."""

from __future__ import annotations

from collections import Counter

import pytest

from keyplane.domain import Provider
from sidecar.model import Key, Route, Target
from sidecar.router import Balancer, SmoothWeightedRoundRobin, plan_attempts


def key(id: str, weight: int = 1, provider: Provider = Provider.OPENAI) -> Key:
    return Key(
        id=id,
        provider=provider,
        base_url="",
        secret=f"sk-{id}",
        active=True,
        weight=weight,
        allowed_models=frozenset(),
        label=id,
    )


def target(model: str, provider: Provider = Provider.OPENAI, priority: int = 0, weight: int = 1) -> Target:
    return Target(provider=provider, upstream_model=model, priority=priority, weight=weight, node_urls=())


@pytest.mark.parametrize(
    ("weights", "rounds", "expected_firsts"),
    [
        # nginx's documented sequence for weights 5, 1, 1.
        ({"a": 5, "b": 1, "c": 1}, 7, "aabacaa"),
        ({"a": 1, "b": 1, "c": 1}, 6, "abcabc"),
        ({"a": 2, "b": 1}, 6, "abaaba"),
        ({"a": 0, "b": 0}, 4, "abab"),  # weights below 1 count as 1
        ({"a": 3}, 3, "aaa"),
    ],
)
def test_smooth_wrr_sequence(weights: dict[str, int], rounds: int, expected_firsts: str) -> None:
    wrr = SmoothWeightedRoundRobin()
    members = list(weights.items())
    firsts = "".join(members[wrr.order(members)[0]][0] for _ in range(rounds))
    assert firsts == expected_firsts


def test_smooth_wrr_order_contains_every_member_once() -> None:
    wrr = SmoothWeightedRoundRobin()
    members = [("a", 5), ("b", 1), ("c", 1)]
    for _ in range(20):
        order = wrr.order(members)
        assert sorted(order) == [0, 1, 2]


def test_smooth_wrr_fallback_is_next_in_line() -> None:
    wrr = SmoothWeightedRoundRobin()
    members = [("a", 1), ("b", 1), ("c", 1)]
    assert wrr.order(members) == [0, 1, 2]
    assert wrr.order(members)[0] == 1


def test_smooth_wrr_empty() -> None:
    assert SmoothWeightedRoundRobin().order([]) == []


KEYS = {
    Provider.OPENAI: [key("o1"), key("o2")],
    Provider.ANTHROPIC: [key("a1", provider=Provider.ANTHROPIC)],
}


def keys_for(t: Target) -> list[Key]:
    return KEYS.get(t.provider, [])


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        # One target: its keys in WRR order.
        ([target("m")], [("m", "o1"), ("m", "o2")]),
        # Priorities ascending, whatever the listing order.
        (
            [target("claude", Provider.ANTHROPIC, priority=2), target("gpt", priority=1)],
            [("gpt", "o1"), ("gpt", "o2"), ("claude", "a1")],
        ),
        # A target whose provider has no key is skipped.
        ([target("g", Provider.GEMINI), target("m", priority=1)], [("m", "o1"), ("m", "o2")]),
        ([target("g", Provider.GEMINI)], []),
    ],
)
def test_plan_orders_targets_and_keys(targets: list[Target], expected: list[tuple[str, str]]) -> None:
    route = Route(id="r", public_model="pub", targets=tuple(targets))
    plan = plan_attempts("t", route, keys_for, Balancer())
    assert [(a.target.upstream_model, a.key.id if a.key else None) for a in plan] == expected


def test_plan_limit() -> None:
    route = Route(id="r", public_model="pub", targets=(target("x"), target("y", priority=1)))
    assert len(plan_attempts("t", route, keys_for, Balancer(), limit=3)) == 3
    assert len(plan_attempts("t", route, keys_for, Balancer(), limit=1)) == 1


def test_equal_priority_targets_are_weighted() -> None:
    route = Route(
        id="r",
        public_model="pub",
        targets=(target("heavy", weight=3), target("light", Provider.ANTHROPIC, weight=1)),
    )
    balancer = Balancer()
    firsts = Counter(plan_attempts("t", route, keys_for, balancer)[0].target.upstream_model for _ in range(8))
    assert firsts == {"heavy": 6, "light": 2}
    # Each plan still holds the other target as a fallback.
    plan = plan_attempts("t", route, keys_for, balancer)
    assert {a.target.upstream_model for a in plan} == {"heavy", "light"}


def test_keys_rotate_across_requests_per_tenant_and_provider() -> None:
    route = Route(id="r", public_model="pub", targets=(target("m"),))
    balancer = Balancer()
    firsts = [plan_attempts("t", route, keys_for, balancer)[0].key for _ in range(4)]
    assert [k.id for k in firsts if k] == ["o1", "o2", "o1", "o2"]
    # Another tenant has its own rotation.
    other = plan_attempts("u", route, keys_for, balancer)[0].key
    assert other is not None and other.id == "o1"


def test_weighted_keys() -> None:
    heavy_keys = [key("big", weight=4), key("small", weight=1)]
    route = Route(id="r", public_model="pub", targets=(target("m"),))
    balancer = Balancer()
    firsts = Counter(
        k.id for _ in range(10) if (k := plan_attempts("t", route, lambda _t: heavy_keys, balancer)[0].key)
    )
    assert firsts == {"big": 8, "small": 2}


def test_vllm_nodes_round_robin_and_keyless() -> None:
    nodes = ("http://n1:8000/v1", "http://n2:8000/v1", "http://n3:8000/v1")
    vllm = Target(provider=Provider.VLLM, upstream_model="llama", priority=0, weight=1, node_urls=nodes)
    route = Route(id="r", public_model="llama", targets=(vllm,))
    balancer = Balancer()
    plans = [plan_attempts("t", route, lambda _t: [], balancer) for _ in range(4)]
    assert [p[0].node_url for p in plans] == [nodes[0], nodes[1], nodes[2], nodes[0]]
    assert all(p[0].key is None for p in plans)
    # With keys, successive attempts walk the nodes too.
    two = [key("v1", provider=Provider.VLLM), key("v2", provider=Provider.VLLM)]
    plan = plan_attempts("t", route, lambda _t: two, Balancer())
    assert [(a.key.id if a.key else None, a.node_url) for a in plan] == [("v1", nodes[0]), ("v2", nodes[1])]
    # A vLLM target without nodes or keys cannot be tried.
    bare = Route(id="r", public_model="llama", targets=(Target(Provider.VLLM, "llama", 0, 1, ()),))
    assert plan_attempts("t", bare, lambda _t: [], Balancer()) == []
