"""The sidecar gRPC service: one long-lived Watch stream per sidecar, and one
long-lived ReportOutcomes stream per sidecar.

The Watch handler only checks the request against the token's scope and
forwards what its subscription to the snapshot cache yields; the queueing,
coalescing and snapshot-or-delta decisions live in ``control_plane.snapshot_cache``.

The ReportOutcomes handler validates each outcome (tenant within the token's
scope, a known class and provider, a key id and a model); invalid outcomes
are counted and skipped, never fatal to the stream. Each batch goes to the
``HealthAggregator``; the reply, when the sidecar ends the stream, is the
number of outcomes accepted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from control_plane import validation as v
from control_plane.aggregator import HealthAggregator, ReportedOutcome
from control_plane.auth import SidecarScope, current_sidecar_scope
from control_plane.snapshot_cache import SnapshotCache, SnapshotTooLarge
from control_plane.status import status_for
from keyplane import convert
from keyplane.errors import KeyplaneError, NotFound
from keyplane.going_away import GOING_AWAY, GOING_AWAY_DETAILS
from keyplane.v1 import sidecar_service_pb2 as pb
from keyplane.v1 import sidecar_service_pb2_grpc

__all__ = ["SidecarService"]

log = logging.getLogger(__name__)

_MAX_SIDECAR_ID = 256


class SidecarService(sidecar_service_pb2_grpc.SidecarServiceServicer):
    def __init__(self, cache: SnapshotCache, health: HealthAggregator | None = None) -> None:
        self._cache = cache
        self._health = health
        # Set by ``ControlPlane.stop`` before it ends the watch streams.
        self.going_away = False
        # Converted success outcomes, reused across reports (see ``_validate_batch``).
        self._successes: dict[_SuccessKey, ReportedOutcome] = {}

    def _watch_set(self, request: pb.WatchRequest) -> frozenset[str] | None:
        scope = current_sidecar_scope()
        if scope is None:  # only when served without the AuthInterceptor
            raise PermissionError
        requested = [v.validate_tenant_name(t, field="tenants") for t in request.tenants]
        tenants = scope.resolve(requested)
        unknown = sorted(t for t in set(requested) if not self._cache.has_tenant(t))
        if unknown:
            raise NotFound(f"unknown tenant(s): {', '.join(unknown)}")
        return tenants

    async def Watch(
        self, request: pb.WatchRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchResponse]:
        # Everything needed from the context is read now: after the client
        # cancels, touching the context can crash grpcio (a segfault was
        # reproduced with one ``context.peer()`` in the ``finally`` below).
        peer = context.peer()
        try:
            tenants = self._watch_set(request)
        except PermissionError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")
        except KeyplaneError as exc:
            mapped = status_for(exc)
            assert mapped is not None
            await context.abort(*mapped)
        sidecar_id = request.sidecar_id[:_MAX_SIDECAR_ID]
        subscription = self._cache.subscribe(tenants, request.resume_version, sidecar_id=sidecar_id, peer=peer)
        log.info(
            "sidecar %r (%s) watching %s from version %d",
            sidecar_id,
            peer,
            "all tenants" if tenants is None else ",".join(sorted(tenants)),
            request.resume_version,
        )
        try:
            async for response in subscription:
                yield response
            if self.going_away:
                # This replica is shutting down: the sidecar reconnects at once (to another one).
                await context.abort(grpc.StatusCode.UNAVAILABLE, GOING_AWAY_DETAILS, trailing_metadata=GOING_AWAY)
        except SnapshotTooLarge as exc:
            log.error("sidecar %r (%s): %s", sidecar_id, peer, exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            subscription.close()
            log.info("sidecar %r (%s) stream ended", sidecar_id, peer)

    async def ReportOutcomes(
        self,
        request_iterator: AsyncIterator[pb.ReportOutcomesRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.ReportOutcomesResponse:
        peer = context.peer()  # read once, before any await (see Watch)
        scope = current_sidecar_scope()
        if scope is None:  # only when served without the AuthInterceptor
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")
        if self._health is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this control plane does not aggregate health")
        assert scope is not None and self._health is not None
        accepted = rejected = 0
        sidecar_id = ""
        first = True
        async for request in request_iterator:
            sidecar_id = request.sidecar_id[:_MAX_SIDECAR_ID] or sidecar_id
            if first:
                first = False
                log.info("sidecar %r (%s) reporting outcomes", sidecar_id, peer)
            batch, messages, invalid, out_of_scope = _validate_batch(request, scope, self._successes)
            self._health.note_rejected(invalid=invalid, out_of_scope=out_of_scope, dropped_by_sidecar=request.dropped)
            if out_of_scope and not rejected:
                log.warning("sidecar %r (%s) reported outcomes outside its tenant scope", sidecar_id, peer)
            rejected += invalid + out_of_scope
            if batch:
                try:
                    accepted += await self._health.ingest(batch, messages)
                except Exception:
                    log.exception("folding an outcome report failed")
        log.debug("sidecar %r (%s) reported %d outcomes (%d rejected)", sidecar_id, peer, accepted, rejected)
        return pb.ReportOutcomesResponse(accepted=accepted)


# Reports are mostly successes that look alike (same tenant, key, model, status and
# reason); their converted form is immutable, so it is converted once and reused.
_SUCCESS = pb.OUTCOME_CLASS_SUCCESS
_MAX_REUSED = 4096
_SuccessKey = tuple[str, str, int, str, int, str, bool, bool]


def _validate_batch(
    request: pb.ReportOutcomesRequest,
    scope: SidecarScope,
    successes: dict[_SuccessKey, ReportedOutcome],
) -> tuple[list[ReportedOutcome], list[pb.Outcome], int, int]:
    """(the valid outcomes, the messages they came from, how many were invalid,
    how many were out of scope).

    ``successes`` memoises converted successes across batches (bounded)."""
    batch: list[ReportedOutcome] = []
    messages: list[pb.Outcome] = []
    invalid = out_of_scope = 0
    for message in request.outcomes:
        tenant = message.tenant
        if not scope.allows(tenant):
            out_of_scope += 1
            continue
        key: _SuccessKey | None = None
        if message.outcome_class == _SUCCESS and not message.HasField("retry_after"):
            key = (
                tenant,
                message.key_id,
                message.provider,
                message.model,
                message.status_code,
                message.reason,
                message.provider_final,
                message.recovered,
            )
            found = successes.get(key)
            if found is not None:
                batch.append(found)
                messages.append(message)
                continue
        try:
            outcome = convert.outcome_from_proto(message)
        except ValueError:
            invalid += 1
            continue
        reported = ReportedOutcome(tenant, outcome)
        if key is not None:
            if len(successes) >= _MAX_REUSED:
                successes.clear()
            successes[key] = reported
        batch.append(reported)
        messages.append(message)
    return batch, messages, invalid, out_of_scope
