"""Outcome reports to the control plane: one long-lived ReportOutcomes stream.

Requests only ever call ``enqueue``: an O(1) append to a bounded deque that
never blocks and never awaits. When the deque is full the oldest outcome is
dropped (and counted). A background task drains it in batches (up to
``report_batch_size`` outcomes, or whatever arrived within
``report_interval``) into one client stream (grpc.aio stream-unary fed by an
async request iterator). When the stream breaks it reconnects with jittered
exponential backoff; meanwhile outcomes older than ``report_max_age`` are
dropped (counted) rather than sent late, so an unreachable control plane
costs a bounded amount of memory and never penalises keys for the past.
In a sidecar the stream shares the watch stream's channel (one TCP
connection to the control plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from keyplane import convert
from keyplane.v1 import sidecar_service_pb2, sidecar_service_pb2_grpc

from .config import SidecarConfig
from .metrics import LabelledChildren, SidecarMetrics
from .model import provider_to_proto
from .proxy import AttemptRecord
from .watch import Backoff, open_channel

__all__ = ["OutcomeReporter", "ReporterStats", "fill_outcome", "outcome_to_proto"]

_log = logging.getLogger(__name__)


# Outcomes built per slice of a batch before the batch task yields to the event
# loop: a batch of hundreds is built in slices, so requests are never held up
# behind the whole batch (a slice is tens of microseconds).
_BUILD_SLICE = 32


def fill_outcome(message: sidecar_service_pb2.Outcome, tenant: str, record: AttemptRecord, request_id: str) -> None:
    """Write the report of one keyed attempt into ``message`` (field by field, in
    place: about half the cost of building a message and copying it into a batch)."""
    key = record.attempt.key
    if key is None:
        raise ValueError("a keyless attempt has no outcome to report")
    c = record.classification
    target = record.attempt.target
    message.tenant = tenant
    message.key_id = key.id
    message.provider = provider_to_proto(target.provider)
    message.model = target.upstream_model
    message.outcome_class = convert.error_class_to_proto(c.error_class)
    message.status_code = max(0, c.status)
    message.latency_ms = min(record.latency_ms, 2**32 - 1)
    message.recovered = record.recovered
    message.provider_final = record.provider_final
    message.request_id = request_id
    started = record.started
    seconds = int(started // 1)
    message.time.seconds = seconds
    message.time.nanos = min(round((started - seconds) * 1e9), 999_999_999)
    message.reason = c.reason[:200]
    if c.retry_after is not None:
        message.retry_after.FromNanoseconds(int(c.retry_after * 1e9))


def outcome_to_proto(tenant: str, record: AttemptRecord, request_id: str) -> sidecar_service_pb2.Outcome | None:
    """The report for one attempt; None for a keyless attempt (nothing to attribute it to)."""
    if record.attempt.key is None:
        return None
    message = sidecar_service_pb2.Outcome()
    fill_outcome(message, tenant, record, request_id)
    return message


# An attempt queued from the request path: (tenant, record, request id).
_Pending = tuple[str, AttemptRecord, str]


@dataclass(slots=True)
class ReporterStats:
    """Counters since start (tests, logs); the same numbers feed the metrics."""

    enqueued: int = 0
    sent: int = 0
    # reason ("queue_full", "stale", "unsent") -> count
    dropped: dict[str, int] = field(default_factory=dict)
    streams: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(slots=True)
class _Stream:
    """Book-keeping of one ReportOutcomes call."""

    ended: bool = False
    delivered: bool = False
    inflight: int = 0


class OutcomeReporter:
    """``enqueue`` from anywhere on the loop; ``run`` as a task; ``stop`` then await the task."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        metrics: SidecarMetrics | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        # (enqueued at, a ready message or (tenant, record, request id) built into one later)
        self._queue: deque[tuple[float, sidecar_service_pb2.Outcome | _Pending]] = deque()
        self._capacity = config.report_queue_size
        self._backoff = Backoff(config.watch_backoff_base, config.watch_backoff_cap, rng)
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._unreported_drops = 0
        self._call: (
            grpc.aio.StreamUnaryCall[
                sidecar_service_pb2.ReportOutcomesRequest, sidecar_service_pb2.ReportOutcomesResponse
            ]
            | None
        ) = None
        self.stats = ReporterStats()
        self._dropped_count = LabelledChildren(metrics.outcomes_dropped) if metrics is not None else None

    # --- the request path ---------------------------------------------------------------

    def enqueue(self, outcome: sidecar_service_pb2.Outcome) -> None:
        """Queue one outcome; O(1), never blocks. A full queue drops its oldest."""
        self._put(outcome)

    def enqueue_record(self, tenant: str, record: AttemptRecord, request_id: str) -> None:
        """Queue one keyed attempt; the ``Outcome`` message is built in the batch task.

        Same contract as ``enqueue`` (O(1), never blocks); ``record`` must not be
        changed afterwards. A keyless record is ignored (nothing to attribute).
        """
        if record.attempt.key is None:
            return
        self._put((tenant, record, request_id))

    def _put(self, outcome: sidecar_service_pb2.Outcome | _Pending) -> None:
        if self._stopping:
            self._drop(1, "unsent")
            return
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._drop(1, "queue_full")
        self._queue.append((self._clock(), outcome))
        self.stats.enqueued += 1
        self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to flush what is queued over a live stream, then return."""
        self._stopping = True
        self._wakeup.set()

    def abort(self) -> None:
        """Give up on flushing: cancel the live call."""
        self._stopping = True
        call = self._call
        if call is not None:
            call.cancel()
        self._wakeup.set()

    async def run(self, channel: grpc.aio.Channel | None = None) -> None:
        """Report until ``stop``. On ``channel`` when given (shared; its owner
        closes it, after this returns), else on a channel of its own, closed
        on return."""
        own = channel is None
        if channel is None:
            channel = open_channel(self._config)
        try:
            stub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
            while not self._stopping:
                if await self._stream_once(stub):
                    self._backoff.reset()
                if self._stopping:
                    break
                self._drop_stale()
                delay = self._backoff.next_delay()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped(), delay)
        finally:
            left = len(self._queue)
            self._queue.clear()
            if left:
                self._drop(left, "unsent")
            if own:
                await channel.close(None)

    async def _stopped(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            await self._wakeup.wait()

    # --- one stream ---------------------------------------------------------------------

    async def _stream_once(self, stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub) -> bool:
        """One ReportOutcomes call until it ends; True if it carried at least one batch."""
        stream = _Stream()
        requests = self._requests(stream)
        metadata = (("authorization", f"Bearer {self._config.sidecar_token}"),)
        call = stub.ReportOutcomes(requests, metadata=metadata)
        self._call = call
        self.stats.streams += 1
        try:
            response = await call
            _log.debug("outcome stream closed; the control plane accepted %d", response.accepted)
        except grpc.aio.AioRpcError as exc:
            self._log_rpc_error(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._call = None
            stream.ended = True
            self._wakeup.set()
            with contextlib.suppress(RuntimeError):  # still running inside grpc's poller: it ends on its own
                await requests.aclose()
        return stream.delivered

    async def _requests(self, stream: _Stream) -> AsyncGenerator[sidecar_service_pb2.ReportOutcomesRequest, None]:
        try:
            while True:
                request = await self._next_batch(stream)
                if request is None:
                    return
                stream.inflight = len(request.outcomes)
                yield request
                # grpc asks for the next request only once this one is written.
                self._sent(stream.inflight)
                stream.inflight = 0
                stream.delivered = True
        finally:
            if stream.inflight:
                self._drop(stream.inflight, "unsent")
                stream.inflight = 0

    async def _next_batch(self, stream: _Stream) -> sidecar_service_pb2.ReportOutcomesRequest | None:
        config = self._config
        while True:
            if stream.ended:
                return None
            self._drop_stale()
            if self._queue:
                if len(self._queue) < config.report_batch_size and not self._stopping:
                    # Let a burst gather into one batch.
                    await asyncio.sleep(config.report_interval)
                    if stream.ended:
                        return None
                    self._drop_stale()
                    if not self._queue:
                        continue
                return await self._build_batch(stream)
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _build_batch(self, stream: _Stream) -> sidecar_service_pb2.ReportOutcomesRequest | None:
        """Up to ``report_batch_size`` queued outcomes as one request, built in slices."""
        queue = self._queue
        request = sidecar_service_pb2.ReportOutcomesRequest(sidecar_id=self._config.sidecar_id)
        outcomes = request.outcomes
        add = outcomes.add
        for built in range(self._config.report_batch_size):
            if not queue:
                break
            if built and built % _BUILD_SLICE == 0:
                await asyncio.sleep(0)  # let requests run between slices
                if stream.ended:
                    self._drop(len(outcomes), "unsent")
                    return None
                if not queue:
                    break
            item = queue.popleft()[1]
            if isinstance(item, tuple):
                tenant, record, request_id = item
                fill_outcome(add(), tenant, record, request_id)
            else:
                outcomes.append(item)
        request.dropped, self._unreported_drops = self._unreported_drops, 0
        return request

    # --- counting -----------------------------------------------------------------------

    def _drop_stale(self) -> None:
        horizon = self._clock() - self._config.report_max_age
        stale = 0
        while self._queue and self._queue[0][0] < horizon:
            self._queue.popleft()
            stale += 1
        if stale:
            self._drop(stale, "stale")

    def _drop(self, count: int, reason: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + count
        self._unreported_drops += count
        if self._dropped_count is not None:
            self._dropped_count.get(reason).inc(count)

    def _sent(self, count: int) -> None:
        self.stats.sent += count
        if self._metrics is not None:
            self._metrics.outcomes_sent.inc(count)

    def _log_rpc_error(self, exc: grpc.aio.AioRpcError) -> None:
        if self._stopping and exc.code() is grpc.StatusCode.CANCELLED:
            return
        failures = self._backoff.failures
        loud = failures == 0 or failures % 50 == 0
        _log.log(
            logging.WARNING if loud else logging.DEBUG,
            "outcome report stream to %s failed: %s %s; %d outcome(s) queued, %d dropped so far",
            self._config.control_plane_target,
            exc.code().name,
            (exc.details() or "")[:200],
            len(self._queue),
            self.stats.dropped_total,
        )
