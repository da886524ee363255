"""Graceful shutdown of the long-running commands: their flags and their signals.

- ``keyplane sidecar``: ``--shutdown-delay`` (keep accepting, /healthz 503
  ``draining``) then ``--shutdown-grace`` (in-flight requests and streams
  finish; what still runs is cut, a stream with an SSE error event).
- ``keyplane control-plane``: ``--drain-seconds`` (gRPC health NOT_SERVING,
  calls still served, then watch streams are told to reconnect elsewhere).

SIGTERM (what Kubernetes sends) runs the whole sequence; SIGINT (Ctrl-C at a
terminal) skips the delay / drain window; a second signal skips whatever
waiting is left.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from keyplane_cli.arg_types import non_negative_seconds

__all__ = ["Signals", "add_control_plane_drain_flags", "add_sidecar_shutdown_flags", "non_negative_seconds"]


def add_sidecar_shutdown_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("graceful shutdown (on SIGTERM)")
    group.add_argument(
        "--shutdown-delay",
        type=non_negative_seconds,
        default=5.0,
        metavar="SECONDS",
        help="keep accepting and serving this long after SIGTERM while /healthz answers 503 draining, so "
        "endpoints and the app stop sending here first (default 5; SIGINT skips it)",
    )
    group.add_argument(
        "--shutdown-grace",
        type=non_negative_seconds,
        default=10.0,
        metavar="SECONDS",
        help="then, with new connections refused, let in-flight requests and streams finish this long; a "
        "stream still running is ended with an SSE error event, a request with 503 (default 10)",
    )


def add_control_plane_drain_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("graceful shutdown (on SIGTERM)")
    group.add_argument(
        "--drain-seconds",
        type=non_negative_seconds,
        default=5.0,
        metavar="SECONDS",
        help="after SIGTERM, report gRPC health NOT_SERVING but keep serving calls this long, then tell "
        "watching sidecars to reconnect to another replica and stop (default 5; SIGINT skips it)",
    )


class Signals:
    """SIGINT and SIGTERM as events, installed before anything starts (so a
    signal sent as soon as the ready line is printed stops the process
    cleanly instead of killing it).

    ``stop`` is set by the first signal, ``hurry`` by the second (or by a
    first SIGINT); ``terminated`` says whether the first was SIGTERM."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.terminated = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set() or sig is signal.SIGINT:
            self.hurry.set()
        else:
            self.terminated = True
        self.stop.set()
