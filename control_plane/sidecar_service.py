"""The sidecar gRPC service: one long-lived Watch stream per sidecar, and one
long-lived ReportOutcomes stream per sidecar.

The Watch handler only checks the request against the token's scope, admits
the stream (``control_plane.watch_admission``: a stampede of reconnecting
sidecars is told, with ``UNAVAILABLE`` and a retry delay in the trailing
metadata, ``keyplane.pushback``, when to come back) and forwards what its
subscription to the snapshot cache yields; the queueing, coalescing and
snapshot-or-delta decisions live in ``control_plane.snapshot_cache``.

The ReportOutcomes handler validates each outcome (tenant within the token's
scope, a known class and provider, a key id and a model); invalid outcomes
are counted and skipped, never fatal to the stream. Each batch goes to the
``HealthAggregator`` and its usage to the ``UsageFolder`` (rollups); the reply, when the sidecar ends the stream, is the
number of outcomes accepted.

With a ``FleetTracker``, the Watch handler notes every version it sends and
the Ack handler what the sidecar applied or rejected (xDS ACK/NACK), for
``keyplane proxy-status`` and WaitForVersion. A sidecar resuming from a
version this replica has not reached (it lags the store) waits while the
replica catches up from the store, or is refused with UNAVAILABLE so that it
retries, possibly elsewhere: it is never sent an older snapshot. Only when the
store itself is behind the sidecar (restored from a backup) is the snapshot
sent, marked ``version_reset``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from control_plane import validation as v
from control_plane.affinity import Affinity
from control_plane.affinity_rpc import AffinityRpcs
from control_plane.aggregator import HealthAggregator, ReportedOutcome
from control_plane.auth import SidecarScope, current_sidecar_scope
from control_plane.fleet import FleetTracker
from control_plane.node_health import NodeHealthFolder
from control_plane.quota_broker import QuotaBroker
from control_plane.quota_stream import stream_quota
from control_plane.snapshot_cache import SnapshotCache, SnapshotTooLarge
from control_plane.status import status_for
from control_plane.usage import UsageFolder
from control_plane.watch_admission import WatchAdmission
from keyplane import convert
from keyplane.errors import KeyplaneError, NotFound
from keyplane.going_away import GOING_AWAY, GOING_AWAY_DETAILS
from keyplane.pushback import encode_retry_delay
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import sidecar_service_pb2 as pb
from keyplane.v1 import sidecar_service_pb2_grpc

__all__ = ["SidecarService"]

log = logging.getLogger(__name__)

_MAX_SIDECAR_ID = 256
_MAX_ERROR_DETAIL = 1024


class SidecarService(AffinityRpcs, sidecar_service_pb2_grpc.SidecarServiceServicer):
    def __init__(
        self,
        cache: SnapshotCache,
        health: HealthAggregator | None = None,
        *,
        fleet: FleetTracker | None = None,
        catch_up: Callable[[], Awaitable[int]] | None = None,
        lag_wait: float = 5.0,
        admission: WatchAdmission | None = None,
        affinity: Affinity | None = None,
        node_health: NodeHealthFolder | None = None,
        quota: QuotaBroker | None = None,
        usage: UsageFolder | None = None,
    ) -> None:
        self._cache = cache
        self._affinity = affinity  # GetOrCreateBinding, RefreshBindings (control_plane.affinity_rpc)
        self._node_health = node_health  # folds the outcomes that name a node
        self._quota = quota  # leases of the limits (StreamQuota)
        self._health = health
        self._fleet = fleet
        # Reads the store's change log into the cache (SnapshotHub.catch_up).
        self._catch_up = catch_up
        self._lag_wait = lag_wait
        self._admission = admission
        # Folds the usage of every valid outcome into rollups (``control_plane.usage``).
        self._usage = usage
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
        delay = self._admission.admit() if self._admission is not None else None
        if delay is not None:
            log.debug("sidecar %r (%s) told to come back in %.3fs", sidecar_id, peer, delay)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the control plane is busy with reconnecting sidecars; retry in {round(delay * 1000)} ms",
                trailing_metadata=encode_retry_delay(delay),
            )
        version_reset: bool | None = False
        if request.resume_version > self._cache.version:
            version_reset = await self._catch_up_to(request.resume_version, sidecar_id, peer)
            if version_reset is None:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"this control-plane replica is at version {self._cache.version}, behind the version "
                    f"{request.resume_version} the sidecar holds, and could not catch up with the store within "
                    f"{self._lag_wait:g}s; retry (another replica may be ahead)",
                )
        subscription = self._cache.subscribe(tenants, request.resume_version, sidecar_id=sidecar_id, peer=peer)
        fleet = self._fleet
        handle = fleet.opened(sidecar_id, tenants, peer) if fleet is not None else None
        log.info(
            "sidecar %r (%s) watching %s from version %d",
            sidecar_id,
            peer,
            "all tenants" if tenants is None else ",".join(sorted(tenants)),
            request.resume_version,
        )
        try:
            async for response in subscription:
                if version_reset and response.WhichOneof("payload") == "snapshot":
                    response.version_reset = True
                    version_reset = False
                if fleet is not None and handle is not None:
                    fleet.sent(handle, response.version)
                yield response
            if self.going_away:
                # This replica is shutting down: the sidecar reconnects at once (to another one).
                await context.abort(grpc.StatusCode.UNAVAILABLE, GOING_AWAY_DETAILS, trailing_metadata=GOING_AWAY)
        except SnapshotTooLarge as exc:
            log.error("sidecar %r (%s): %s", sidecar_id, peer, exc)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            subscription.close()
            if fleet is not None and handle is not None:
                fleet.closed(handle)
            log.info("sidecar %r (%s) stream ended", sidecar_id, peer)

    async def _catch_up_to(self, version: int, sidecar_id: str, peer: str) -> bool | None:
        """The sidecar holds ``version``, ahead of this replica: read the store's
        change log until the replica has it. False: caught up; True: the
        store itself is behind the sidecar (its snapshot is a reset); None:
        not caught up within ``lag_wait`` (the store is slow or away)."""
        if self._catch_up is None:
            return None
        try:
            reached = await asyncio.wait_for(self._catch_up(), self._lag_wait)
        except Exception as exc:
            log.warning(
                "sidecar %r (%s) holds version %d, ahead of this replica (%d), which could not catch up: %s",
                sidecar_id,
                peer,
                version,
                self._cache.version,
                type(exc).__name__,
            )
            return None
        if reached >= version:
            return False
        log.warning(
            "sidecar %r (%s) holds version %d but the store's newest is %d: the store was restored or replaced; "
            "the sidecar is sent the store's state",
            sidecar_id,
            peer,
            version,
            reached,
        )
        return True

    async def Ack(self, request: pb.AckRequest, context: aio.ServicerContext[Any, Any]) -> pb.AckResponse:
        scope = current_sidecar_scope()
        if scope is None:  # only when served without the AuthInterceptor
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")
        if self._fleet is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this control plane does not track acknowledgements")
        assert self._fleet is not None and scope is not None
        sidecar_id = request.sidecar_id[:_MAX_SIDECAR_ID]
        if not sidecar_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sidecar_id: required")
        # A token speaks only for sidecars whose watched tenants it covers: one tenant's
        # sidecar cannot overwrite another's status. The stream is normally on this
        # replica (the sidecar's one channel); else the shared record says.
        allowed = self._fleet.may_ack(sidecar_id, scope.tenants)
        if allowed is None:
            try:
                allowed = await self._fleet.may_ack_shared(sidecar_id, scope.tenants)
            except KeyplaneError as exc:
                mapped = status_for(exc)
                assert mapped is not None
                await context.abort(*mapped)
        if not allowed:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"sidecar {sidecar_id!r} watches tenants outside this token's scope (or has no watch stream)",
            )
        self._fleet.acked(
            sidecar_id, request.applied_version, request.rejected_version, request.error_detail[:_MAX_ERROR_DETAIL]
        )
        return pb.AckResponse()

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
            if messages and self._usage is not None:
                self._usage.fold(messages)
            if batch:
                try:
                    accepted += await self._health.ingest(batch, messages)
                except Exception:
                    log.exception("folding an outcome report failed")
                if self._node_health is not None:
                    await self._node_health.ingest([(m.tenant, m) for m in messages if m.node_id])
        log.debug("sidecar %r (%s) reported %d outcomes (%d rejected)", sidecar_id, peer, accepted, rejected)
        return pb.ReportOutcomesResponse(accepted=accepted)

    async def StreamQuota(
        self, request_iterator: AsyncIterator[lpb.StreamQuotaRequest], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[lpb.StreamQuotaResponse]:
        async for response in stream_quota(self._quota, request_iterator, context):
            yield response


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
