"""Flags of the sidecar's app-facing HTTP edge (``keyplane sidecar`` and ``keyplane up``)."""

from __future__ import annotations

import argparse
from typing import Any

# sidecar.config.DEFAULT_MAX_BODY_BYTES (not imported: the CLI loads sidecar modules lazily).
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024

__all__ = ["add_edge_flags", "edge_options_from_args"]


def add_edge_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("app-facing HTTP edge")
    group.add_argument(
        "--max-request-head-bytes",
        type=int,
        default=64 * 1024,
        help="largest request head (request line and headers); larger ones get 431 (default 65536)",
    )
    group.add_argument(
        "--max-request-headers", type=int, default=100, help="most header fields in a request; more get 431"
    )
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    group.add_argument(
        "--request-head-timeout",
        type=float,
        default=10.0,
        help="seconds for a request head to arrive; then 408 and the connection is closed",
    )
    group.add_argument(
        "--request-body-timeout",
        type=float,
        default=30.0,
        help="seconds for a request body to arrive after its head; then 408 and the connection is closed",
    )


def edge_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``SidecarConfig`` keyword arguments from the edge flags."""
    return {
        "max_request_head_bytes": args.max_request_head_bytes,
        "max_request_headers": args.max_request_headers,
        "max_body_bytes": args.max_request_body_bytes,
        "request_head_timeout": args.request_head_timeout,
        "request_body_timeout": args.request_body_timeout,
    }
