"""``keyplane admin-tokens`` and ``keyplane sidecar-tokens``: create, list and
revoke API tokens through the AdminService. A token is printed once, by
create; list shows ids, labels and prefixes only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TextIO

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2
from keyplane_cli.admin_client import AdminClient, admin_flags, with_admin_client
from keyplane_cli.output import emit as _emit
from keyplane_cli.tables import table as _table

__all__ = ["add_token_commands", "run_tokens"]

_ONCE = "token (shown once, store it now): "


def _when(value: Timestamp, present: bool = True) -> str:
    if not present:
        return "-"
    return datetime.fromtimestamp(value.ToNanoseconds() / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _admin_rows(tokens: Sequence[resources_pb2.AdminToken]) -> str:
    if not tokens:
        return "(no admin tokens; the bootstrap token from the token file is not listed)"
    rows = [
        (
            t.id,
            t.label,
            t.prefix + "...",
            _when(t.create_time),
            _when(t.revoke_time, t.HasField("revoke_time")),
            f"etag={t.etag}",
        )
        for t in tokens
    ]
    return "\n".join(_table(("ID", "LABEL", "PREFIX", "CREATED", "REVOKED", "ETAG"), rows))


def _sidecar_rows(tokens: Sequence[resources_pb2.SidecarToken]) -> str:
    if not tokens:
        return "(no sidecar tokens; the bootstrap tokens from the token file are not listed)"
    rows = [
        (
            t.id,
            t.label,
            t.prefix + "...",
            "*" if t.all_tenants else ",".join(t.tenants),
            _when(t.create_time),
            _when(t.revoke_time, t.HasField("revoke_time")),
            f"etag={t.etag}",
        )
        for t in tokens
    ]
    return "\n".join(_table(("ID", "LABEL", "PREFIX", "TENANTS", "CREATED", "REVOKED", "ETAG"), rows))


def _admin_tokens(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    if args.action == "create":
        resp = client.call("CreateAdminToken", admin_pb2.CreateAdminTokenRequest(label=args.label))
        text = f"created admin token {resp.admin_token.id} ({resp.admin_token.label})\n{_ONCE}{resp.token}"
        _emit(args, resp, text, out)
    elif args.action == "list":
        resp = client.call("ListAdminTokens", admin_pb2.ListAdminTokensRequest())
        _emit(args, resp, _admin_rows(resp.admin_tokens), out)
    elif args.action == "revoke":
        resp = client.call("RevokeAdminToken", admin_pb2.RevokeAdminTokenRequest(id=args.id, etag=args.etag or ""))
        _emit(args, resp, f"revoked admin token {resp.admin_token.id} ({resp.admin_token.label})", out)


def _sidecar_tokens(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    if args.action == "create":
        request = admin_pb2.CreateSidecarTokenRequest(
            label=args.label, tenants=args.tenant or [], all_tenants=args.all_tenants
        )
        resp = client.call("CreateSidecarToken", request)
        token = resp.sidecar_token
        scope = "every tenant" if token.all_tenants else "tenants " + ",".join(token.tenants)
        _emit(args, resp, f"created sidecar token {token.id} ({token.label}) for {scope}\n{_ONCE}{resp.token}", out)
    elif args.action == "list":
        resp = client.call("ListSidecarTokens", admin_pb2.ListSidecarTokensRequest())
        _emit(args, resp, _sidecar_rows(resp.sidecar_tokens), out)
    elif args.action == "revoke":
        resp = client.call("RevokeSidecarToken", admin_pb2.RevokeSidecarTokenRequest(id=args.id, etag=args.etag or ""))
        token = resp.sidecar_token
        _emit(args, resp, f"revoked sidecar token {token.id} ({token.label}); its streams end now", out)


def run_tokens(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(client: AdminClient) -> int:
        if args.group == "admin-tokens":
            _admin_tokens(args, client, out)
        else:
            _sidecar_tokens(args, client, out)
        return 0

    return with_admin_client(args, body)


def _revoke_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="the token's id (from list); the bootstrap tokens cannot be revoked here")
    parser.add_argument("--etag", help="only revoke if the token still has this etag (from list); else ABORTED")


def add_token_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register the admin-tokens and sidecar-tokens command groups."""
    for group, what in (("admin-tokens", "admin API tokens"), ("sidecar-tokens", "sidecar tokens")):
        parser = sub.add_parser(group, help=f"create, list and revoke {what} (revocation needs no restart)")
        handlers[group] = run_tokens
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        create = actions.add_parser("create", help=f"create one of the {what} (the token is printed once)")
        admin_flags(create)
        create.add_argument("--label", "-l", required=True, help="what the token is for (not unique)")
        if group == "sidecar-tokens":
            scope = create.add_mutually_exclusive_group(required=True)
            scope.add_argument("--tenant", "-t", action="append", help="a tenant it may watch (repeatable)")
            scope.add_argument("--all-tenants", action="store_true", help="every tenant, including future ones")
        admin_flags(actions.add_parser("list", help=f"list the {what} created through the API (prefixes only)"))
        revoke = actions.add_parser("revoke", help="revoke a token on every replica, at once")
        admin_flags(revoke)
        _revoke_flags(revoke)
