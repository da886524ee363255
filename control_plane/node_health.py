"""Learnt node health (issue 14): outcome reports that name a node
(``Outcome.node_id``) are folded like key health, with the same pure state
machine (``keyplane.health.machine.HealthBook``, one per tenant, the node as
a key scope), so a node that fails is demoted for every sidecar of the tenant:
upstream errors and broken streams in a sliding window trip a COOLDOWN
(doubling, capped), which ends half-open; a success heals it. Credential,
quota, rate-limit and client errors are the key's or the request's business,
not the node's.

Transitions are written to the store (``put_node_health``) and published
through the hub; verdicts learnt by another replica come back through the
hub's change listener, so every replica's book agrees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from control_plane.hub import SnapshotHub
from control_plane.store.base import Store
from keyplane import convert
from keyplane.affinity import NodeHealth
from keyplane.domain import ChangeRecord, HealthState, Provider
from keyplane.errors import NotFound
from keyplane.health.classify import Classification, ErrorClass
from keyplane.health.machine import HealthBook, HealthChange, HealthPolicy, KeyScope, Outcome, Verdict
from keyplane.v1 import sidecar_service_pb2

__all__ = ["NODE_SCOPE_MODEL", "NodeHealthFolder", "node_outcome"]

log = logging.getLogger(__name__)

# The "model" of a node's scope in its book: one verdict per node, any model.
NODE_SCOPE_MODEL = "\x00node"
_COUNTED = frozenset({ErrorClass.SUCCESS, ErrorClass.UPSTREAM_ERROR, ErrorClass.STREAM_BROKEN})


def node_outcome(message: sidecar_service_pb2.Outcome) -> Outcome | None:
    """The state-machine input for the node of a reported attempt, or None
    when the attempt says nothing about its node."""
    error_class = convert.error_class_from_proto(message.outcome_class)
    if not message.node_id or error_class not in _COUNTED:
        return None
    status = int(message.status_code)
    reason = f"{status} {error_class.value}" if status else error_class.value
    return Outcome(
        key_id=message.node_id,
        provider=Provider.VLLM,
        model=NODE_SCOPE_MODEL,
        classification=Classification(error_class, status, reason),
        provider_final=False,  # never a provider verdict from here
    )


def _utc_epoch() -> float:
    return time.time()


class NodeHealthFolder:
    def __init__(
        self,
        store: Store,
        hub: SnapshotHub,
        policy: HealthPolicy | None = None,
        *,
        clock: Callable[[], float] = _utc_epoch,
    ) -> None:
        self._store = store
        self._hub = hub
        self._policy = policy if policy is not None else HealthPolicy()
        self._clock = clock
        self._books: dict[str, HealthBook] = {}
        self._dirty: dict[tuple[str, str], Verdict] = {}
        self._lock = asyncio.Lock()
        hub.cache.add_listener(self._on_change)

    def close(self) -> None:
        self._hub.cache.remove_listener(self._on_change)

    def _book(self, tenant: str) -> HealthBook:
        book = self._books.get(tenant)
        if book is None:
            book = self._books[tenant] = HealthBook(self._policy)
        return book

    def verdict(self, tenant: str, node_id: str) -> Verdict | None:
        book = self._books.get(tenant)
        return None if book is None else book.verdict(KeyScope(node_id, NODE_SCOPE_MODEL), self._clock())

    async def ingest(self, reports: Sequence[tuple[str, sidecar_service_pb2.Outcome]]) -> None:
        """Fold (tenant, outcome) pairs; persist and publish the transitions.
        Never raises for store trouble: unpersisted verdicts wait for the next call."""
        now = self._clock()
        for tenant, message in reports:
            outcome = node_outcome(message)
            if outcome is None or not self._hub.cache.has_node(tenant, message.node_id):
                continue
            for change in self._book(tenant).record(outcome, now):
                if isinstance(change.scope, KeyScope):
                    self._dirty[(tenant, change.scope.key_id)] = change.verdict
                    if change.verdict.state is not HealthState.HEALTHY:
                        log.info(
                            "node %s of tenant %s is %s: %s",
                            change.scope.key_id,
                            tenant,
                            change.verdict.state.value,
                            change.verdict.reason,
                        )
        if self._dirty:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            wrote = False
            for (tenant, node_id), verdict in list(self._dirty.items()):
                until = None if verdict.until is None else convert.datetime_from_epoch(verdict.until)
                updated = convert.datetime_from_epoch(self._clock())
                health = NodeHealth(tenant, node_id, verdict.state, until, verdict.reason, updated)
                try:
                    wrote = await self._store.put_node_health(health) is not None or wrote
                except NotFound:
                    pass  # the node went meanwhile
                except Exception as exc:
                    log.warning("could not persist node health, will retry: %s", type(exc).__name__)
                    break
                if self._dirty.get((tenant, node_id)) is verdict:
                    del self._dirty[(tenant, node_id)]
            if wrote:
                try:
                    await self._hub.catch_up()
                except Exception as exc:
                    log.warning("node health persisted but not yet published: %s", type(exc).__name__)

    def _on_change(self, record: ChangeRecord, change: sidecar_service_pb2.Change) -> None:
        """Adopt node verdicts written by any replica (own ones are no-ops)."""
        if change.WhichOneof("change") != "node_health":
            return
        message = change.node_health
        state = convert.health_state_from_proto(message.state)
        if state is None:
            return
        until = message.until.seconds + message.until.nanos * 1e-9 if message.HasField("until") else None
        scope = KeyScope(message.node_id, NODE_SCOPE_MODEL)
        book = self._book(change.tenant)
        if state is HealthState.HEALTHY and book.verdict(scope, self._clock()).state is HealthState.HEALTHY:
            return
        book.apply(HealthChange(scope, Verdict(state, until, message.reason)))
