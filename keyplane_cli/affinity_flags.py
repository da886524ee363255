"""Affinity flags of ``keyplane control-plane`` and ``keyplane up`` (issue 14).

- ``--binding-ttl SECONDS`` (default 600): how long a (client key, model) ->
  node binding lives without a successful request refreshing it.
- ``--binding-sweep-interval SECONDS`` (default 30) and ``--binding-sweep-batch
  N`` (default 1000): how often one replica deletes expired bindings, and how
  many per statement.
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from keyplane_cli.health_flags import positive_seconds

__all__ = ["AffinityOptions", "add_affinity_flags", "affinity_options_from_args"]


class AffinityOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    binding_ttl: float
    binding_sweep_interval: float
    binding_sweep_batch: int


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_affinity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--binding-ttl",
        type=positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long an affinity binding (client key, model) -> node lives unless a successful request "
        "refreshes it (default 600)",
    )
    parser.add_argument(
        "--binding-sweep-interval",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how often one control-plane replica deletes expired affinity bindings (default 30)",
    )
    parser.add_argument(
        "--binding-sweep-batch",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="expired bindings deleted per statement by the sweep (default 1000)",
    )


def affinity_options_from_args(args: argparse.Namespace) -> AffinityOptions:
    return AffinityOptions(
        binding_ttl=args.binding_ttl,
        binding_sweep_interval=args.binding_sweep_interval,
        binding_sweep_batch=args.binding_sweep_batch,
    )
