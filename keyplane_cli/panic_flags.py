"""Flags of what a sidecar does when no key can serve a request (``keyplane.health.panic``).

``keyplane sidecar`` and ``keyplane up`` take them; the policy is the
sidecar's own (docs/operations.md, "Provider down / key cooling").
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keyplane.health.panic import PanicPolicy
from keyplane_cli.arg_types import non_negative_seconds

__all__ = ["add_panic_flags", "panic_policy_from_args"]

# keyplane.health.panic.PanicPolicy's defaults (not imported: the CLI loads lazily).
DEFAULT_PROBE_WAIT = 2.0
DEFAULT_MAX_RATE_LIMIT_WAIT = 10.0


def add_panic_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "when no key can serve", "panic probes of cooling keys, waits for rate limits, honest 429/503 answers"
    )
    group.add_argument(
        "--no-panic-routing",
        action="store_true",
        help="answer 503 at once when every key is cooling down after errors, instead of sending the request "
        "as a probe to the key most likely to have recovered (one probe per key and model at a time)",
    )
    group.add_argument(
        "--panic-probe-wait",
        type=non_negative_seconds,
        default=DEFAULT_PROBE_WAIT,
        metavar="SECONDS",
        help="how long a request waits for another request's probe of the same key and model before it is "
        f"answered 503 (within its deadline; default {DEFAULT_PROBE_WAIT:g})",
    )
    group.add_argument(
        "--max-rate-limit-wait",
        type=non_negative_seconds,
        default=DEFAULT_MAX_RATE_LIMIT_WAIT,
        metavar="SECONDS",
        help="when every key is rate limited, wait up to this long for the first to recover (within the "
        "request's deadline and the app's own timeout) instead of answering 429 with Retry-After; "
        f"0: never wait (default {DEFAULT_MAX_RATE_LIMIT_WAIT:g})",
    )


def panic_policy_from_args(args: argparse.Namespace) -> PanicPolicy:
    from keyplane.health.panic import PanicPolicy

    return PanicPolicy(
        enabled=not args.no_panic_routing,
        probe_wait=args.panic_probe_wait,
        max_rate_limit_wait=args.max_rate_limit_wait,
    )
