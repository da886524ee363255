"""Outcome reports to the control plane: one long-lived ReportOutcomes stream.

Requests only ever call ``enqueue`` or ``enqueue_record``: the outcome is
encoded at once (a few microseconds, ``sidecar.outcome_wire``) and appended
to a bounded deque; that never blocks and never awaits. When the deque is
full the oldest outcome is dropped (and counted). A background task drains it
in batches into one client stream (grpc.aio stream-unary fed by an async
request iterator): a batch leaves when it holds ``report_batch_size``
outcomes, ``report_failure_interval`` after a failure was queued (what the
fleet must learn fast), or ``report_interval`` after its first success (the
bulk; every write costs the event loop a fixed few hundred microseconds, so
successes go in few, large batches). When the stream breaks it reconnects with jittered
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

from keyplane.health.classify import ErrorClass
from keyplane.v1 import sidecar_service_pb2

from .channel import ChannelSource
from .config import SidecarConfig
from .metrics import LabelledChildren, SidecarMetrics
from .outcome_wire import OutcomeEncoder, batch_request, fill_outcome, frame_outcome, outcome_to_proto
from .proxy import AttemptRecord
from .watch import Backoff

__all__ = ["OutcomeReporter", "ReporterStats", "fill_outcome", "outcome_to_proto"]

_log = logging.getLogger(__name__)


# The ReportOutcomes method, called with batches already serialized.
_SUCCESS = sidecar_service_pb2.OUTCOME_CLASS_SUCCESS
_REPORT_METHOD = "/" + sidecar_service_pb2.DESCRIPTOR.services_by_name["SidecarService"].full_name + "/ReportOutcomes"


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


@dataclass(frozen=True, slots=True)
class _Batch:
    """One serialized ReportOutcomesRequest and how many outcomes it carries."""

    payload: bytes
    count: int


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
        # (enqueued at, an outcome encoded and framed for the batch)
        self._queue: deque[tuple[float, bytes]] = deque()
        self._encoder = OutcomeEncoder()
        self._capacity = config.report_queue_size
        self._backoff = Backoff(config.watch_backoff_base, config.watch_backoff_cap, rng)
        self._wakeup = asyncio.Event()
        # When the batch being gathered must leave (loop time; None: no batch
        # yet), whether it holds a failure, and the batch task's pause (resolved
        # to cut it short).
        self._flush_at: float | None = None
        self._urgent = False
        self._pause_done: asyncio.Future[None] | None = None
        self._stopping = False
        self._unreported_drops = 0
        self._call: grpc.aio.StreamUnaryCall[bytes, sidecar_service_pb2.ReportOutcomesResponse] | None = None
        self.stats = ReporterStats()
        self._dropped_count = LabelledChildren(metrics.outcomes_dropped) if metrics is not None else None

    # --- the request path ---------------------------------------------------------------

    def enqueue(self, outcome: sidecar_service_pb2.Outcome) -> None:
        """Queue one outcome; O(1), never blocks. A full queue drops its oldest."""
        self._put(frame_outcome(outcome.SerializeToString()), outcome.outcome_class != _SUCCESS)

    def enqueue_record(
        self, tenant: str, record: AttemptRecord, request_id: str, client_key_id: str = "", public_model: str = ""
    ) -> None:
        """Queue one keyed attempt, encoded now (same contract as ``enqueue``).

        Encoding here rather than in the batch task spreads the cost evenly over
        the requests instead of holding up whichever request is in flight when
        a batch is built. A keyless record is ignored (nothing to attribute).
        """
        if record.attempt.key is None:
            return
        if self._stopping:
            self._drop(1, "unsent")
            return
        self._put(
            frame_outcome(self._encoder.encode(tenant, record, request_id, client_key_id, public_model)),
            record.classification.error_class is not ErrorClass.SUCCESS,
        )

    def _put(self, outcome: bytes, failure: bool) -> None:
        if self._stopping:
            self._drop(1, "unsent")
            return
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._drop(1, "queue_full")
        self._queue.append((self._clock(), outcome))
        self.stats.enqueued += 1
        self._wakeup.set()
        if failure:
            self._hurry()
        elif len(self._queue) >= self._config.report_batch_size:
            self._cut_pause()

    def _hurry(self) -> None:
        """A failure is queued: the batch leaves within ``report_failure_interval``."""
        self._urgent = True
        flush_at = self._flush_at
        if flush_at is None:
            return  # the batch task sets it when it starts gathering
        soon = asyncio.get_running_loop().time() + self._config.report_failure_interval
        if soon < flush_at:
            self._flush_at = soon
            self._cut_pause()

    def _cut_pause(self) -> None:
        pause = self._pause_done
        if pause is not None and not pause.done():
            pause.set_result(None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to flush what is queued over a live stream, then return."""
        self._stopping = True
        self._wakeup.set()
        self._cut_pause()

    def abort(self) -> None:
        """Give up on flushing: cancel the live call."""
        self._stopping = True
        call = self._call
        if call is not None:
            call.cancel()
        self._wakeup.set()
        self._cut_pause()

    async def run(self, channel: grpc.aio.Channel | ChannelSource | None = None) -> None:
        """Report until ``stop``. On ``channel`` when given (shared; its owner
        closes it, after this returns), else on a channel of its own, closed
        on return. Each (re)connect takes the source's current channel."""
        own = channel is None
        if isinstance(channel, ChannelSource):
            source = channel
        else:
            source = ChannelSource(self._config) if channel is None else ChannelSource(self._config, fixed=channel)
        try:
            while not self._stopping:
                report: grpc.aio.StreamUnaryMultiCallable[bytes, sidecar_service_pb2.ReportOutcomesResponse]
                report = source.current().stream_unary(
                    _REPORT_METHOD,
                    request_serializer=None,  # batches are serialized by ``batch_request``
                    response_deserializer=sidecar_service_pb2.ReportOutcomesResponse.FromString,
                )
                if await self._stream_once(report):
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
                await source.close()

    async def _stopped(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            await self._wakeup.wait()

    # --- one stream ---------------------------------------------------------------------

    async def _stream_once(
        self, report: grpc.aio.StreamUnaryMultiCallable[bytes, sidecar_service_pb2.ReportOutcomesResponse]
    ) -> bool:
        """One ReportOutcomes call until it ends; True if it carried at least one batch."""
        stream = _Stream()
        requests = self._requests(stream)
        metadata = (("authorization", f"Bearer {self._config.sidecar_token}"),)
        call = report(requests, metadata=metadata)
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
            # The next stream gathers its first batch afresh: handed over at once,
            # it could be lost to a call that fails before it connects.
            self._flush_at = None
            self._wakeup.set()
            self._cut_pause()
            with contextlib.suppress(RuntimeError):  # still running inside grpc's poller: it ends on its own
                await requests.aclose()
        return stream.delivered

    async def _requests(self, stream: _Stream) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                batch = await self._next_batch(stream)
                if batch is None:
                    return
                stream.inflight = batch.count
                yield batch.payload
                # grpc asks for the next request only once this one is written.
                self._sent(stream.inflight)
                stream.inflight = 0
                stream.delivered = True
        finally:
            if stream.inflight:
                self._drop(stream.inflight, "unsent")
                stream.inflight = 0

    async def _next_batch(self, stream: _Stream) -> _Batch | None:
        config = self._config
        loop = asyncio.get_running_loop()
        while True:
            if stream.ended:
                return None
            self._drop_stale()
            if self._queue:
                if len(self._queue) < config.report_batch_size and not self._stopping:
                    # Let the batch gather (see the module docstring for how long).
                    if self._flush_at is None:
                        wait = config.report_failure_interval if self._urgent else config.report_interval
                        self._flush_at = loop.time() + wait
                    left = self._flush_at - loop.time()
                    if left > 0:
                        await self._pause(loop, left)
                        continue
                return self._take_batch()
            self._flush_at, self._urgent = None, False  # (stale outcomes dropped: nothing to send)
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _pause(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``_cut_pause`` is called meanwhile."""
        done: asyncio.Future[None] = loop.create_future()
        self._pause_done = done
        timer = loop.call_later(seconds, _settle, done)
        try:
            await done
        finally:
            timer.cancel()
            self._pause_done = None

    def _take_batch(self) -> _Batch:
        """Up to ``report_batch_size`` queued outcomes as one serialized request."""
        queue = self._queue
        popleft = queue.popleft
        count = min(len(queue), self._config.report_batch_size)
        framed = [popleft()[1] for _ in range(count)]
        self._flush_at = None
        if not queue:
            self._urgent = False  # (a failure left over, if any, keeps the next batch urgent)
        dropped, self._unreported_drops = self._unreported_drops, 0
        return _Batch(batch_request(framed, self._config.sidecar_id, dropped), count)

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


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
