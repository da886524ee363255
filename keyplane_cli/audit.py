"""``keyplane audit list``: the audit log of admin writes, through the
AdminService's ``ListAuditEvents`` (newest first, paged)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from keyplane import convert
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2
from keyplane_cli.admin_client import AdminClient, CliError, admin_flags, with_admin_client
from keyplane_cli.output import emit
from keyplane_cli.tables import table as _table

__all__ = ["add_audit_commands", "audit_table", "parse_time"]

DEFAULT_LIMIT = 50
MAX_PAGE_SIZE = 1000
_AGO = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """``1h`` / ``30m`` / ``2d`` / ``45s`` / ``1w`` ago, or an ISO 8601 time
    (local time when it names no zone)."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago is not None:
        seconds = int(ago.group(1)) * _UNITS[ago.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time ago (30s, 15m, 1h, 2d, 1w) nor an ISO 8601 time (2025-01-31T12:00)"
        ) from None
    return value if value.tzinfo is not None else value.astimezone()


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--limit must be at least 1")
    return value


def audit_table(events: list[resources_pb2.AuditEvent]) -> str:
    if not events:
        return "(no audit events)"
    rows = [
        (
            convert.datetime_from_timestamp(e.time).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            e.caller,
            e.method,
            e.tenant or "-",
            f"{e.resource_kind}/{e.resource_id}" if e.resource_id else e.resource_kind or "-",
            ",".join(e.fields) or "-",
            e.fingerprint or "-",
            e.result,
        )
        for e in events
    ]
    return "\n".join(_table(("TIME", "CALLER", "METHOD", "TENANT", "RESOURCE", "FIELDS", "FP", "RESULT"), rows))


def _list(args: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    if args.since is not None and args.until is not None and args.until <= args.since:
        raise CliError("--until must be after --since")
    request = admin_pb2.ListAuditEventsRequest(
        tenant=args.tenant or "", resource_kind=args.kind or "", resource_id=args.resource or ""
    )
    if args.since is not None:
        request.start_time.CopyFrom(convert.timestamp_from_datetime(args.since))
    if args.until is not None:
        request.end_time.CopyFrom(convert.timestamp_from_datetime(args.until))
    collected = admin_pb2.ListAuditEventsResponse()
    while True:
        request.page_size = min(args.limit - len(collected.events), MAX_PAGE_SIZE)
        page: admin_pb2.ListAuditEventsResponse = client.call("ListAuditEvents", request)
        collected.events.extend(page.events)
        collected.next_page_token = page.next_page_token
        if not page.next_page_token or len(collected.events) >= args.limit:
            break
        request.page_token = page.next_page_token

    def text() -> str:
        shown = audit_table(list(collected.events))
        if collected.next_page_token:
            shown += f"\n(more events: raise --limit above {args.limit}, or narrow with --since/--until)"
        return shown

    emit(args, collected, text, out)
    return 0


def run_audit(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return with_admin_client(args, lambda client: _list(args, client, out))


def add_audit_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register ``keyplane audit list``."""
    parser = sub.add_parser("audit", help="the audit log of admin writes (who changed what, when, with what result)")
    handlers["audit"] = run_audit
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="audit events, newest first")
    admin_flags(listing)
    listing.add_argument("--tenant", "-t", help="only this tenant's events")
    listing.add_argument("--resource", metavar="ID", help="only events about this resource (key, route, ... id)")
    listing.add_argument("--kind", help="only events about this kind: tenant, provider_key, route, client_key, ...")
    listing.add_argument(
        "--since", type=parse_time, metavar="TIME", help="from this time on: ISO 8601, or ago: 30s, 15m, 1h, 2d, 1w"
    )
    listing.add_argument("--until", type=parse_time, metavar="TIME", help="before this time (same forms)")
    listing.add_argument(
        "--limit", type=_limit, default=DEFAULT_LIMIT, help=f"at most this many events (default {DEFAULT_LIMIT})"
    )
