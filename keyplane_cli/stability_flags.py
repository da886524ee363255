"""The static-stability and resync flags of ``keyplane sidecar``.

- ``--snapshot-file PATH`` (default ``$KEYPLANE_HOME/sidecar-<port>.snapshot``):
  where the sidecar persists its last-known-good snapshot, encrypted; on
  start without a reachable control plane it serves from it.
  ``--no-snapshot-file`` turns persistence off.
- ``--snapshot-key-file PATH``: derive the file's key from this file instead
  of the sidecar token (so a token rotation does not orphan the file).
- ``--max-snapshot-age SECONDS``: ``/readyz`` fails once the snapshot served
  was last in sync longer ago than this (default: never).
- ``--watch-backoff-cap SECONDS`` (default 1): the longest wait between two
  reconnects of the watch stream (the first one after a stream broke is
  immediate; a control plane shedding load may ask for longer).

And of ``keyplane control-plane`` / ``keyplane up``: ``--watch-admit-rate``
and ``--watch-admit-burst``, how many new watch streams it serves a second
and at once before it tells the next ones when to come back.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypedDict

from keyplane.home import Home
from keyplane_cli.arg_types import positive_count, positive_number, positive_seconds

__all__ = [
    "StabilityOptions",
    "WatchAdmissionOptions",
    "add_stability_flags",
    "add_watch_admission_flags",
    "stability_options_from_args",
    "watch_admission_options_from_args",
]

_DEFAULT_BACKOFF_CAP = 1.0
_DEFAULT_ADMIT_RATE = 1000.0
_DEFAULT_ADMIT_BURST = 1000


class StabilityOptions(TypedDict):
    """``SidecarConfig`` keyword arguments."""

    snapshot_file: str | None
    snapshot_key_file: str | None
    max_snapshot_age: float | None
    watch_backoff_cap: float


def add_stability_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("static stability (serving while the control plane is away)")
    group.add_argument(
        "--snapshot-file",
        type=Path,
        metavar="PATH",
        help="persist the last-known-good snapshot here (encrypted, mode 0600) and serve from it when started "
        "without a reachable control plane (default: $KEYPLANE_HOME/sidecar-<port>.snapshot)",
    )
    group.add_argument(
        "--no-snapshot-file",
        action="store_true",
        help="do not persist the snapshot: a sidecar restarted during a control-plane outage cannot serve",
    )
    group.add_argument(
        "--snapshot-key-file",
        type=Path,
        metavar="PATH",
        help="derive the snapshot file's encryption key from this file (at least 16 bytes) instead of the "
        "sidecar token",
    )
    group.add_argument(
        "--max-snapshot-age",
        type=positive_seconds,
        metavar="SECONDS",
        help="/readyz fails once the snapshot served was last in sync with the control plane longer ago than "
        "this (default: never; /livez never fails for that)",
    )
    group.add_argument(
        "--watch-backoff-cap",
        type=positive_seconds,
        default=_DEFAULT_BACKOFF_CAP,
        metavar="SECONDS",
        help="longest wait between two reconnects of the watch stream; the first one is immediate "
        f"(default {_DEFAULT_BACKOFF_CAP:g})",
    )


def stability_options_from_args(args: argparse.Namespace, home: Home | None = None) -> StabilityOptions:
    snapshot_file: Path | None = None
    if not args.no_snapshot_file:
        if args.snapshot_file is not None:
            snapshot_file = args.snapshot_file
        else:
            root = (home if home is not None else Home.default()).root
            snapshot_file = root / f"sidecar-{args.port}.snapshot"
    elif args.snapshot_file is not None:
        raise ValueError("--snapshot-file and --no-snapshot-file contradict each other")
    return StabilityOptions(
        snapshot_file=str(snapshot_file) if snapshot_file is not None else None,
        snapshot_key_file=str(args.snapshot_key_file) if args.snapshot_key_file is not None else None,
        max_snapshot_age=args.max_snapshot_age,
        watch_backoff_cap=args.watch_backoff_cap,
    )


class WatchAdmissionOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    watch_admit_rate: float
    watch_admit_burst: int


def add_watch_admission_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch-admit-rate",
        type=positive_number,
        default=_DEFAULT_ADMIT_RATE,
        metavar="PER_SECOND",
        help="new watch streams served per second on average; more are told (UNAVAILABLE with a retry delay) "
        f"when to come back, spread at this rate (default {_DEFAULT_ADMIT_RATE:g})",
    )
    parser.add_argument(
        "--watch-admit-burst",
        type=positive_count,
        default=_DEFAULT_ADMIT_BURST,
        metavar="N",
        help=f"new watch streams served at once before the rate applies (default {_DEFAULT_ADMIT_BURST})",
    )


def watch_admission_options_from_args(args: argparse.Namespace) -> WatchAdmissionOptions:
    return WatchAdmissionOptions(watch_admit_rate=args.watch_admit_rate, watch_admit_burst=args.watch_admit_burst)
