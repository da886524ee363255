"""``keyplane proxy-status``: every sidecar on every control-plane replica,
with the version it was sent, the one it applied (or rejected, and why) and
its sync state (``--wait`` of the write commands is in ``keyplane_cli.wait``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane_cli.admin_client import AdminClient, connection_flags, with_admin_client
from keyplane_cli.tables import table as _table
from keyplane_cli.wait import state_name as _state

__all__ = ["add_proxy_status_command", "proxy_status_table", "status_json"]


def _ago(status: admin_pb2.ProxyStatus, now: float) -> str:
    if not status.HasField("ack_time"):
        return "never"
    return f"{max(0.0, now - status.ack_time.ToNanoseconds() / 1e9):.0f}s ago"


def _tenants(status: admin_pb2.ProxyStatus) -> str:
    return "*" if status.all_tenants else ",".join(status.tenants)


def proxy_status_table(sidecars: Sequence[admin_pb2.ProxyStatus], *, now: float) -> str:
    """The human view: one row per sidecar, the rejection's error last."""
    if not sidecars:
        return "(no sidecars connected to any replica)"
    rows = [
        (
            s.sidecar_id,
            s.replica,
            _tenants(s),
            _state(s),
            str(s.sent_version),
            str(s.applied_version),
            str(s.latest_version),
            _ago(s, now),
            f"rejected {s.rejected_version}: {s.error_detail}" if s.rejected_version else "",
        )
        for s in sidecars
    ]
    header = ("SIDECAR", "REPLICA", "TENANTS", "STATE", "SENT", "APPLIED", "LATEST", "ACKED", "DETAIL")
    return "\n".join(_table(header, rows))


def status_json(status: admin_pb2.ProxyStatus) -> dict[str, Any]:
    return {
        "sidecar_id": status.sidecar_id,
        "replica": status.replica,
        "tenants": "*" if status.all_tenants else list(status.tenants),
        "peer": status.peer,
        "state": _state(status),
        "sent_version": status.sent_version,
        "applied_version": status.applied_version,
        "latest_version": status.latest_version,
        "rejected_version": status.rejected_version,
        "error_detail": status.error_detail,
        "connect_time": status.connect_time.ToJsonString() if status.HasField("connect_time") else None,
        "ack_time": status.ack_time.ToJsonString() if status.HasField("ack_time") else None,
    }


def _run_proxy_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(client: AdminClient) -> int:
        resp = client.call("GetProxyStatus", admin_pb2.GetProxyStatusRequest(tenant=args.tenant or ""))
        if args.output == "json":
            doc = {
                "replica": resp.replica,
                "version": resp.version,
                "sidecars": [status_json(s) for s in resp.sidecars],
            }
            out.write(json.dumps(doc, indent=2) + "\n")
        else:
            out.write(proxy_status_table(resp.sidecars, now=time.time()) + "\n")
        return 0

    return with_admin_client(args, body)


def add_proxy_status_command(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    parser = sub.add_parser(
        "proxy-status",
        help="every sidecar on every control-plane replica: SYNCED, STALE, NOT ACKED or REJECTED (with why)",
        description="Every sidecar connected to any control-plane replica (read from the store, so any replica "
        "answers the same): the version its replica sent, the version it applied, the newest change of its "
        "tenants, and its state. SYNCED: it applied the newest change; STALE: it applied all it was sent but "
        "its replica has not sent the newest change (lagging); NOT ACKED: sent, not acknowledged yet; "
        "REJECTED: it refused a version (DETAIL says why) and keeps serving the one it applied.",
    )
    connection_flags(parser)
    parser.add_argument("--tenant", "-t", help="only the sidecars watching this tenant")
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table", help="table (default) or json")
    handlers["proxy-status"] = _run_proxy_status
