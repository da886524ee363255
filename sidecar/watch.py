"""The sidecar's view of the control plane: one long-lived Watch stream.

Every message is applied to ``SidecarState``. When the stream breaks, the
sidecar keeps serving its last-known-good state and reconnects: at once after a
stream that was up, or when the control-plane replica said it is shutting down
(``keyplane.going_away``), then with jittered exponential backoff (capped low,
1 s by default), asking only for what it missed (``resume_version``). A control
plane shedding load says how long to wait (``keyplane.pushback``); that wait wins.
Every applied message is also handed to ``on_applied`` (the snapshot keeper
persists it off the request path).

``open_channel`` makes the sidecar's one channel (one TCP connection) to the
control plane; ``Sidecar`` shares it, through a ``ChannelSource`` that re-opens
it when the TLS files change, between this stream and the outcome reports
(``sidecar.reporter``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import grpc
import grpc.aio

from keyplane.going_away import is_going_away
from keyplane.pushback import decode_retry_delay
from keyplane.v1 import sidecar_service_pb2, sidecar_service_pb2_grpc

from .ack import AckSender, VersionGate
from .channel import ChannelSource, open_channel
from .config import SidecarConfig
from .state import SidecarState

__all__ = ["Backoff", "WatchClient", "open_channel"]

_log = logging.getLogger(__name__)

# A stream up at least this long earns an immediate reconnect when it breaks
# (a control plane that accepts and drops streams at once gets the backoff).
_STABLE_STREAM = 1.0
# A call waiting for the channel to connect says so after this long, then once a minute.
_WAITING_LOG_AFTER = 5.0
_WAITING_LOG_EVERY = 60.0


class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)].

    After ``reset(immediate=True)`` the first delay is 0 (reconnect at once), and
    the ones after it start over from ``base``.
    """

    __slots__ = ("_base", "_cap", "_failures", "_immediate", "_rng")

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self._base = base
        self._cap = cap
        self._rng = rng if rng is not None else random.Random()
        self._failures = 0
        self._immediate = False

    @property
    def failures(self) -> int:
        return self._failures

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return float(min(self._cap, self._base * (2.0 ** min(self._failures, 32))))

    def next_delay(self) -> float:
        if self._immediate:
            self._immediate = False
            return 0.0
        delay = self._rng.uniform(0.0, self.ceiling())
        self._failures += 1
        return delay

    def reset(self, *, immediate: bool = False) -> None:
        self._failures = 0
        self._immediate = immediate


class WatchClient:
    """Keeps ``state`` in step with the control plane until ``stop``."""

    def __init__(
        self,
        config: SidecarConfig,
        state: SidecarState,
        *,
        rng: random.Random | None = None,
        on_applied: Callable[[sidecar_service_pb2.WatchResponse], None] | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._on_applied = on_applied
        # The wait the control plane asked for when it last refused a stream (pushback).
        self._server_delay: float | None = None
        self.pushbacks = 0
        # Says, while a call waits for the control plane, that it still does.
        self._waiting: asyncio.TimerHandle | None = None
        self._backoff = Backoff(config.watch_backoff_base, config.watch_backoff_cap, rng)
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._call: (
            grpc.aio.UnaryStreamCall[sidecar_service_pb2.WatchRequest, sidecar_service_pb2.WatchResponse] | None
        ) = None
        self._force_snapshot = False
        self._streams = 0
        # Each message is applied or rejected (and acknowledged) through these (sidecar/ack.py).
        self.gate = VersionGate(state, config.providers)
        self.acks = AckSender(config.sidecar_id, config.sidecar_token)
        # The last stream ended because its control-plane replica shuts down (``keyplane.going_away``).
        self._going_away = False

    @property
    def streams_opened(self) -> int:
        """How many streams delivered at least one message (reconnects + 1)."""
        return self._streams

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for the first snapshot; False on timeout."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        """Ask ``run`` to return; safe to call from any task, more than once."""
        self._stopping.set()
        self.acks.close()
        call = self._call
        if call is not None:
            call.cancel()

    async def run(self, channel: grpc.aio.Channel | ChannelSource | None = None) -> None:
        """Watch until ``stop``. On ``channel`` when given (shared; its owner
        closes it), else on a channel of its own, closed on return. Each
        (re)connect takes the source's current channel."""
        own = channel is None
        if isinstance(channel, ChannelSource):
            source = channel
        else:
            source = ChannelSource(self._config) if channel is None else ChannelSource(self._config, fixed=channel)
        try:
            while not self._stopping.is_set():
                stub = sidecar_service_pb2_grpc.SidecarServiceStub(source.current())
                started = time.monotonic()
                self._going_away = False
                if await self._watch_once(stub):
                    self._backoff.reset(immediate=time.monotonic() - started >= _STABLE_STREAM)
                    if self._going_away:
                        continue  # at once: the channel already left that replica (GOAWAY)
                if self._stopping.is_set():
                    break
                delay = self._backoff.next_delay()
                if self._server_delay is not None:
                    delay, self._server_delay = self._server_delay, None
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            if own:
                await source.close()

    async def _watch_once(self, stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub) -> bool:
        """One stream, until it ends; True if it delivered at least one message."""
        state = self._state
        request = sidecar_service_pb2.WatchRequest(
            tenants=list(self._config.tenants),
            resume_version=0 if self._force_snapshot else state.version,
            sidecar_id=self._config.sidecar_id,
        )
        metadata = (("authorization", f"Bearer {self._config.sidecar_token}"),)
        # wait_for_ready: while the control plane is away the call waits for the
        # channel to connect (its reconnect backoff is capped like ours) instead of
        # failing fast, so the stream opens the moment the control plane is back.
        call = stub.Watch(request, metadata=metadata, wait_for_ready=True)
        self._call = call
        self.gate.reset_stream()
        self.acks.use(stub)
        received = False
        loop = asyncio.get_running_loop()
        self._waiting = loop.call_later(_WAITING_LOG_AFTER, self._log_waiting, loop, _WAITING_LOG_AFTER)
        try:
            async for message in call:
                try:
                    decision = self.gate.offer(message)
                except Exception as exc:  # a bad message must not kill the sidecar
                    _log.error(
                        "could not apply watch message at version %d (%s); asking for a fresh snapshot",
                        message.version,
                        type(exc).__name__,
                    )
                    self._force_snapshot = True
                    call.cancel()
                    break
                self.acks.note(state.version, self.gate.rejected_version, self.gate.error_detail)
                if decision.resync:
                    call.cancel()
                    break
                if self._on_applied is not None:
                    for applied in decision.messages:
                        try:
                            self._on_applied(applied)
                        except Exception as exc:  # the state is applied; only persisting it failed
                            _log.error("after applying version %d: %s", applied.version, type(exc).__name__)
                if message.WhichOneof("payload") == "snapshot":
                    self._force_snapshot = False
                if not received:
                    self._cancel_waiting()
                    received = True
                    self._streams += 1
                    state.set_connected(True)
                    _log.info("watch stream to the control plane is live at version %d", state.version)
                if state.is_ready:
                    self._ready.set()
            else:
                if not self._stopping.is_set():
                    _log.warning("the control plane ended the watch stream; reconnecting")
        except grpc.aio.AioRpcError as exc:
            self._server_delay = _pushback(exc)
            if self._server_delay is not None:
                self.pushbacks += 1
                _log.info("the control plane is busy and asked for %.3fs before reconnecting", self._server_delay)
            if exc.code() is grpc.StatusCode.UNAVAILABLE and is_going_away(exc.trailing_metadata()):
                self._going_away = True
                _log.info("the control-plane replica is shutting down; reconnecting at once")
            else:
                self._log_rpc_error(exc)
        except asyncio.CancelledError:
            # Raised both when our task is cancelled (propagate) and when the call
            # was cancelled locally by ``stop`` or a resync (swallow).
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._cancel_waiting()
            self._call = None
            if received:
                state.set_connected(False)
        return received

    def _cancel_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    def _log_waiting(self, loop: asyncio.AbstractEventLoop, waited: float) -> None:
        """The call has been waiting ``waited`` seconds for the control plane (timer callback)."""
        if self._stopping.is_set() or self._call is None:
            return
        state = self._state
        serving = f"serving snapshot version {state.version}" if state.is_ready else "nothing to serve yet"
        _log.warning(
            "cannot reach the control plane at %s for %.0fs; %s; still trying",
            self._config.control_plane_target,
            waited,
            serving,
        )
        self._waiting = loop.call_later(_WAITING_LOG_EVERY, self._log_waiting, loop, waited + _WAITING_LOG_EVERY)

    def _log_rpc_error(self, exc: grpc.aio.AioRpcError) -> None:
        if self._stopping.is_set():
            return
        code = exc.code()
        failures = self._backoff.failures
        # Loud on the first failure of a run of failures, then once in a while.
        loud = failures == 0 or failures % 50 == 0
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            _log.log(
                logging.ERROR if loud else logging.DEBUG,
                "the control plane refused the sidecar token (%s) for tenants %s; retrying with backoff",
                code.name,
                ",".join(self._config.tenants) or "<all>",
            )
        else:
            details = (exc.details() or "")[:200]
            _log.log(
                logging.WARNING if loud else logging.DEBUG,
                "watch stream to %s failed: %s %s; serving last-known state version %d meanwhile",
                self._config.control_plane_target,
                code.name,
                details,
                self._state.version,
            )


def _pushback(exc: grpc.aio.AioRpcError) -> float | None:
    """The wait a control plane shedding load asked for, if it did."""
    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return None
    try:
        return decode_retry_delay(exc.trailing_metadata())
    except Exception:  # malformed metadata: ignore it, back off as usual
        return None
