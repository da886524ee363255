"""The limits flags (docs/usage-and-limits.md).

Of ``keyplane sidecar``:
- ``--limits-fail-open``: once no lease arrived for ``--limits-stale-after``
  seconds (the control plane is away), admit everything instead of enforcing
  the last leases (the default, fail-static).
- ``--limits-stale-after SECONDS`` (default 5).
- ``--no-limits``: do not lease quota at all (no limits enforced here).

Of ``keyplane control-plane`` / ``keyplane up``:
- ``--limits-window SECONDS`` (default 60): per-minute limits count in windows
  of this length, the limit scaled to it (a shorter window smooths bursts and
  lets tests run in seconds).
- ``--limits-rebalance-interval SECONDS`` (default 1): how often leases are
  rebalanced and sent.
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from keyplane_cli.health_flags import positive_seconds

__all__ = [
    "LeaseOptions",
    "SidecarLimitOptions",
    "add_control_plane_limit_flags",
    "add_sidecar_limit_flags",
    "control_plane_limit_options_from_args",
    "sidecar_limit_options_from_args",
]


class SidecarLimitOptions(TypedDict):
    """``SidecarConfig`` keyword arguments."""

    quota: bool
    quota_fail_open: bool
    quota_stale_after: float


class LeaseOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    quota_window: float
    quota_rebalance_interval: float


def add_sidecar_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (rate limits leased from the control plane)")
    group.add_argument(
        "--limits-fail-open",
        action="store_true",
        help="when no lease arrived for --limits-stale-after seconds, admit every request instead of enforcing "
        "the last leases (default: fail-static, keep enforcing them)",
    )
    group.add_argument(
        "--limits-stale-after",
        type=positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="leases this old count as stale, for --limits-fail-open (default: 5)",
    )
    group.add_argument(
        "--no-limits",
        action="store_true",
        help="do not lease quota from the control plane: enforce no limits here (and get no prices: no cost metric)",
    )


def sidecar_limit_options_from_args(args: argparse.Namespace) -> SidecarLimitOptions:
    return SidecarLimitOptions(
        quota=not args.no_limits, quota_fail_open=args.limits_fail_open, quota_stale_after=args.limits_stale_after
    )


def add_control_plane_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits (leases to the sidecars)")
    group.add_argument(
        "--limits-window",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="per-minute limits count in windows of this many seconds, the limit scaled to the window (default: 60)",
    )
    group.add_argument(
        "--limits-rebalance-interval",
        type=positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how often the sidecars' leases are rebalanced by demand and sent (default: 1)",
    )


def control_plane_limit_options_from_args(args: argparse.Namespace) -> LeaseOptions:
    return LeaseOptions(quota_window=args.limits_window, quota_rebalance_interval=args.limits_rebalance_interval)
