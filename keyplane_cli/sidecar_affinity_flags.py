"""Node affinity flags of ``keyplane sidecar`` and ``keyplane up`` (``sidecar.node_affinity``).

- ``--no-node-affinity``: routes with self-hosted nodes use the normal
  strategy (round robin over healthy active nodes) for every request.
- ``--binding-timeout SECONDS`` (default 0.1): how long a request whose
  binding is not cached waits for the control plane before the normal
  strategy picks (the lookup runs on and lands in the cache for the next one).
"""

from __future__ import annotations

import argparse
from typing import TypedDict

from keyplane_cli.health_flags import positive_seconds

__all__ = ["SidecarAffinityOptions", "add_sidecar_affinity_flags", "sidecar_affinity_options_from_args"]

DEFAULT_BINDING_TIMEOUT = 0.1


class SidecarAffinityOptions(TypedDict):
    node_affinity: bool
    binding_timeout: float


def add_sidecar_affinity_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "node affinity", "(client key, model) -> node bindings for routes with self-hosted nodes (docs/affinity.md)"
    )
    group.add_argument(
        "--no-node-affinity",
        action="store_true",
        help="send requests to self-hosted nodes round robin instead of following each client's binding",
    )
    group.add_argument(
        "--binding-timeout",
        type=positive_seconds,
        default=DEFAULT_BINDING_TIMEOUT,
        metavar="SECONDS",
        help="how long a request whose binding is not cached here waits for the control plane before the "
        f"normal strategy picks a node (default {DEFAULT_BINDING_TIMEOUT:g})",
    )


def sidecar_affinity_options_from_args(args: argparse.Namespace) -> SidecarAffinityOptions:
    return SidecarAffinityOptions(
        node_affinity=not getattr(args, "no_node_affinity", False),
        binding_timeout=getattr(args, "binding_timeout", DEFAULT_BINDING_TIMEOUT),
    )
