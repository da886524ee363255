"""``keyplane limits set|show|clear``: rate limits and spend budgets of a
client key (``--client-key ID``) or of a whole tenant, through the admin API.

``show`` prints each limit with what the fleet used of it in the current
window and what is left (as the control plane learnt it from the sidecars'
reports, about a second old). ``set`` changes only the limits it is given
(the others stay); ``0`` removes one; ``clear`` removes them all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from keyplane.v1 import limits_pb2 as lpb
from keyplane_cli.admin_client import AdminClient, connection_flags, with_admin_client
from keyplane_cli.output import add_output_flags, emit
from keyplane_cli.tables import local_time, table

__all__ = ["add_limits_commands", "limits_of", "limits_table", "run_limits", "usd_to_micros"]

_KIND_NAMES = {
    lpb.QUOTA_KIND_REQUESTS: "requests/min",
    lpb.QUOTA_KIND_TOKENS: "tokens/min",
    lpb.QUOTA_KIND_SPEND_DAY: "spend/day",
    lpb.QUOTA_KIND_SPEND_MONTH: "spend/month",
}
_FLAG_FIELDS = (
    ("rpm", "requests_per_minute", lpb.QUOTA_KIND_REQUESTS),
    ("tpm", "tokens_per_minute", lpb.QUOTA_KIND_TOKENS),
    ("daily_budget", "daily_budget_micros", lpb.QUOTA_KIND_SPEND_DAY),
    ("monthly_budget", "monthly_budget_micros", lpb.QUOTA_KIND_SPEND_MONTH),
)


def usd_to_micros(text: str) -> int:
    """``"12.5"`` (US dollars) -> 12_500_000 micro-dollars."""
    try:
        value = Decimal(text.removeprefix("$"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected an amount in US dollars, e.g. 25 or 12.50, got {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative amount in US dollars, got {text!r}")
    micros = value * 1_000_000
    if micros != micros.to_integral_value():
        raise argparse.ArgumentTypeError(f"at most 6 decimals (micro-dollars), got {text!r}")
    return int(micros)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {text!r}")
    return value


def _amount(kind: int, value: int) -> str:
    if kind in (lpb.QUOTA_KIND_SPEND_DAY, lpb.QUOTA_KIND_SPEND_MONTH):
        return f"${Decimal(value) / 1_000_000:f}"
    return str(value)


def limits_table(statuses: Sequence[lpb.LimitsStatus]) -> str:
    rows = []
    for status in statuses:
        limits = status.limits
        who = limits.client_key_id or "(tenant)"
        usage = {u.kind: u for u in status.usage}
        for _, field, kind in _FLAG_FIELDS:
            value = getattr(limits, field)
            if not value:
                continue
            u = usage.get(kind)
            if u is None:
                rows.append((who, _KIND_NAMES[kind], _amount(kind, value), "-", "-", "-"))
            else:
                window = f"{u.window_seconds}s from {local_time(u.window_start)}"
                rows.append((who, _KIND_NAMES[kind], _amount(kind, u.limit), str(u.used), str(u.remaining), window))
    if not rows:
        return "(no limits)"
    return "\n".join(table(("CLIENT KEY", "LIMIT", "PER WINDOW", "USED", "LEFT", "WINDOW"), rows))


def limits_of(client: AdminClient, tenant: str, client_key_id: str = "") -> list[lpb.LimitsStatus]:
    """The tenant's limits and (with ``client_key_id``) that key's only, else every key's."""
    statuses = client.call("ListLimits", lpb.ListLimitsRequest(tenant=tenant)).statuses
    return [s for s in statuses if not client_key_id or s.limits.client_key_id in ("", client_key_id)]


def run_limits(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return with_admin_client(args, lambda client: _dispatch(args, client, out))


def _dispatch(args: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    tenant, client_key_id = args.tenant, getattr(args, "client_key", None) or ""
    if args.action == "show":
        if client_key_id or not args.all:
            resp = client.call("GetLimits", lpb.GetLimitsRequest(tenant=tenant, client_key_id=client_key_id))
            emit(args, resp, lambda: limits_table([resp.status]), out)
        else:
            listed = client.call("ListLimits", lpb.ListLimitsRequest(tenant=tenant))
            emit(args, listed, lambda: limits_table(listed.statuses), out)
    elif args.action == "set":
        given = {field: getattr(args, flag) for flag, field, _ in _FLAG_FIELDS if getattr(args, flag) is not None}
        if not given:
            raise SystemExit("limits set: give at least one of --rpm, --tpm, --daily-budget, --monthly-budget")
        current = client.call("GetLimits", lpb.GetLimitsRequest(tenant=tenant, client_key_id=client_key_id))
        limits = lpb.Limits()
        limits.CopyFrom(current.status.limits)
        limits.tenant, limits.client_key_id = tenant, client_key_id
        limits.ClearField("update_time")
        for field, value in given.items():
            setattr(limits, field, value)
        resp = client.call("SetLimits", lpb.SetLimitsRequest(limits=limits))
        emit(args, resp, lambda: limits_table([lpb.LimitsStatus(limits=resp.limits)]), out)
    elif args.action == "clear":
        resp = client.call("ClearLimits", lpb.ClearLimitsRequest(tenant=tenant, client_key_id=client_key_id))
        emit(args, resp, f"cleared the limits of {client_key_id or 'tenant ' + tenant}", out)
    return 0


def add_limits_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    parser = sub.add_parser("limits", help="rate limits and spend budgets per client key or tenant")
    handlers["limits"] = run_limits
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        connection_flags(p)
        add_output_flags(p)
        p.add_argument("--tenant", "-t", required=True, help="the tenant (isolation boundary) to work in")
        p.add_argument(
            "--client-key", "-k", metavar="ID", help="the client key's id (from client-keys list); else the tenant's"
        )
        return p

    show = action("show", "limits with what the fleet used and has left in the current window")
    show.add_argument("--all", action="store_true", help="every client key's limits and the tenant's")
    setter = action("set", "set limits (only those given change; 0 removes one)")
    setter.add_argument("--rpm", type=_count, help="requests per minute (enforced)")
    setter.add_argument(
        "--tpm", type=_count, help="tokens per minute (input + output, charged once each answer's usage is read)"
    )
    setter.add_argument(
        "--daily-budget",
        type=usd_to_micros,
        metavar="USD",
        help="spend per UTC day, charged at the tenant's prices (keyplane prices)",
    )
    setter.add_argument(
        "--monthly-budget",
        type=usd_to_micros,
        metavar="USD",
        help="spend per UTC month, charged at the tenant's prices (keyplane prices)",
    )
    action("clear", "remove every limit of the client key (or the tenant)")
