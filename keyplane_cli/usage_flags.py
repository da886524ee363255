"""Usage-rollup flags of ``keyplane control-plane`` and ``keyplane up``.

- ``--usage-flush-interval SECONDS`` (default 1): how often the usage folded
  from outcome reports is written (one upsert per rollup row per flush).
- ``--usage-retention-days DAYS`` (default 90; 0 keeps rollups forever): how
  long per-minute usage rollups are kept.
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from keyplane_cli.arg_types import positive_seconds

__all__ = ["UsageOptions", "add_usage_flags", "usage_options_from_args"]


class UsageOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    usage_flush_interval: float
    usage_retention_days: float


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 0 <= value <= 36500:
        raise argparse.ArgumentTypeError("must be between 0 (forever) and 36500 days")
    return value


def add_usage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--usage-flush-interval",
        type=positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="write the usage folded from sidecar reports this often: one upsert per per-minute rollup row "
        "per flush, never one per request (default 1)",
    )
    parser.add_argument(
        "--usage-retention-days",
        type=_days,
        default=90.0,
        metavar="DAYS",
        help="delete per-minute usage rollups older than this (default 90; 0 keeps them forever)",
    )


def usage_options_from_args(args: argparse.Namespace) -> UsageOptions:
    return UsageOptions(
        usage_flush_interval=getattr(args, "usage_flush_interval", 1.0),
        usage_retention_days=getattr(args, "usage_retention_days", 90.0),
    )
