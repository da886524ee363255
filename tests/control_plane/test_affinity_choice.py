"""The pure part of affinity (control_plane.affinity): which nodes a binding
may stay on or go to, and the normal strategy's pick. Tables, no I/O."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.affinity import NodeChoice, binding_usable, pick, usable
from keyplane import convert
from keyplane.affinity import Binding, BindingKey, BindingView, NodeHealth, NodeState
from keyplane.domain import HealthState
from keyplane.v1 import resources_pb2 as rpb

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACTIVE, DRAINING, REMOVED = rpb.NODE_STATE_ACTIVE, rpb.NODE_STATE_DRAINING, rpb.NODE_STATE_REMOVED


def node(node_id: str, state: int = ACTIVE) -> rpb.Node:
    return rpb.Node(id=node_id, route_id="rt", url=f"http://{node_id}", state=state)  # type: ignore[arg-type]


def health(state: int, until: datetime | None = None) -> rpb.NodeHealth:
    message = rpb.NodeHealth(node_id="x", state=state)  # type: ignore[arg-type]
    if until is not None:
        message.until.CopyFrom(convert.timestamp_from_datetime(until))
    return message


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (None, True),
        (health(rpb.HEALTH_STATE_HEALTHY), True),
        (health(rpb.HEALTH_STATE_COOLDOWN, NOW + timedelta(seconds=1)), False),
        (health(rpb.HEALTH_STATE_COOLDOWN, NOW), True),  # ended: half-open
        (health(rpb.HEALTH_STATE_UNHEALTHY), False),
    ],
)
def test_usable(entry: rpb.NodeHealth | None, expected: bool) -> None:
    assert usable(entry, NOW) is expected


def test_choice_keeps_draining_takes_only_active_and_healthy() -> None:
    nodes = [node("a"), node("b", DRAINING), node("c"), node("d", REMOVED), node("e")]
    sick = {"c": health(rpb.HEALTH_STATE_UNHEALTHY)}
    choice = NodeChoice.of(nodes, sick, exclude={"e"}, now=NOW)
    assert choice.keep == frozenset({"a", "b"})
    assert choice.take == ("a",)


def test_pick_is_stable_spread_and_moves_only_the_keys_of_a_removed_node() -> None:
    keys = [BindingKey("acme", f"ck_{i}", "llama") for i in range(3000)]
    four = ("n1", "n2", "n3", "n4")
    picked = {k: pick(four, k) for k in keys}
    assert picked == {k: pick(tuple(reversed(four)), k) for k in keys}  # order does not matter
    spread = Counter(picked.values())
    assert min(spread.values()) > 600  # about 750 each
    three = ("n1", "n2", "n4")
    moved = [k for k in keys if pick(three, k) != picked[k]]
    assert all(picked[k] == "n3" for k in moved) and len(moved) == spread["n3"]
    with pytest.raises(ValueError):
        pick((), keys[0])


def _view(state: NodeState, node_health: NodeHealth | None, expires: timedelta) -> BindingView:
    binding = Binding(BindingKey("acme", "ck", "m"), "n1", "http://n1", NOW, NOW, NOW + expires)
    return BindingView(binding, state, node_health)


@pytest.mark.parametrize(
    ("view", "exclude", "expected"),
    [
        (_view(NodeState.ACTIVE, None, timedelta(minutes=1)), (), True),
        (_view(NodeState.DRAINING, None, timedelta(minutes=1)), (), True),
        (_view(NodeState.REMOVED, None, timedelta(minutes=1)), (), False),
        (_view(NodeState.ACTIVE, None, timedelta(0)), (), False),  # expired
        (_view(NodeState.ACTIVE, None, timedelta(minutes=1)), ("n1",), False),
        (
            _view(
                NodeState.ACTIVE, NodeHealth("acme", "n1", HealthState.UNHEALTHY, None, "", NOW), timedelta(minutes=1)
            ),
            (),
            False,
        ),
    ],
)
def test_binding_usable(view: BindingView, exclude: tuple[str, ...], expected: bool) -> None:
    assert binding_usable(view, exclude, NOW) is expected
