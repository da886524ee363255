"""Node affinity on the request path: (client key, model) -> node, shared through the control plane.

For a route whose target has nodes (``sidecar.nodes``), ``NodeAffinity.plan``
puts a node on each of that target's attempts:

- a binding in the local cache (``sidecar.bindings``) whose node may serve
  bound traffic (ACTIVE or DRAINING, healthy): a HIT, the bound node first,
  no RPC, no lock;
- no binding held here (a MISS), or one whose node is unhealthy or gone (an
  OVERRIDE: it is ignored): one ``GetOrCreateBinding`` call with a short
  deadline (``binding_timeout``), shared by every concurrent request for the
  same triple (``SingleFlight``); an OVERRIDE names the node to move away
  from (``exclude_node_ids``), so the control plane moves the binding and
  the cache holds the new node: no flapping back when the old one recovers.
  On any error or timeout the normal strategy picks (a FALLBACK) and the
  request is not delayed further;
- the other usable nodes follow, in round-robin order, as the retries.

After a successful attempt on the bound node, the binding is queued for
``RefreshBindings``, sent in batches by ``run`` every ``report_interval``
(with the decision counters), never on the request path. A failed attempt
(an upstream error) keeps its node out locally at once
(``TenantNodes.failed``) and is reported with the node's id, so the control
plane demotes it for the whole fleet.

Nothing here logs a client key id together with a model above debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from prometheus_client import Counter

from keyplane.health.classify import ErrorClass
from keyplane.v1 import sidecar_service_pb2 as pb
from keyplane.v1 import sidecar_service_pb2_grpc as pb_grpc

from .bindings import Binding, BindingCache, BindingKey, Decision, SingleFlight, decide
from .model import Route, Target
from .nodes import NodeView, TenantNodes
from .router import Attempt

if TYPE_CHECKING:
    from .channel import ChannelSource
    from .metrics import SidecarMetrics
    from .proxy import AttemptRecord
    from .state import SidecarState

__all__ = ["AffinityCounts", "NodeAffinity", "NodeAttempt"]

_log = logging.getLogger(__name__)

# RefreshBindingsRequest's cap.
_MAX_REFRESH = 1000
_MOVED = pb.BINDING_RESULT_MOVED
_TURNS_WRAP = 1 << 30
# Seconds between sweeps of the local cache's expired bindings.
_SWEEP_EVERY = 30.0
_FIELDS = {"hit": "hits", "miss": "misses", "override": "overrides", "fallback": "fallbacks"}


@dataclass(frozen=True, slots=True)
class NodeAttempt(Attempt):
    """An attempt on a known node: its id, and the binding it follows (if any)."""

    node_id: str = ""
    binding: BindingKey | None = None


@dataclass(slots=True)
class AffinityCounts:
    """Decisions since the last RefreshBindings (per tenant) or since start (``total``)."""

    hits: int = 0
    misses: int = 0
    overrides: int = 0
    fallbacks: int = 0
    moves: int = 0

    def any(self) -> bool:
        return bool(self.hits or self.misses or self.overrides or self.fallbacks)


class NodeAffinity:
    """The sidecar's half of node affinity; one per sidecar, used from the event loop."""

    def __init__(
        self,
        state: SidecarState,
        *,
        enabled: bool = True,
        binding_timeout: float = 0.1,
        refresh_interval: float = 0.25,
        sidecar_id: str = "",
        token: str = "",
        metrics: SidecarMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.enabled = enabled
        self.binding_timeout = binding_timeout
        self.refresh_interval = refresh_interval
        self.sidecar_id = sidecar_id
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._wall = wall_clock
        self._flight: SingleFlight[BindingKey, str | None] = SingleFlight()
        self._stub: pb_grpc.SidecarServiceAsyncStub | None = None
        self._source: ChannelSource | None = None
        self._stub_channel: grpc.aio.Channel | None = None
        # Binding used successfully -> (node id, when): what the next RefreshBindings carries.
        self._refresh: dict[BindingKey, tuple[str, float]] = {}
        # Binding lifetime the control plane last told (GetOrCreateBindingResponse.ttl).
        self._ttl: float | None = None
        self._counts: dict[str, AffinityCounts] = {}
        # (tenant, route id, upstream model) -> where the next request's round robin over nodes starts.
        self._turns: dict[tuple[str, str, str], int] = {}
        self.total = AffinityCounts()
        self.rpcs = 0  # GetOrCreateBinding calls made (tests, logs)
        self.refresh_calls = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._decisions: dict[str, Counter] | None = None
        self._moves: Counter | None = None
        if metrics is not None:
            d = metrics.affinity_decisions
            self._decisions = {name: d.labels(name) for name in ("hit", "miss", "override", "fallback")}
            self._moves = metrics.affinity_moves

    @property
    def bindings(self) -> BindingCache:
        return self.state.bindings

    def attach(self, source: ChannelSource | grpc.aio.Channel) -> None:
        """The control-plane channel (shared with the watch and the reports)."""
        from .channel import ChannelSource as _Source

        if isinstance(source, _Source):
            self._source = source
        else:
            self._stub = _stub(source)

    def _current_stub(self) -> pb_grpc.SidecarServiceAsyncStub | None:
        source = self._source
        if source is None:
            return self._stub
        channel = source.current()
        stub = self._stub
        if stub is None or self._stub_channel is not channel:
            stub = self._stub = _stub(channel)
            self._stub_channel = channel
        return stub

    # --- the request path -----------------------------------------------------------------

    async def plan(
        self, tenant: str, token: str | None, route: Route, plan: list[Attempt], limit: int
    ) -> list[Attempt]:
        """``plan`` with nodes put on the attempts of the route's node target (see the module doc).

        Costs nothing for routes without known nodes: one dict get."""
        nodes = self.state.nodes_of(tenant)
        if nodes is None or not plan:
            return plan
        target = None
        members: tuple[NodeView, ...] = ()
        for attempt in plan:
            members = nodes.of_target(route.id, attempt.target.upstream_model)
            if members:
                target = attempt.target
                break
        if target is None:
            return plan
        now = self._wall()
        bound: str | None = None
        binding: BindingKey | None = None
        client = (self.state.client_key_id(token) or None) if token and self.enabled else None
        if client is not None:
            binding = (tenant, client, route.public_model)
            found = self.bindings.get(binding, now)
            decision = decide(found, lambda node_id: nodes.bound_usable(node_id, now))
            if decision is Decision.HIT:
                assert found is not None
                self._decided(tenant, "hit")
                bound = found.node_id
            else:
                self._decided(tenant, "override" if decision is Decision.OVERRIDE else "miss")
                exclude = (found.node_id,) if found is not None else ()
                bound = await self._ask(binding, exclude)
                if bound is not None and not nodes.bound_usable(bound, self._wall()):
                    bound = None
                if bound is None:
                    self._decided(tenant, "fallback")
        turn = (tenant, route.id, target.upstream_model)
        start = self._turns.get(turn, 0)
        self._turns[turn] = start + 1 if start < _TURNS_WRAP else 0
        return _with_nodes(plan, target, members, nodes, bound, binding, now, start, limit)

    async def _ask(self, key: BindingKey, exclude: Sequence[str]) -> str | None:
        """The node the control plane binds ``key`` to; None on any error or timeout."""
        try:
            return await self._flight.do(key, lambda: self._get_or_create(key, exclude), self.binding_timeout)
        except (TimeoutError, grpc.aio.AioRpcError, grpc.RpcError):
            return None
        except Exception as exc:  # pragma: no cover - a bug must not fail the request
            _log.error("binding lookup failed: %s", type(exc).__name__)
            return None

    async def _get_or_create(self, key: BindingKey, exclude: Sequence[str]) -> str | None:
        stub = self._current_stub()
        if stub is None:
            return None
        tenant, client, model = key
        self.rpcs += 1
        request = pb.GetOrCreateBindingRequest(
            tenant=tenant, client_key_id=client, public_model=model, exclude_node_ids=exclude
        )
        try:
            # The call runs on past a waiter's short deadline (single flight): its answer
            # still lands in the cache for the next request.
            response = await stub.GetOrCreateBinding(request, metadata=self._metadata, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            _log.debug("GetOrCreateBinding failed: %s", exc.code().name)
            return None
        b = response.binding
        if response.HasField("ttl"):
            self._ttl = response.ttl.ToNanoseconds() / 1e9
        if not b.node_id:
            return None
        self.bindings.put(key, Binding(b.node_id, b.expire_time.ToNanoseconds() / 1e9))
        if response.result == _MOVED:
            self.total.moves += 1
            if self._moves is not None:
                self._moves.inc()
        node_id: str = b.node_id
        return node_id

    def _decided(self, tenant: str, decision: str) -> None:
        counts = self._counts.get(tenant)
        if counts is None:
            counts = self._counts[tenant] = AffinityCounts()
        field = _FIELDS[decision]
        setattr(counts, field, getattr(counts, field) + 1)
        setattr(self.total, field, getattr(self.total, field) + 1)
        if self._decisions is not None:
            self._decisions[decision].inc()

    # --- after each attempt ------------------------------------------------------------------

    def attempted(self, tenant: str, record: AttemptRecord) -> None:
        """A node attempt ended: refresh its binding on success, keep a failing node out."""
        attempt = record.attempt
        if not isinstance(attempt, NodeAttempt):
            return
        error_class = record.classification.error_class
        if error_class is ErrorClass.SUCCESS:
            if attempt.binding is not None:
                self._refresh[attempt.binding] = (attempt.node_id, self._wall())
                if len(self._refresh) >= _MAX_REFRESH:
                    self._wake.set()
            return
        if error_class is ErrorClass.UPSTREAM_ERROR or error_class is ErrorClass.STREAM_BROKEN:
            # Kept out here at once; the outcome report carries the node's id (keyed attempts:
            # ``sidecar.outcome_wire``), so the control plane demotes it for the fleet.
            self.state.nodes(tenant).failed(attempt.node_id, self._wall())

    # --- the background refresher --------------------------------------------------------------

    async def run(self) -> None:
        """Send RefreshBindings every ``refresh_interval`` while there is something to send."""
        swept = self._wall()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_interval)
            self._wake.clear()
            now = self._wall()
            if now - swept >= _SWEEP_EVERY:  # expired bindings nobody asked for again
                swept = now
                self.bindings.evict_expired(now)
            try:
                await self.flush()
            except Exception as exc:  # a refresh that fails is retried with the next batch
                _log.debug("RefreshBindings failed: %s", type(exc).__name__)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._flight.cancel_all()

    async def flush(self) -> None:
        """One RefreshBindings call with what is queued (at most ``_MAX_REFRESH`` bindings)."""
        counts = {t: c for t, c in self._counts.items() if c.any()}
        if not self._refresh and not counts:
            return
        stub = self._current_stub()
        if stub is None:
            return
        batch: list[tuple[BindingKey, str, float]] = []
        for key in list(self._refresh)[:_MAX_REFRESH]:
            node_id, used = self._refresh.pop(key)
            batch.append((key, node_id, used))
        self._counts = {}
        request = pb.RefreshBindingsRequest(
            sidecar_id=self.sidecar_id,
            bindings=[
                pb.BindingRef(tenant=k[0], client_key_id=k[1], public_model=k[2], node_id=node) for k, node, _ in batch
            ],
            counters=[
                pb.BindingCounters(
                    tenant=t,
                    local_hits=c.hits,
                    local_misses=c.misses,
                    overrides=c.overrides,
                    fallbacks=c.fallbacks,
                )
                for t, c in counts.items()
            ],
        )
        self.refresh_calls += 1
        try:
            response = await stub.RefreshBindings(request, metadata=self._metadata, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            _log.debug("RefreshBindings failed: %s", exc.code().name)
            for key, node_id, used in batch:  # retried with the next batch
                self._refresh.setdefault(key, (node_id, used))
            return
        moved: set[BindingKey] = set()
        for b in response.current:
            key = (b.tenant, b.client_key_id, b.public_model)
            moved.add(key)
            self.bindings.update(key, Binding(b.node_id, b.expire_time.ToNanoseconds() / 1e9))
        for ref in response.gone:
            key = (ref.tenant, ref.client_key_id, ref.public_model)
            moved.add(key)
            self.bindings.drop(key)
        ttl = self._ttl
        if ttl is not None:
            for key, node_id, used in batch:
                if key not in moved:
                    self.bindings.extend(key, node_id, used + ttl)


def _stub(channel: grpc.aio.Channel) -> pb_grpc.SidecarServiceAsyncStub:
    return pb_grpc.SidecarServiceStub(channel)


def _with_nodes(
    plan: list[Attempt],
    target: Target,
    members: tuple[NodeView, ...],
    nodes: TenantNodes,
    bound: str | None,
    binding: BindingKey | None,
    now: float,
    start: int,
    limit: int,
) -> list[Attempt]:
    """The plan with the node target's attempts on nodes: the bound one first, then the
    usable others in turn from ``start`` (round robin), one attempt per node within ``limit``.

    Visits only as many nodes as the request can try (plus the unusable ones skipped on the
    way), whatever the size of the pool."""
    on_target = 0
    for attempt in plan:
        if attempt.target is target:
            on_target += 1
    want = max(on_target, limit - (len(plan) - on_target))
    order: list[NodeView] = []
    if bound is not None:
        view = nodes.node(bound)
        if view is not None:
            order.append(view)
    count = len(members)
    for step in range(count):
        if len(order) >= want:
            break
        view = members[(start + step) % count]
        if view.id != bound and nodes.usable(view.id, now):
            order.append(view)
    if not order:
        return plan  # no known node can serve: the route's own node URLs, as before
    out: list[Attempt] = []
    n = 0
    last = -1
    for attempt in plan:
        if attempt.target is not target:
            out.append(attempt)
            continue
        view = order[n % len(order)]
        out.append(_on_node(attempt, view, binding if view.id == bound else None))
        n += 1
        last = len(out) - 1
    if 0 <= last and n < len(order):
        # Fewer attempts than nodes (one key, or none): the other nodes follow, with the last key.
        template = out[last]
        out[last + 1 : last + 1] = [_on_node(template, view, None) for view in order[n:]]
    return out[:limit] if len(out) > limit else out


def _on_node(attempt: Attempt, node: NodeView, binding: BindingKey | None) -> NodeAttempt:
    if binding is not None:
        return NodeAttempt(target=attempt.target, key=attempt.key, node_url=node.url, node_id=node.id, binding=binding)
    # Unbound attempts are immutable and the same for every request: made once (bounded).
    target, key = attempt.target, attempt.key
    slot = (id(target), id(key), id(node))
    found = _UNBOUND.get(slot)
    if found is not None and found.target is target and found.key is key and found.node_id == node.id:
        return found
    if len(_UNBOUND) >= _UNBOUND_MAX:
        _UNBOUND.clear()
    made = _UNBOUND[slot] = NodeAttempt(target=target, key=key, node_url=node.url, node_id=node.id)
    return made


# Unbound node attempts by (target, key, node) identity; checked against the objects on a hit
# (ids are reused once an object is gone), emptied when full.
_UNBOUND: dict[tuple[int, int, int], NodeAttempt] = {}
_UNBOUND_MAX = 4096
