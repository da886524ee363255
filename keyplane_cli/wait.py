"""``--wait [TIMEOUT]`` of the admin write commands: after the write, block
until every sidecar of the tenant (on every control-plane replica) applied
the version the write returned (AdminService.WaitForVersion), and say which
have not.

Exit codes of a write with ``--wait``: 0 applied everywhere; 3 written, but
not applied by every sidecar within the timeout, or rejected by one; 1 on an
RPC error.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from google.protobuf.duration_pb2 import Duration

from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane_cli.arg_types import positive_seconds

if TYPE_CHECKING:
    from keyplane_cli.admin_client import AdminClient

__all__ = ["DEFAULT_WAIT", "NOT_CONVERGED", "add_wait_flag", "state_name", "wait_after_write"]

DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
NOT_CONVERGED = 3

_STATE_NAMES = {
    admin_pb2.SYNC_STATE_SYNCED: "SYNCED",
    admin_pb2.SYNC_STATE_STALE: "STALE",
    admin_pb2.SYNC_STATE_NOT_ACKED: "NOT ACKED",
    admin_pb2.SYNC_STATE_REJECTED: "REJECTED",
}


def state_name(status: admin_pb2.ProxyStatus) -> str:
    return _STATE_NAMES.get(status.state, "?")


def _wait_timeout(text: str) -> float:
    value = positive_seconds(text)
    if value > MAX_WAIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_WAIT:g} seconds")
    return value


def add_wait_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        nargs="?",
        const=DEFAULT_WAIT,
        default=None,
        type=_wait_timeout,
        metavar="TIMEOUT",
        help="after the write, wait until every sidecar of the tenant (on every replica) applied it, at most "
        f"TIMEOUT seconds (default {DEFAULT_WAIT:g}); exit code {NOT_CONVERGED} and the sidecars that have not "
        "applied it when the time is up or one rejected it",
    )


def _pending_line(status: admin_pb2.ProxyStatus) -> str:
    line = f"  {status.sidecar_id} (replica {status.replica}): {state_name(status)}, applied {status.applied_version}"
    if status.rejected_version:
        line += f", rejected {status.rejected_version}: {status.error_detail}"
    return line


def wait_after_write(args: argparse.Namespace, client: AdminClient, tenant: str, version: int, out: TextIO) -> int:
    """Wait for ``version`` of ``tenant`` and report; the exit code."""
    if getattr(args, "json", False):
        out = sys.stderr  # stdout carries the write's JSON alone
    if version == 0:
        out.write("the write is committed but its version could not be read; not waiting\n")
        return NOT_CONVERGED
    started = time.monotonic()
    request = admin_pb2.WaitForVersionRequest(tenant=tenant, version=version)
    request.timeout.CopyFrom(Duration(seconds=int(args.wait), nanos=int((args.wait % 1) * 1e9)))
    resp = client.call("WaitForVersion", request, timeout=args.wait + 10.0)
    took = time.monotonic() - started
    summary = f"{resp.applied} of {resp.sidecars} sidecars of tenant {tenant} applied version {version}"
    if resp.converged:
        out.write(f"{summary} ({took:.2f}s)\n")
        return 0
    rejected = any(s.rejected_version >= version for s in resp.pending)
    why = "one rejected it" if rejected else f"not within {args.wait:g}s"
    out.write(f"{summary}; {why}; not applied by:\n" + "\n".join(_pending_line(s) for s in resp.pending) + "\n")
    return NOT_CONVERGED
