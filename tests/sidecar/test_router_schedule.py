"""Key selection by precomputed schedule: fair, and touching only the keys a request reaches."""

from __future__ import annotations

from collections import Counter

import pytest

from keyplane.domain import Provider
from sidecar.model import Key, Route, Target
from sidecar.router import Balancer, KeySchedule, plan_attempts, smooth_schedule

from .test_router import key, target


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([], []),
        ([1], [0]),
        ([1, 1, 1], [0, 1, 2]),
        ([2, 1], [0, 1, 0]),
        ([4, 2], [0, 1, 0]),  # divided by the common divisor
        ([0, 0], [0, 1]),  # below 1 counts as 1
        ([4, 1], [0, 0, 1, 0, 0]),
        ([5, 1, 1], [0, 0, 0, 1, 2, 0, 0]),
        ([2, 1, 1], [0, 1, 2, 0]),
        ([1, 3], [1, 0, 1, 1]),  # index 0's only turn is mid-period, tied with index 1's, lower index first
    ],
)
def test_smooth_schedule(weights: list[int], expected: list[int]) -> None:
    assert smooth_schedule(weights) == expected


@pytest.mark.parametrize("weights", [[1] * 7, [5, 1, 1], [3, 7, 2, 9], [1000, 1, 999], list(range(1, 30))])
def test_smooth_schedule_gives_each_member_its_weight(weights: list[int]) -> None:
    slots = smooth_schedule(weights)
    assert len(slots) == sum(weights)
    assert Counter(slots) == {i: w for i, w in enumerate(weights)}


def _plan(keys: list[Key], balancer: Balancer, **kwargs: object) -> list[str]:
    route = Route("r", "pub", (target("m"),))
    plan = plan_attempts("t", route, lambda _t: keys, balancer, **kwargs)  # type: ignore[arg-type]
    return [a.key.id for a in plan if a.key is not None]


def test_a_request_checks_only_the_keys_it_plans() -> None:
    keys = [key(f"k{i:04d}") for i in range(1000)]
    asked: list[str] = []

    def usable(_t: Target, k: Key) -> bool:
        asked.append(k.id)
        return True

    balancer = Balancer()
    for n in range(3):
        asked.clear()
        plan = _plan(keys, balancer, limit=8, usable=usable)
        assert plan == [f"k{(n + i) % 1000:04d}" for i in range(8)]
        assert asked == plan


def test_unusable_keys_are_skipped_and_the_rest_share_fairly() -> None:
    keys = [key("a", weight=3), key("b", weight=1), key("c", weight=2), key("d", weight=2)]
    out = {"c"}
    balancer = Balancer()
    firsts = Counter(_plan(keys, balancer, limit=1, usable=lambda _t, k: k.id not in out)[0] for _ in range(600))
    assert firsts == {"a": 300, "b": 100, "d": 200}
    # Every plan holds each usable key once, the unusable never.
    plan = _plan(keys, balancer, usable=lambda _t, k: k.id not in out)
    assert sorted(plan) == ["a", "b", "d"]


def test_fallbacks_follow_the_pick_in_sequence_order() -> None:
    keys = [key("a"), key("b"), key("c"), key("d")]
    balancer = Balancer()
    assert [_plan(keys, balancer, limit=3) for _ in range(3)] == [
        ["a", "b", "c"],
        ["b", "c", "d"],
        ["c", "d", "a"],
    ]


def test_every_key_out_plans_nothing() -> None:
    keys = [key("a", weight=3), key("b")]
    assert _plan(keys, Balancer(), usable=lambda _t, _k: False) == []


def test_a_new_key_sequence_rebuilds_the_schedule_and_keeps_the_cursor() -> None:
    balancer = Balancer()
    first = (key("a"), key("b"), key("c"))
    assert _plan(list(first), balancer, limit=1) == ["a"]
    same = list(first)
    assert _plan(same, balancer, limit=1) == ["b"]  # a new list object: rebuilt, cursor kept
    assert _plan(same, balancer, limit=1) == ["c"]
    # Weights changed: the new sequence is the new truth.
    heavier = [key("a"), key("b", weight=3)]
    firsts = Counter(_plan(heavier, balancer, limit=1)[0] for _ in range(8))
    assert firsts == {"a": 2, "b": 6}


def test_schedules_are_per_tenant_provider_and_model() -> None:
    keys = [key("o1"), key("o2")]
    balancer = Balancer()
    route = Route("r", "pub", (target("m1"),))
    other_model = Route("r2", "pub2", (target("m2"),))
    anthropic = Route("r3", "pub3", (target("c", Provider.ANTHROPIC),))

    def pick(tenant: str, r: Route) -> str | None:
        plan = plan_attempts(tenant, r, lambda _t: keys, balancer, limit=1)
        return plan[0].key.id if plan and plan[0].key else None

    assert [pick("t", route), pick("t", route)] == ["o1", "o2"]
    assert pick("u", route) == "o1"
    assert pick("t", other_model) == "o1"
    assert pick("t", anthropic) == "o1"


def test_key_schedule_order_is_lazy() -> None:
    schedule = KeySchedule([key(f"k{i}") for i in range(100)])
    asked: list[str] = []

    def usable(k: Key) -> bool:
        asked.append(k.id)
        return k.id != "k1"

    order = schedule.order(usable)
    assert next(order) == 0
    assert next(order) == 2  # k1 checked and skipped
    assert asked == ["k0", "k1", "k2"]


def test_attempts_carry_their_own_target_when_routes_share_a_schedule() -> None:
    keys = [key("o1"), key("o2"), key("o3")]
    balancer = Balancer()
    low, high = target("m", priority=1), target("m", priority=5, weight=3)
    for t in (low, high, low, high):
        plan = plan_attempts("t", Route("r", "pub", (t,)), lambda _t: keys, balancer, limit=2)
        assert all(a.target is t for a in plan)
        assert [a.key.id for a in plan if a.key] in (["o1", "o2"], ["o2", "o3"], ["o3", "o1"])
