"""Affinity on the control plane (issue 14): which node a (tenant, client key,
public model) is bound to.

Pure decisions first (``usable``, ``NodeChoice.of``, ``pick``), free of I/O
and clock; then :class:`Affinity`, the thin service around the store:

- a hit is ``store.find_binding`` (one SELECT, no lock, no write): a live
  binding whose node is ACTIVE or DRAINING, healthy and not excluded;
- a miss is ``store.claim_binding`` with the node ``pick`` chooses among the
  route's healthy ACTIVE nodes; the store serialises concurrent claims of the
  triple on every replica and re-checks, so they all agree on one node;
- a binding to an unusable node is moved (logged, so sidecars holding it
  replace it and none flaps back when the old node recovers).

The nodes and their health come from the hub's memory (what sidecars were
told); the binding's own node state and health from the store row.
Privacy: nothing here logs a client key id with a model name above debug.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from control_plane.snapshot_cache import SnapshotCache
from control_plane.store.base import Store
from keyplane import convert
from keyplane.affinity import Binding, BindingKey, BindingResult, BindingView, NodeState
from keyplane.errors import FailedPrecondition, NotFound
from keyplane.v1 import resources_pb2

__all__ = ["Affinity", "AffinityStats", "NodeChoice", "pick", "usable"]

log = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(minutes=10)
_ACTIVE = resources_pb2.NODE_STATE_ACTIVE
_DRAINING = resources_pb2.NODE_STATE_DRAINING
_HEALTHY = resources_pb2.HEALTH_STATE_HEALTHY
_COOLDOWN = resources_pb2.HEALTH_STATE_COOLDOWN


# pure decisions ---------------------------------------------------------------


def usable(health: resources_pb2.NodeHealth | None, now: datetime) -> bool:
    """A node may take traffic: no entry, HEALTHY, or a cooldown that ended."""
    if health is None or health.state == _HEALTHY:
        return True
    if health.state == _COOLDOWN and health.HasField("until"):
        return convert.datetime_from_timestamp(health.until) <= now
    return False


@dataclass(frozen=True, slots=True)
class NodeChoice:
    """``keep``: nodes an existing live binding may stay on (ACTIVE or
    DRAINING, usable, not excluded); ``take``: nodes a new binding may go to
    (ACTIVE, usable, not excluded), in id order."""

    keep: frozenset[str]
    take: tuple[str, ...]

    @classmethod
    def of(
        cls,
        nodes: Iterable[resources_pb2.Node],
        health: Mapping[str, resources_pb2.NodeHealth],
        exclude: Collection[str],
        now: datetime,
    ) -> NodeChoice:
        keep = frozenset(
            n.id
            for n in nodes
            if n.state in (_ACTIVE, _DRAINING) and n.id not in exclude and usable(health.get(n.id), now)
        )
        take = tuple(sorted(n.id for n in nodes if n.id in keep and n.state == _ACTIVE))
        return cls(keep, take)


def pick(take: Sequence[str], key: BindingKey) -> str:
    """The normal strategy for a new binding: rendezvous (highest random
    weight) hashing of the triple over the candidates, so keys spread evenly,
    every replica computes the same node, and removing one node moves only
    the keys that were on it."""
    if not take:
        raise ValueError("no candidate node")
    seed = f"{key.tenant}\n{key.client_key_id}\n{key.public_model}\n"

    def weight(node_id: str) -> bytes:
        return hashlib.blake2b((seed + node_id).encode(), digest_size=8).digest()

    return max(take, key=weight)


def binding_usable(view: BindingView, exclude: Collection[str], now: datetime) -> bool:
    """A hit: live, its node ACTIVE or DRAINING, healthy, not excluded."""
    health = view.node_health
    healthy = health is None or health.usable(now)
    return (
        view.binding.live(now)
        and view.node_state in (NodeState.ACTIVE, NodeState.DRAINING)
        and healthy
        and view.binding.node_id not in exclude
    )


# the service ------------------------------------------------------------------


@dataclass(slots=True)
class AffinityStats:
    """Counters of one tenant since this replica started."""

    hits: int = 0
    misses: int = 0
    created: int = 0
    moves: int = 0
    sidecar_hits: int = 0
    overrides: int = 0
    fallbacks: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Affinity:
    """Bindings for the sidecar service and the admin API."""

    def __init__(
        self,
        store: Store,
        cache: SnapshotCache,
        *,
        ttl: timedelta = DEFAULT_TTL,
        clock: Callable[[], datetime] = _utcnow,
        publish: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError("the binding TTL must be positive")
        self._store = store
        self._cache = cache
        self.ttl = ttl
        self._clock = clock
        self._stats: dict[str, AffinityStats] = defaultdict(AffinityStats)
        self.swept = 0
        # Reads the change log into the hub (SnapshotHub.catch_up), so a move
        # reaches the sidecars without waiting for NOTIFY or the poller.
        self._publish = publish
        self._publishing: set[asyncio.Task[None]] = set()

    def stats(self, tenant: str) -> AffinityStats:
        return self._stats[tenant]

    async def get_or_create(self, key: BindingKey, exclude: Collection[str] = ()) -> tuple[Binding, BindingResult]:
        """NotFound: unknown tenant, client key or public model.
        FailedPrecondition: no node may take a binding."""
        now = self._clock()
        stats = self._stats[key.tenant]
        view = await self._store.find_binding(key)
        if view is not None and binding_usable(view, exclude, now):
            stats.hits += 1
            return view.binding, BindingResult.HIT
        stats.misses += 1
        found = self._cache.route_nodes(key.tenant, key.public_model)
        if found is None:
            raise NotFound(f"no route for that model in tenant {key.tenant!r}")
        if not self._cache.has_client_key(key.tenant, key.client_key_id):
            raise NotFound(f"client key {key.client_key_id!r} not found in tenant {key.tenant!r}")
        nodes, health = found
        choice = NodeChoice.of(nodes, health, exclude, now)
        keep = choice.keep
        if view is not None and not binding_usable(view, exclude, now):
            keep = keep - {view.binding.node_id}  # the store knows it is unusable (the cache may lag)
        take = [n for n in choice.take if n in keep]
        if not take:
            raise FailedPrecondition("no healthy active node of the route may take a binding")
        binding, result = await self._store.claim_binding(key, keep, pick(take, key), now, now + self.ttl)
        if result is BindingResult.CREATED:
            stats.created += 1
        elif result is BindingResult.MOVED:
            stats.moves += 1
            log.debug("binding of %s for %s moved to node %s", key.client_key_id, key.public_model, binding.node_id)
            self._publish_soon()
        return binding, result

    def _publish_soon(self) -> None:
        """Publish the move in the background: the caller has its answer already."""
        if self._publish is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish_now())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish_now(self) -> None:
        assert self._publish is not None
        try:
            await self._publish()
        except Exception as exc:  # the poller or NOTIFY publishes it later
            log.debug("binding move not published yet: %s", type(exc).__name__)

    async def refresh(
        self, refs: Sequence[tuple[BindingKey, str]]
    ) -> tuple[int, list[Binding], list[tuple[BindingKey, str]]]:
        now = self._clock()
        return await self._store.refresh_bindings(refs, now, now + self.ttl)

    def count(self, tenant: str, *, hits: int = 0, overrides: int = 0, fallbacks: int = 0) -> None:
        """Fold a sidecar's counters in (RefreshBindings)."""
        stats = self._stats[tenant]
        stats.sidecar_hits += hits
        stats.overrides += overrides
        stats.fallbacks += fallbacks
