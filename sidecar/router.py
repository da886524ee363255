"""Pure key and target selection: which upstream attempts to make, in order.

No I/O and no clock. The only state is the round-robin bookkeeping in a
``Balancer`` the caller owns and passes in, so tables of inputs give
deterministic plans in tests.

Key selection costs O(attempts planned), not O(keys): each key sequence gets a
precomputed smooth weighted schedule (one period, rebuilt only when the
sequence object changes) and a cursor; a request walks the schedule from the
cursor, checks health only for the keys it reaches and stops at the limit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

from keyplane.domain import Provider

from .model import Key, Route, Target

__all__ = ["Attempt", "Balancer", "KeySchedule", "SmoothWeightedRoundRobin", "plan_attempts", "smooth_schedule"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream call to make: a target, the key to use and, for vLLM, the node."""

    target: Target
    # None only for a vLLM target whose tenant holds no vLLM key (unauthenticated nodes).
    key: Key | None
    node_url: str | None = None


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin over members named by id.

    Each ``order`` call is one selection round: every member's current weight
    grows by its weight, the largest wins and pays back the total. The winner
    comes first; the others follow by current weight (the next in line first),
    which is the fallback order. Weights below 1 count as 1. Members absent from
    a round (filtered out by a model allow-list) keep their current weight.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def order(self, members: Sequence[tuple[str, int]]) -> list[int]:
        """Indices into ``members``: this round's pick first, then the fallbacks."""
        n = len(members)
        if n <= 1:
            return list(range(n))
        current = self._current
        total = 0
        best = 0
        best_weight = 0
        for i, (member_id, weight) in enumerate(members):
            w = max(weight, 1)
            total += w
            cw = current.get(member_id, 0) + w
            current[member_id] = cw
            if i == 0 or cw > best_weight:
                best, best_weight = i, cw
        current[members[best][0]] -= total
        rest = sorted(
            (i for i in range(n) if i != best),
            key=lambda i: (-current[members[i][0]], i),
        )
        return [best, *rest]

    def current_weights(self) -> dict[str, int]:
        return dict(self._current)


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """One period of a smooth weighted round robin over ``weights``: indices.

    Member ``i`` appears ``w_i`` times (weights divided by their common
    divisor; below 1 counts as 1), its turns evenly spread: its k-th turn sits
    at (k + 1/2) / w_i of the period, ties to the lower index. Equal weights give
    0, 1, ..., n-1; weights 2, 1 give 0, 1, 0. O(W log W) for a period of W.
    """
    ws = [max(w, 1) for w in weights]
    if not ws:
        return []
    common = math.gcd(*ws)
    ws = [w // common for w in ws]
    # Equal rationals divide to the same float, so ties are exact and go by index.
    turns = sorted(((2 * k + 1) / (2 * w), i) for i, w in enumerate(ws) for k in range(w))
    return [i for _, i in turns]


class KeySchedule:
    """A key sequence's smooth weighted schedule and where the next request starts."""

    __slots__ = ("_made", "cursor", "keys", "slots")

    def __init__(self, keys: Sequence[Key], cursor: int = 0) -> None:
        self.keys = keys
        self.slots = smooth_schedule([k.weight for k in keys])
        self.cursor = cursor % len(self.slots) if self.slots else 0
        # id(target) -> (target, its keyed attempts by key index, made on first use)
        self._made: dict[int, tuple[Target, list[Attempt | None]]] = {}

    def made_for(self, target: Target) -> list[Attempt | None]:
        """Reusable attempts (no node) of ``target`` by key index: both are immutable."""
        entry = self._made.get(id(target))
        if entry is None or entry[0] is not target:  # holding the target keeps its id unique
            entry = self._made[id(target)] = (target, [None] * len(self.keys))
        return entry[1]

    def order(self, usable: Callable[[Key], bool] | None) -> Iterator[int]:
        """Key indices for one request, lazily: the first usable key from the cursor
        (whose turn it is; the cursor moves past it), then the other usable keys
        in sequence order after it. ``usable`` is asked only about the keys reached."""
        keys, slots = self.keys, self.slots
        period = len(slots)
        rejected: set[int] = set()
        first = -1
        pos = self.cursor
        for _ in range(period):  # one period visits every key
            i = slots[pos]
            pos = pos + 1 if pos + 1 < period else 0
            if i in rejected:
                continue
            if usable is None or usable(keys[i]):
                first = i
                break
            rejected.add(i)
        if first < 0:
            return
        self.cursor = pos
        yield first
        n = len(keys)
        for step in range(1, n):
            i = (first + step) % n
            if i not in rejected and (usable is None or usable(keys[i])):
                yield i


class Balancer:
    """Round-robin state shared by every request, keyed by scope tuples."""

    __slots__ = ("_counters", "_schedules", "_wrr")

    def __init__(self) -> None:
        self._wrr: dict[Hashable, SmoothWeightedRoundRobin] = {}
        self._counters: dict[Hashable, itertools.count[int]] = {}
        self._schedules: dict[Hashable, KeySchedule] = {}

    def schedule(self, scope: Hashable, keys: Sequence[Key]) -> KeySchedule:
        """The schedule of ``keys`` in ``scope``, rebuilt when ``keys`` is another object.

        Key sequences are taken as immutable (the sidecar state builds new tuples
        on every change), so identity names the key set and its weights; the
        cursor carries over a rebuild."""
        found = self._schedules.get(scope)
        if found is None or found.keys is not keys:
            found = self._schedules[scope] = KeySchedule(keys, found.cursor if found is not None else 0)
        return found

    def wrr(self, scope: Hashable) -> SmoothWeightedRoundRobin:
        found = self._wrr.get(scope)
        if found is None:
            found = self._wrr[scope] = SmoothWeightedRoundRobin()
        return found

    def rotate(self, scope: Hashable, items: Sequence[str]) -> tuple[str, ...]:
        """``items`` rotated by one more step each call (plain round robin)."""
        if len(items) <= 1:
            return tuple(items)
        counter = self._counters.get(scope)
        if counter is None:
            counter = self._counters[scope] = itertools.count()
        start = next(counter) % len(items)
        return (*items[start:], *items[:start])


def _ordered_targets(
    tenant: str, route: Route, balancer: Balancer, demoted: Callable[[Target], bool] | None
) -> list[Target]:
    by_priority: dict[int, list[tuple[int, Target]]] = {}
    for index, target in enumerate(route.targets):
        by_priority.setdefault(target.priority, []).append((index, target))
    ordered: list[Target] = []
    for priority in sorted(by_priority):
        group = by_priority[priority]
        wrr = balancer.wrr(("targets", tenant, route.public_model, priority))
        members = [(f"{index}:{t.provider.value}:{t.upstream_model}", t.weight) for index, t in group]
        ordered.extend(group[i][1] for i in wrr.order(members))
    if demoted is None:
        return ordered
    # A stable partition: degraded targets keep their order, after all the others.
    flags = [demoted(t) for t in ordered]
    return [t for t, d in zip(ordered, flags, strict=True) if not d] + [
        t for t, d in zip(ordered, flags, strict=True) if d
    ]


def _for_target(usable: Callable[[Target, Key], bool] | None, target: Target) -> Callable[[Key], bool] | None:
    if usable is None:
        return None
    return lambda key: usable(target, key)


def plan_attempts(
    tenant: str,
    route: Route,
    keys_for: Callable[[Target], Sequence[Key]],
    balancer: Balancer,
    *,
    limit: int | None = None,
    usable: Callable[[Target, Key], bool] | None = None,
    demoted: Callable[[Target], bool] | None = None,
) -> list[Attempt]:
    """The ordered attempts for one request to ``route``.

    Targets are tried by ascending priority, weighted among equal priorities;
    targets for which ``demoted`` is true (a degraded provider) come after all
    the others, in the same order. Within a target, the provider's keys
    (``keys_for``) that pass ``usable`` (health) come in smooth weighted
    round-robin order: the key whose turn it is first, then the others. The
    schedule and its cursor are kept per (tenant, provider, upstream model)
    and per key sequence; only the keys reached before ``limit`` attempts are
    checked. vLLM attempts also get a node from the target's pool, round robin.
    """
    attempts: list[Attempt] = []
    # One target needs no ordering (its round robin has nothing to rotate and a
    # stable partition of one is itself).
    targets = route.targets if len(route.targets) == 1 else _ordered_targets(tenant, route, balancer, demoted)
    for target in targets:
        for attempt in _target_attempts(tenant, route, target, keys_for, balancer, usable):
            attempts.append(attempt)
            if limit is not None and len(attempts) >= limit:
                return attempts
    return attempts


def _target_attempts(
    tenant: str,
    route: Route,
    target: Target,
    keys_for: Callable[[Target], Sequence[Key]],
    balancer: Balancer,
    usable: Callable[[Target, Key], bool] | None,
) -> Iterator[Attempt]:
    nodes: tuple[str, ...] = ()
    if target.provider is Provider.VLLM and target.node_urls:
        nodes = balancer.rotate(("nodes", tenant, route.public_model, target.node_urls), target.node_urls)
    keys = keys_for(target)
    if not keys:
        if nodes:
            yield Attempt(target=target, key=None, node_url=nodes[0])  # self-hosted nodes need no credential
        return
    # Every key out means the target is skipped: never fall back to going unauthenticated.
    check = _for_target(usable, target)
    if len(keys) == 1:  # a round robin of one
        if check is None or check(keys[0]):
            yield Attempt(target=target, key=keys[0], node_url=nodes[0] if nodes else None)
        return
    schedule = balancer.schedule(("keys", tenant, target.provider, target.upstream_model), keys)
    if nodes:
        for n, i in enumerate(schedule.order(check)):
            yield Attempt(target=target, key=keys[i], node_url=nodes[n % len(nodes)])
        return
    made = schedule.made_for(target)
    for i in schedule.order(check):
        found = made[i]
        if found is None:
            found = made[i] = Attempt(target=target, key=keys[i])
        yield found
