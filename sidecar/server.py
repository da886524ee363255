"""Runs a sidecar: the upstream client, the watch stream, the outcome reports
and the HTTP server.

``Sidecar`` works inside an existing event loop (a CLI's ``asyncio.run`` or a
pytest-asyncio test): ``await start()`` returns once the socket listens,
``await stop()`` drains and closes everything.

The watch stream and the outcome reports share one gRPC channel, so a sidecar
holds one TCP connection to the control plane (one keepalive, one reconnect).
Each stream still retries on its own backoff; the channel is closed last, once
both are done (the reports flush over it on stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

from .access_log import AccessLog
from .app import SidecarApp
from .channel import ChannelSource
from .config import SidecarConfig
from .edge_protocol import EdgeLimits, edge_protocol
from .limits import Limiter
from .metrics import SidecarMetrics
from .node_affinity import NodeAffinity
from .quota_client import QuotaClient
from .reporter import OutcomeReporter
from .router import Balancer
from .shutdown import CUT
from .snapshot_file import SnapshotKey
from .snapshot_keeper import SnapshotKeeper
from .state import SidecarState
from .upstream import UpstreamClient
from .watch import WatchClient

__all__ = ["Sidecar", "serve"]

_log = logging.getLogger(__name__)

# Seconds after the grace that uvicorn itself cancels what still runs (the cut
# requests have that long to send their last event).
_CUT_MARGIN = 2


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: whoever runs the sidecar owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Sidecar:
    """One sidecar process's moving parts. ``watch=False`` leaves ``state`` to the caller;
    outcome reports follow ``watch`` unless ``report`` says otherwise (and
    ``config.report_outcomes`` allows them)."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        state: SidecarState | None = None,
        watch: bool = True,
        report: bool | None = None,
    ) -> None:
        self.config = config
        self.state = state if state is not None else SidecarState(health_policy=config.health_policy)
        self.upstream = UpstreamClient(
            connect_timeout=config.upstream_connect_timeout,
            read_timeout=config.upstream_read_timeout,
            total_timeout=config.request_timeout,
            limit_per_host=config.upstream_limit_per_host,
            keepalive_timeout=config.upstream_keepalive_timeout,
            trust_env=config.upstream_trust_env,
            ca_file=config.upstream_ca_file,
            ca_file_only=config.upstream_ca_file_only,
            max_header_size=config.upstream_max_header_size,
            max_headers=config.upstream_max_headers,
            max_body_bytes=config.upstream_max_body_bytes,
        )
        self.metrics = SidecarMetrics(self.state)
        # The persisted last-known-good snapshot (restored on start, written as it changes).
        self.snapshots = (
            _snapshot_keeper(config, self.state) if watch else SnapshotKeeper(self.state, path=None, key=None)
        )
        self.snapshots.register_metrics(self.metrics.registry)
        reporting = (watch if report is None else report) and config.report_outcomes
        self.reporter = OutcomeReporter(config, metrics=self.metrics) if reporting else None
        self.node_affinity = NodeAffinity(
            self.state,
            enabled=config.node_affinity and watch,
            binding_timeout=config.binding_timeout,
            refresh_interval=config.report_interval,
            sidecar_id=config.sidecar_id,
            token=config.sidecar_token,
            metrics=self.metrics,
        )
        self.app = SidecarApp(
            self.state,
            self.upstream,
            metrics=self.metrics,
            balancer=Balancer(),
            max_body_bytes=config.max_body_bytes,
            max_attempts=config.max_attempts,
            max_snapshot_age=config.max_snapshot_age,
            snapshot_age=self.snapshots.age,
            restored_version=lambda: self.snapshots.restored_version,
            request_timeout=config.request_timeout,
            reporter=self.reporter,
            access_log=AccessLog.to(config.access_log) if config.access_log is not None else None,
            panic_policy=config.panic_policy,
            node_affinity=self.node_affinity,
            usage_accounting=config.usage_accounting,
        )
        self.watch = WatchClient(config, self.state, on_applied=self.snapshots.note) if watch else None
        # Limits: admitted from local leases the quota stream keeps current.
        self.quota: QuotaClient | None = None
        if watch and config.quota:
            limiter = Limiter(
                fail_open=config.quota_fail_open, stale_after=config.quota_stale_after, prices=self.app.prices
            )
            self.quota = QuotaClient(config, limiter)
            self.app.limiter = limiter
        self._quota_task: asyncio.Task[None] | None = None
        # The one channel to the control plane, opened by ``start`` (inside the loop).
        self._channel: ChannelSource | None = None
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._report_task: asyncio.Task[None] | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._affinity_task: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``); only after ``start``."""
        if self._port is None:
            raise RuntimeError("the sidecar is not listening")
        return self._port

    @property
    def channel(self) -> ChannelSource | None:
        """The control-plane channel source (after ``start``)."""
        return self._channel

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Start everything; returns once the HTTP socket listens."""
        if self._server is not None:
            raise RuntimeError("the sidecar is already started")
        await self.upstream.start()
        try:
            if self.snapshots.enabled:
                # Before the stream opens: serve the persisted snapshot until the control plane answers.
                await self.snapshots.restore()
                self._snapshot_task = asyncio.create_task(self.snapshots.run(), name="keyplane-sidecar-snapshot")
            if self.watch is not None or self.reporter is not None:
                self._channel = ChannelSource(self.config)
            if self.watch is not None:
                self._watch_task = asyncio.create_task(self.watch.run(self._channel), name="keyplane-sidecar-watch")
            if self.watch is not None and self._channel is not None:
                self.node_affinity.attach(self._channel)
                self._affinity_task = asyncio.create_task(self.node_affinity.run(), name="keyplane-sidecar-affinity")
            if self.quota is not None and self._channel is not None:
                self._quota_task = asyncio.create_task(self.quota.run(self._channel), name="keyplane-sidecar-quota")
            if self.reporter is not None:
                self._report_task = asyncio.create_task(
                    self.reporter.run(self._channel), name="keyplane-sidecar-reports"
                )
            sock = _bind(self.config.host, self.config.port)
            self._port = int(sock.getsockname()[1])
            uv_config = uvicorn.Config(
                self.app,
                # httptools with limits, timeouts and OpenAI-shaped refusals; no WebSockets.
                http=edge_protocol(
                    EdgeLimits(
                        max_head_bytes=self.config.max_request_head_bytes,
                        max_headers=self.config.max_request_headers,
                        max_body_bytes=self.config.max_body_bytes,
                        head_timeout=self.config.request_head_timeout,
                        body_timeout=self.config.request_body_timeout,
                    )
                ),
                ws="none",
                lifespan="off",
                log_level="warning",
                log_config=None,
                access_log=False,
                server_header=False,
                # Loopback listener: no X-Forwarded-* to honour (and no middleware per request).
                proxy_headers=False,
                # A backstop only: ``stop`` cuts what still runs at the end of the grace itself.
                timeout_graceful_shutdown=math.ceil(self.config.shutdown_grace) + _CUT_MARGIN,
            )
            self._server = _Server(uv_config)
            self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="keyplane-sidecar-http")
            while not self._server.started:
                if self._serve_task.done():
                    self._serve_task.result()
                    raise RuntimeError("the HTTP server stopped during startup")
                await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            raise
        _log.info("sidecar %s listening on %s", self.config.sidecar_id, self.url)

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for the first snapshot from the control plane."""
        if self.watch is None:
            return self.state.is_ready
        return await self.watch.wait_ready(timeout)

    async def wait_closed(self) -> None:
        """Return when the HTTP server has stopped (after ``stop`` or a failure)."""
        if self._serve_task is not None:
            await asyncio.shield(self._serve_task)

    async def shutdown(self, delay: float | None = None, *, hurry: asyncio.Event | None = None) -> None:
        """Graceful shutdown (``sidecar.shutdown``): answer /healthz 503 ``draining`` while still
        serving for ``delay`` seconds (default ``config.shutdown_delay``), then ``stop``.
        ``hurry`` (a second signal) ends the delay early."""
        delay = self.config.shutdown_delay if delay is None else delay
        self.app.draining = True
        if delay > 0 and self._serve_task is not None:
            _log.info("shutting down: still serving for %.1fs (/healthz answers 503 draining)", delay)
            await _wait_for(self._serve_task, hurry, delay)
        await self.stop(hurry=hurry)

    async def stop(self, *, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting connections, let in-flight requests finish for up to
        ``config.shutdown_grace``, cut the rest (``sidecar.shutdown``), close all."""
        server, serve_task = self._server, self._serve_task
        watch_task, report_task = self._watch_task, self._report_task
        snapshot_task = self._snapshot_task
        affinity_task, self._affinity_task = self._affinity_task, None
        channel = self._channel
        self._server = self._serve_task = self._watch_task = self._report_task = None
        self._snapshot_task = None
        self._channel = None
        try:
            if server is not None and serve_task is not None:
                self.app.draining = True
                server.should_exit = True
                await self._finish_requests(server, serve_task, hurry)
        finally:
            try:
                await self._stop_quota()
                if self.watch is not None:
                    self.watch.stop()
                if watch_task is not None:
                    try:
                        await watch_task
                    except Exception as exc:
                        _log.error("watch client failed: %s", type(exc).__name__)
                await self._stop_snapshots(snapshot_task)
            finally:
                try:
                    self.node_affinity.stop()
                    if affinity_task is not None:
                        with contextlib.suppress(Exception):
                            # The last refreshes, best effort.
                            await asyncio.wait_for(self.node_affinity.flush(), self.config.report_flush_timeout)
                        await affinity_task
                    await self._stop_reporter(report_task)
                finally:
                    if channel is not None:
                        # After both streams: the reports flushed over it.
                        await _close_channel(channel)
                    await self.upstream.close()
                    if self.app.access_log is not None:
                        self.app.access_log.close()
                    self._port = None

    async def _stop_quota(self) -> None:
        task, self._quota_task = self._quota_task, None
        if self.quota is None or task is None:
            return
        self.quota.stop()
        try:
            await task
        except Exception as exc:
            _log.error("quota stream failed: %s", type(exc).__name__)

    async def _stop_snapshots(self, task: asyncio.Task[None] | None) -> None:
        """Write what the stream applied last (after the watch stopped), then end the writer."""
        if task is None:
            return
        try:
            await self.snapshots.close()
        except Exception as exc:
            _log.error("persisting the snapshot on stop failed: %s", type(exc).__name__)
        try:
            await task
        except Exception as exc:
            _log.error("snapshot writer failed: %s", type(exc).__name__)

    async def _finish_requests(
        self, server: _Server, serve_task: asyncio.Task[None], hurry: asyncio.Event | None
    ) -> None:
        """Wait for the HTTP server to finish its requests within the grace (or until
        ``hurry``); then cut what still runs: streams end with an SSE error event,
        others get 503."""
        grace = self.config.shutdown_grace
        await _wait_for(serve_task, hurry, grace)
        if not serve_task.done():
            running = [task for task in server.server_state.tasks if not task.done()]
            if running:
                _log.warning("cutting %d request(s) still running after the %.1fs shutdown grace", len(running), grace)
            for task in running:
                task.cancel(msg=CUT)
        try:
            await serve_task
        except Exception as exc:
            _log.error("HTTP server failed: %s", type(exc).__name__)

    async def _stop_reporter(self, task: asyncio.Task[None] | None) -> None:
        """Flush queued outcomes over the live stream, best effort, within the flush timeout."""
        reporter = self.reporter
        if reporter is None or task is None:
            return
        reporter.stop()
        done, _ = await asyncio.wait((task,), timeout=self.config.report_flush_timeout)
        if not done:
            _log.warning(
                "outcome reports not flushed within %.1fs; dropping the rest", self.config.report_flush_timeout
            )
            reporter.abort()
            done, _ = await asyncio.wait((task,), timeout=1.0)
            if not done:
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception as exc:
                _log.error("outcome reporter failed: %s", type(exc).__name__)
        stats = reporter.stats
        _log.info("outcome reports: %d sent, %d dropped", stats.sent, stats.dropped_total)

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _snapshot_keeper(config: SidecarConfig, state: SidecarState) -> SnapshotKeeper:
    if config.snapshot_file is None:
        return SnapshotKeeper(state, path=None, key=None)
    key = (
        SnapshotKey.from_file(Path(config.snapshot_key_file))
        if config.snapshot_key_file is not None
        else SnapshotKey.from_token(config.sidecar_token)
    )
    return SnapshotKeeper(
        state,
        path=Path(config.snapshot_file),
        key=key,
        tenants=config.tenants,
        interval=config.snapshot_write_interval,
    )


async def _wait_for(task: asyncio.Task[None], hurry: asyncio.Event | None, timeout: float) -> None:  # noqa: ASYNC109
    """Wait until ``task`` ends, ``hurry`` is set or ``timeout`` passes (``task`` runs on)."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.shield(task))]
    if hurry is not None:
        waits.append(asyncio.ensure_future(hurry.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _close_channel(channel: ChannelSource) -> None:
    try:
        await channel.close()
    except Exception as exc:
        _log.error("closing the control-plane channel failed: %s", type(exc).__name__)


async def serve(config: SidecarConfig, *, handle_signals: bool = True) -> None:
    """Run a sidecar until SIGINT/SIGTERM (or cancellation), then stop it cleanly."""
    sidecar = Sidecar(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    await sidecar.start()
    try:
        closed = asyncio.ensure_future(sidecar.wait_closed())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((closed, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (closed, stopping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if stop.is_set():
            await sidecar.shutdown()
        else:
            await sidecar.stop()
