"""Pure key and target selection: which upstream attempts to make, in order.

No I/O and no clock. The only state is the round-robin bookkeeping in a
``Balancer`` the caller owns and passes in, so tables of inputs give
deterministic plans in tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from keyplane.domain import Provider

from .model import Key, Route, Target

__all__ = ["Attempt", "Balancer", "SmoothWeightedRoundRobin", "plan_attempts"]


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


class Balancer:
    """Round-robin state shared by every request, keyed by scope tuples."""

    __slots__ = ("_counters", "_wrr")

    def __init__(self) -> None:
        self._wrr: dict[Hashable, SmoothWeightedRoundRobin] = {}
        self._counters: dict[Hashable, itertools.count[int]] = {}

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
    round-robin order, state kept per (tenant, provider). vLLM attempts also
    get a node from the target's pool, round robin.
    """
    attempts: list[Attempt] = []
    # One target needs no ordering (its round robin has nothing to rotate and a
    # stable partition of one is itself).
    targets = route.targets if len(route.targets) == 1 else _ordered_targets(tenant, route, balancer, demoted)
    for target in targets:
        nodes: tuple[str, ...] = ()
        if target.provider is Provider.VLLM and target.node_urls:
            nodes = balancer.rotate(("nodes", tenant, route.public_model, target.node_urls), target.node_urls)
        keys = keys_for(target)
        if usable is not None and keys:
            keys = [k for k in keys if usable(target, k)]
            if not keys:
                continue  # every key is out; never fall back to going unauthenticated
        key_order: Sequence[Key | None]
        if len(keys) == 1:
            key_order = keys  # a round robin of one always picks it
        elif keys:
            wrr = balancer.wrr(("keys", tenant, target.provider))
            key_order = [keys[i] for i in wrr.order([(k.id, k.weight) for k in keys])]
        elif nodes:
            key_order = [None]  # self-hosted nodes need no credential
        else:
            continue
        for n, key in enumerate(key_order):
            node = nodes[n % len(nodes)] if nodes else None
            attempts.append(Attempt(target=target, key=key, node_url=node))
            if limit is not None and len(attempts) >= limit:
                return attempts
    return attempts
