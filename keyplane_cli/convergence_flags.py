"""Convergence flags of ``keyplane control-plane`` and ``keyplane up``.

- ``--replica-id NAME``: this replica's name in ``keyplane proxy-status``
  (default ``<hostname>-<pid>-<random>``).
- ``--lag-wait SECONDS`` (default 5): how long a sidecar that holds a version
  this replica has not reached waits while the replica catches up with the
  store, before it is refused with UNAVAILABLE (and retries, possibly on
  another replica).
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from keyplane_cli.arg_types import positive_seconds

__all__ = ["ConvergenceOptions", "add_convergence_flags", "convergence_options_from_args"]

_DEFAULT_LAG_WAIT = 5.0


class ConvergenceOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    replica_id: str
    lag_wait: float


def add_convergence_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replica-id",
        default="",
        metavar="NAME",
        help="this replica's name in 'keyplane proxy-status' (default <hostname>-<pid>-<random>)",
    )
    parser.add_argument(
        "--lag-wait",
        type=positive_seconds,
        default=_DEFAULT_LAG_WAIT,
        metavar="SECONDS",
        help="how long a sidecar holding a version this replica has not reached waits while the replica "
        "catches up with the store, before it is refused with UNAVAILABLE and retries, possibly on another "
        f"replica (default {_DEFAULT_LAG_WAIT:g})",
    )


def convergence_options_from_args(args: argparse.Namespace) -> ConvergenceOptions:
    return ConvergenceOptions(replica_id=args.replica_id, lag_wait=args.lag_wait)
