"""Store and base-URL-policy flags of ``keyplane control-plane`` and ``keyplane up``.

- ``--store-timeout SECONDS`` (or ``KEYPLANE_STORE_TIMEOUT``; default 5): how
  long a Postgres statement, or the wait for a pooled connection, may take
  before the call fails with UNAVAILABLE.
- ``--deny-private-base-urls`` (or ``KEYPLANE_DENY_PRIVATE_BASE_URLS=1``): also
  refuse private and loopback hosts in provider base URLs and vLLM node URLs.

A flag wins over its environment variable; a bad environment variable stops
the command with a message naming it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import TypedDict

from keyplane_cli.arg_types import positive_seconds

__all__ = [
    "DENY_PRIVATE_ENV",
    "STORE_TIMEOUT_ENV",
    "ControlPlaneOptions",
    "add_control_plane_flags",
    "control_plane_options_from_args",
]

STORE_TIMEOUT_ENV = "KEYPLANE_STORE_TIMEOUT"
DENY_PRIVATE_ENV = "KEYPLANE_DENY_PRIVATE_BASE_URLS"
_DEFAULT_STORE_TIMEOUT = 5.0
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ControlPlaneOptions(TypedDict):
    """``ControlPlaneConfig`` keyword arguments."""

    store_timeout: float
    deny_private_base_urls: bool


def add_control_plane_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store-timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="longest a Postgres statement (or the wait for a pooled connection) may take before the call "
        f"fails with UNAVAILABLE (else ${STORE_TIMEOUT_ENV}; default {_DEFAULT_STORE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--deny-private-base-urls",
        action="store_true",
        default=None,
        help="also refuse private and loopback hosts (10/8, 172.16/12, 192.168/16, 100.64/10, 127/8, ::1, "
        "fc00::/7, localhost) in provider base URLs and vLLM node URLs; link-local and cloud metadata "
        f"addresses are always refused (else ${DENY_PRIVATE_ENV}=1)",
    )


def control_plane_options_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ControlPlaneOptions:
    """What the flags (else the environment, else the defaults) ask for."""
    env = os.environ if environ is None else environ
    timeout: float | None = getattr(args, "store_timeout", None)
    if timeout is None:
        raw = env.get(STORE_TIMEOUT_ENV, "").strip()
        try:
            timeout = positive_seconds(raw) if raw else _DEFAULT_STORE_TIMEOUT
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"{STORE_TIMEOUT_ENV}: {exc}") from None
    deny: bool | None = getattr(args, "deny_private_base_urls", None)
    if deny is None:
        raw = env.get(DENY_PRIVATE_ENV, "").strip().lower()
        if raw not in _TRUE | _FALSE:
            raise SystemExit(f"{DENY_PRIVATE_ENV}: expected 1 or 0 (true/false), got {raw!r}")
        deny = raw in _TRUE
    return ControlPlaneOptions(store_timeout=timeout, deny_private_base_urls=deny)
