"""``keyplane usage show`` and ``keyplane prices set|list|delete``: tokens and cost
from the control plane's per-minute rollups (AdminService ``GetUsage``), and the
price table they are costed with (``SetPrice``, ``ListPrices``, ``DeletePrice``).

Prices are typed in US dollars per million tokens (``--input-usd 0.15``) and kept as
integer micro-dollars per million tokens; costs are printed in dollars.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from keyplane import convert
from keyplane.domain import Provider
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import usage_pb2
from keyplane_cli.admin_client import AdminClient, CliError, admin_flags, with_admin_client
from keyplane_cli.audit import parse_time
from keyplane_cli.limits_cmd import limits_of, limits_table
from keyplane_cli.output import emit, to_data
from keyplane_cli.tables import provider_name, table

__all__ = ["add_usage_commands", "dollars", "micros_per_million", "usage_table"]

# --by names -> the dimension and the row field it fills.
BY: dict[str, tuple[int, str]] = {
    "tenant": (usage_pb2.USAGE_DIMENSION_TENANT, "tenant"),
    "client-key": (usage_pb2.USAGE_DIMENSION_CLIENT_KEY, "client_key_id"),
    "model": (usage_pb2.USAGE_DIMENSION_PUBLIC_MODEL, "public_model"),
    "provider-key": (usage_pb2.USAGE_DIMENSION_PROVIDER_KEY, "provider_key_id"),
    "provider": (usage_pb2.USAGE_DIMENSION_PROVIDER, "provider"),
    "upstream-model": (usage_pb2.USAGE_DIMENSION_UPSTREAM_MODEL, "upstream_model"),
}
BUCKETS = {
    "none": usage_pb2.USAGE_BUCKET_UNSPECIFIED,
    "minute": usage_pb2.USAGE_BUCKET_MINUTE,
    "hour": usage_pb2.USAGE_BUCKET_HOUR,
    "day": usage_pb2.USAGE_BUCKET_DAY,
}
_PAGE = 1000
_MILLION = Decimal(1_000_000)


def micros_per_million(text: str) -> int:
    """``0.15`` (dollars per million tokens) -> 150000 (micro-dollars per million tokens)."""
    try:
        value = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a price in dollars per million tokens: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"a price must be a non-negative number of dollars, got {text!r}")
    micros = value * _MILLION
    if micros != micros.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r}: at most 6 decimals (micro-dollars)")
    return int(micros)


def dollars(micros: int) -> str:
    """Micro-dollars as dollars, every digit kept: 9900000 -> "$9.900000"."""
    return f"${Decimal(micros) / _MILLION:.6f}"


def _by(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown --by {', '.join(unknown)}; any of: {', '.join(BY)}")
    return names


def usage_table(rows: list[usage_pb2.UsageRow], by: list[str], bucketed: bool) -> str:
    if not rows:
        return "(no usage in this time range)"
    header = (
        *(("BUCKET",) if bucketed else ()),
        *(name.upper() for name in by),
        "REQUESTS",
        "FAILED",
        "ATTEMPTS",
        "INPUT",
        "CACHED",
        "OUTPUT",
        "REASONING",
        "COST",
    )
    out = []
    for row in rows:
        groups = [
            provider_name(row.provider) if BY[name][1] == "provider" else getattr(row, BY[name][1]) for name in by
        ]
        cost = dollars(row.cost_micros)
        if row.unpriced_requests:
            cost += f" (+{row.unpriced_requests} unpriced)"
        out.append(
            (
                *(
                    (convert.datetime_from_timestamp(row.bucket_start).astimezone().strftime("%Y-%m-%d %H:%M"),)
                    if bucketed
                    else ()
                ),
                *(g or "-" for g in groups),
                str(row.requests),
                str(row.failed_requests),
                str(row.attempts),
                str(row.input_tokens) + ("~" if row.estimated_requests else ""),
                str(row.cached_input_tokens),
                str(row.output_tokens) + ("~" if row.estimated_requests else ""),
                str(row.reasoning_tokens),
                cost,
            )
        )
    return "\n".join(table(header, out))


def _show(args: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    now = datetime.now(UTC)
    since = args.since if args.since is not None else parse_time("1h", now=now)
    until = args.until if args.until is not None else now
    if until <= since:
        raise CliError("--until must be after --since")
    by: list[str] = [n for chunk in args.by or [] for n in chunk]
    request = admin_pb2.GetUsageRequest(
        tenant=args.tenant or "",
        group_by=[BY[n][0] for n in dict.fromkeys(by)],  # type: ignore[misc]
        bucket=BUCKETS[args.bucket],
        client_key_id=args.client_key or "",
        public_model=args.model or "",
        page_size=_PAGE,
    )
    request.start_time.CopyFrom(convert.timestamp_from_datetime(since))
    request.end_time.CopyFrom(convert.timestamp_from_datetime(until))
    rows: list[usage_pb2.UsageRow] = []
    while True:
        resp = client.call("GetUsage", request)
        rows.extend(resp.rows)
        if not resp.next_page_token or len(rows) >= args.limit:
            break
        request.page_token = resp.next_page_token
    result = admin_pb2.GetUsageResponse(rows=rows[: args.limit])
    table = usage_table(list(result.rows), list(dict.fromkeys(by)), args.bucket != "none")
    if not args.tenant:
        emit(args, result, table, out)
        return 0
    # With a tenant: its limits (and the client key's) with what is left (keyplane_cli.limits_cmd).
    statuses = limits_of(client, args.tenant, args.client_key or "")
    data = {**to_data(result), "limits": [to_data(s) for s in statuses]}
    emit(args, data, lambda: table + "\n\n" + limits_table(statuses), out)
    return 0


def prices_table(prices: list[usage_pb2.Price]) -> str:
    if not prices:
        return "(no prices: usage is counted, not costed)"
    rows = [
        (
            provider_name(p.provider),
            p.model,
            dollars(p.input_micros_per_million),
            dollars(p.cached_input_micros_per_million),
            dollars(p.output_micros_per_million),
        )
        for p in prices
    ]
    return "\n".join(table(("PROVIDER", "MODEL", "INPUT/M", "CACHED/M", "OUTPUT/M"), rows))


def _provider(name: str) -> int:
    try:
        return int(convert.provider_to_proto(Provider(name)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown provider {name!r}; one of: {', '.join(p.value for p in Provider)}"
        ) from None


def _prices(args: argparse.Namespace, client: AdminClient, out: TextIO) -> int:
    if args.action == "set":
        price = usage_pb2.Price(
            tenant=args.tenant,
            provider=args.provider,
            model=args.model,
            input_micros_per_million=args.input_usd,
            cached_input_micros_per_million=args.cached_input_usd
            if args.cached_input_usd is not None
            else args.input_usd,
            output_micros_per_million=args.output_usd,
        )
        resp = client.call("SetPrice", admin_pb2.SetPriceRequest(price=price))
        emit(args, resp, lambda: prices_table([resp.price]), out)
    elif args.action == "list":
        resp = client.call("ListPrices", admin_pb2.ListPricesRequest(tenant=args.tenant))
        emit(args, resp, lambda: prices_table(list(resp.prices)), out)
    else:
        request = admin_pb2.DeletePriceRequest(tenant=args.tenant, provider=args.provider, model=args.model)
        resp = client.call("DeletePrice", request)
        emit(args, resp, f"deleted the price of {provider_name(args.provider)}:{args.model}", out)
    return 0


def add_usage_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    usage = sub.add_parser("usage", help="tokens and cost per client key, model, provider key (per-minute rollups)")
    actions = usage.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="usage over a time range, grouped (--by) and bucketed",
        description="Tokens and cost from the control plane's per-minute rollups. Counts marked ~ include "
        "estimates (the provider reported no usage). Requests count app requests (once, at their last "
        "attempt; failed: the last attempt failed); attempts count every upstream call, failovers included "
        "(0 in rows folded before the control plane counted them).",
    )
    admin_flags(show)
    show.add_argument("--tenant", "-t", help="only this tenant (default: every tenant)")
    show.add_argument(
        "--since", type=parse_time, help="from this time: 30m, 1h, 2d ago or an ISO 8601 time (default 1h)"
    )
    show.add_argument("--until", type=parse_time, help="up to this time (default now)")
    show.add_argument(
        "--by",
        type=_by,
        action="append",
        help=f"group by (comma-separated, repeatable): {', '.join(BY)} (default: one total)",
    )
    show.add_argument("--bucket", choices=tuple(BUCKETS), default="none", help="one row per minute, hour or day")
    show.add_argument("--client-key", help="only this client key id")
    show.add_argument("--model", help="only this public model")
    show.add_argument("--limit", type=int, default=1000, help="at most this many rows (default 1000)")
    handlers["usage"] = lambda args: with_admin_client(args, lambda c: _show(args, c, sys.stdout))

    prices = sub.add_parser("prices", help="what each (provider, upstream model) costs a tenant, per million tokens")
    pactions = prices.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("set", "set (or replace) a price"), ("list", "a tenant's prices"), ("delete", "drop a price")):
        parser = pactions.add_parser(name, help=text)
        admin_flags(parser)
        parser.add_argument("--tenant", "-t", required=True, help="the tenant")
        if name == "list":
            continue
        parser.add_argument("--provider", "-p", required=True, type=_provider, help="the provider")
        parser.add_argument("--model", "-m", required=True, help="the upstream model, as route targets name it")
        if name == "set":
            parser.add_argument(
                "--input-usd",
                required=True,
                type=micros_per_million,
                help="USD per million input tokens, e.g. 0.15",
            )
            parser.add_argument(
                "--cached-input-usd",
                type=micros_per_million,
                help="USD per million cached input tokens (default: the input price)",
            )
            parser.add_argument(
                "--output-usd",
                required=True,
                type=micros_per_million,
                help="USD per million output tokens, e.g. 0.60",
            )
    handlers["prices"] = lambda args: with_admin_client(args, lambda c: _prices(args, c, sys.stdout))
