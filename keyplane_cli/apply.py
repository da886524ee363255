"""``keyplane apply`` and ``keyplane diff``: declarative config over the
admin API (never the database).

``diff`` exits like ``kubectl diff``: 0 no change, 1 changes, 2 error.
``apply`` creates and updates; with ``--prune`` it deletes what the file no
longer names only when ``--yes`` is given (otherwise it prints what it
would delete). Updates carry the etag read just before (compare-and-set)
and an update mask naming only the changed fields.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import field_mask_pb2

from keyplane import convert
from keyplane.domain import KeyStatus, Provider
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from keyplane_cli.admin_client import AdminClient, CliError, connection_flags, with_admin_client
from keyplane_cli.apply_limits import current_limits, execute_limits
from keyplane_cli.config_file import ConfigError, load_config
from keyplane_cli.config_plan import (
    Action,
    CurrentClientKey,
    CurrentKey,
    CurrentRoute,
    CurrentTenant,
    PlanError,
    PriceSpec,
    TargetSpec,
    TenantSpec,
    keyless_targets,
    plan,
    target_text,
)
from keyplane_cli.output import add_output_flags, write_data
from keyplane_cli.wait import add_wait_flag, wait_after_write

__all__ = ["add_apply_commands"]

_SIGN = {"create": "+", "update": "~", "delete": "-"}


def _provider_name(value: int) -> str:
    provider = convert.provider_from_proto(value)
    return provider.value if provider is not None else "?"


def _status_name(value: int) -> str:
    status = convert.key_status_from_proto(value)
    return status.value if status is not None else "?"


def _target_proto(target: TargetSpec) -> rpb.RouteTarget:
    return rpb.RouteTarget(
        provider=convert.provider_to_proto(Provider(target.provider)),
        upstream_model=target.model,
        priority=target.priority,
        weight=target.weight,
        node_urls=target.node_urls,
        endpoints=[convert.endpoint_to_proto(e) for e in target.endpoints],
        api_version=target.api_version,
        deployment=target.deployment,
    )


def _target_spec(t: rpb.RouteTarget) -> TargetSpec:
    endpoints = tuple(n for e in t.endpoints if (n := convert.endpoint_from_proto(e)) is not None)
    return TargetSpec(
        _provider_name(t.provider),
        t.upstream_model,
        t.priority,
        t.weight,
        tuple(t.node_urls),
        endpoints,
        api_version=t.api_version,
        deployment=t.deployment,
    )


def read_current(client: AdminClient, wanted: Sequence[TenantSpec]) -> dict[str, CurrentTenant]:
    """Every existing tenant; the keys, routes and client keys of those the file names."""
    names = [t.name for t in client.call("ListTenants", apb.ListTenantsRequest()).tenants]
    named = {t.name for t in wanted}
    current: dict[str, CurrentTenant] = {}
    for name in names:
        if name not in named:
            current[name] = CurrentTenant(name)
            continue
        keys = client.call("ListProviderKeys", apb.ListProviderKeysRequest(tenant=name)).keys
        routes = client.call("ListRoutes", apb.ListRoutesRequest(tenant=name)).routes
        cks = client.call("ListClientKeys", apb.ListClientKeysRequest(tenant=name)).client_keys
        prices = client.call("ListPrices", apb.ListPricesRequest(tenant=name)).prices
        limit_sets = client.call("ListLimits", lpb.ListLimitsRequest(tenant=name)).statuses
        current[name] = CurrentTenant(
            name,
            keys=tuple(
                CurrentKey(
                    id=k.id,
                    etag=k.etag,
                    provider=_provider_name(k.provider),
                    label=k.label,
                    base_url=k.base_url,
                    weight=k.weight,
                    allowed_models=tuple(k.allowed_models),
                    status=_status_name(k.status),
                    fingerprint=k.fingerprint,
                )
                for k in keys
            ),
            routes=tuple(
                CurrentRoute(
                    id=r.id,
                    etag=r.etag,
                    model=r.public_model,
                    targets=tuple(_target_spec(t) for t in r.targets),
                )
                for r in routes
            ),
            client_keys=tuple(CurrentClientKey(c.id, c.label) for c in cks),
            limits=current_limits(limit_sets, {c.id: c.label for c in cks}),
            prices=tuple(
                PriceSpec(
                    _provider_name(p.provider),
                    p.model,
                    p.input_micros_per_million,
                    p.cached_input_micros_per_million,
                    p.output_micros_per_million,
                )
                for p in prices
            ),
        )
    return current


def _status_proto(status: str) -> rpb.KeyStatus.ValueType:
    return convert.key_status_to_proto(KeyStatus(status))


def execute_action(client: AdminClient, action: Action) -> str:
    """Carry out one action; returns a client key's new token ("" otherwise)."""
    if action.kind == "tenant":
        if action.op == "create":
            client.call("CreateTenant", apb.CreateTenantRequest(name=action.name))
        else:
            client.call("DeleteTenant", apb.DeleteTenantRequest(name=action.name))
    elif action.kind == "provider_key":
        if action.op == "delete":
            client.call("DeleteProviderKey", apb.DeleteProviderKeyRequest(tenant=action.tenant, id=action.id))
            return ""
        spec = action.key
        assert spec is not None
        if action.op == "create":
            created = client.call(
                "CreateProviderKey",
                apb.CreateProviderKeyRequest(
                    tenant=action.tenant,
                    provider=convert.provider_to_proto(Provider(spec.provider)),
                    label=spec.label,
                    secret=spec.secret or "",
                    base_url=spec.base_url,
                    weight=spec.weight,
                    allowed_models=spec.allowed_models,
                ),
            ).key
            if spec.status != "active":
                client.call(
                    "UpdateProviderKey",
                    apb.UpdateProviderKeyRequest(
                        tenant=action.tenant,
                        id=created.id,
                        key=rpb.ProviderKey(status=_status_proto(spec.status)),
                        update_mask=field_mask_pb2.FieldMask(paths=["status"]),
                        etag=created.etag,
                    ),
                )
            return ""
        paths = [f for f in action.fields if f != "secret"]
        client.call(
            "UpdateProviderKey",
            apb.UpdateProviderKeyRequest(
                tenant=action.tenant,
                id=action.id,
                key=rpb.ProviderKey(
                    base_url=spec.base_url,
                    weight=spec.weight,
                    allowed_models=spec.allowed_models,
                    status=_status_proto(spec.status),
                ),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
                new_secret=(spec.secret or "") if "secret" in action.fields else "",
                etag=action.etag,
            ),
        )
    elif action.kind == "route":
        if action.op == "delete":
            client.call("DeleteRoute", apb.DeleteRouteRequest(tenant=action.tenant, id=action.id))
            return ""
        route = action.route
        assert route is not None
        targets = [_target_proto(t) for t in route.targets]
        if action.op == "create":
            client.call(
                "CreateRoute", apb.CreateRouteRequest(tenant=action.tenant, public_model=route.model, targets=targets)
            )
        else:
            client.call(
                "UpdateRoute",
                apb.UpdateRouteRequest(
                    tenant=action.tenant,
                    id=action.id,
                    route=rpb.Route(targets=targets),
                    update_mask=field_mask_pb2.FieldMask(paths=["targets"]),
                    etag=action.etag,
                ),
            )
    elif action.kind == "price":
        _execute_price(client, action)
    elif action.kind == "limits":
        execute_limits(client, action)
    elif action.op == "create":
        resp = client.call("CreateClientKey", apb.CreateClientKeyRequest(tenant=action.tenant, label=action.name))
        return str(resp.token)
    else:
        client.call("DeleteClientKey", apb.DeleteClientKeyRequest(tenant=action.tenant, id=action.id))
    return ""


def _execute_price(client: AdminClient, action: Action) -> None:
    price = action.price
    assert price is not None
    provider = convert.provider_to_proto(Provider(price.provider))
    if action.op == "delete":
        client.call("DeletePrice", apb.DeletePriceRequest(tenant=action.tenant, provider=provider, model=price.model))
        return
    message = upb.Price(
        tenant=action.tenant,
        provider=provider,
        model=price.model,
        input_micros_per_million=price.input,
        cached_input_micros_per_million=price.cached_input,
        output_micros_per_million=price.output,
    )
    client.call("SetPrice", apb.SetPriceRequest(price=message))


def _detail(action: Action) -> str:
    if action.op == "update":
        return "; ".join(f"{name}: {old} -> {new}" for name, old, new in action.changes)
    if action.op == "create" and action.key is not None:
        key = action.key
        parts = [key.provider, f"weight {key.weight}", f"models {','.join(key.allowed_models) or '*'}"]
        if key.base_url:
            parts.append(key.base_url)
        if key.status != "active":
            parts.append(key.status)
        if key.secret_ref:
            parts.append(f"secret from {key.secret_ref}")
        return ", ".join(parts)
    if action.op == "create" and action.price is not None:
        p = action.price
        return f"input {p.input}, cached input {p.cached_input}, output {p.output} micro-USD per million tokens"
    if action.op == "create" and action.route is not None:
        return "targets: " + " ".join(target_text(t) for t in action.route.targets)
    return ""


def _record(action: Action, state: str, token: str = "") -> dict[str, Any]:
    record: dict[str, Any] = {"op": action.op, "kind": action.kind, "tenant": action.tenant, "name": action.name}
    if action.id:
        record["id"] = action.id
    if action.changes:
        record["changes"] = {name: {"from": old, "to": new} for name, old, new in action.changes}
    if action.op == "create" and action.kind in ("provider_key", "route", "price"):
        record["detail"] = _detail(action)
    record["state"] = state
    if token:
        record["token"] = token
    return record


def _render(records: list[dict[str, Any]], output: str, out: TextIO, *, header: str) -> None:
    if output != "table":
        write_data(output, {"actions": records}, out)
        return
    if not records:
        out.write("no changes\n")
        return
    out.write(header + "\n")
    for r in records:
        detail = r.get("detail") or "; ".join(f"{n}: {c['from']} -> {c['to']}" for n, c in r.get("changes", {}).items())
        note = "" if r["state"] in ("planned", "done") else f"  ({r['state']})"
        what = f"tenant {r['name']}" if r["kind"] == "tenant" else f"{r['kind']} {r['tenant']}/{r['name']}"
        out.write(f"{_SIGN[r['op']]} {what}{': ' + detail if detail else ''}{note}\n")
        if r.get("token"):
            out.write(f"  token of client key {r['tenant']}/{r['name']} (shown once, store it now): {r['token']}\n")


def _plan_for(args: argparse.Namespace, client: AdminClient) -> list[Action]:
    try:
        wanted = load_config(args.file)
    except ConfigError as exc:
        raise CliError(f"{args.file} is not a valid keyplane config:\n  " + "\n  ".join(exc.problems)) from None
    current = read_current(client, wanted)
    try:
        actions = plan(wanted, current, prune=args.prune, prune_tenants=args.prune_tenants)
    except PlanError as exc:
        raise CliError(str(exc)) from None
    for tenant in wanted:
        missing = keyless_targets(tenant, current.get(tenant.name), prune=args.prune)
        if missing:
            sys.stderr.write(
                f"warning: tenant {tenant.name!r}: no active key for the provider of {', '.join(missing)}: "
                "requests routed there get 503 no_usable_key\n"
            )
    return actions


def _rpc_errors(body: Callable[[AdminClient], int]) -> Callable[[AdminClient], int]:
    """An RPC error is exit code 2 (as every error here), never 1 (changes)."""

    def run(client: AdminClient) -> int:
        try:
            return body(client)
        except grpc.RpcError as exc:
            raise CliError(_rpc_message(exc)) from None

    return run


def _rpc_message(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code is not None else 'ERROR'}: {details}"


def run_diff(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(client: AdminClient) -> int:
        actions = _plan_for(args, client)
        _render([_record(a, "planned") for a in actions], args.output, out, header="planned changes:")
        return 1 if actions else 0

    return with_admin_client(args, _rpc_errors(body))


def run_apply(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def body(client: AdminClient) -> int:
        actions = _plan_for(args, client)
        records: list[dict[str, Any]] = []
        versions: dict[str, int] = {}  # per tenant, the newest version a write returned
        try:
            for action in actions:
                if action.op == "delete" and not args.yes:
                    records.append(_record(action, "dry run: pass --yes to delete"))
                    continue
                try:
                    token = execute_action(client, action)
                except grpc.RpcError as exc:
                    raise CliError(
                        f"{action.op} {action.kind} {action.tenant}/{action.name} failed: {_rpc_message(exc)} "
                        "(what is listed above was done, nothing after it; run diff, then apply again)"
                    ) from None
                records.append(_record(action, "done", token))
                tenant = action.tenant or action.name
                versions[tenant] = max(versions.get(tenant, 0), getattr(client.last_response, "version", 0))
        finally:
            # What was done (tokens included) is printed even when a later step fails.
            _render(records, args.output, out, header="applied:")
        if args.wait is None:
            return 0
        report = out if args.output == "table" else sys.stderr  # stdout carries the plan's JSON/YAML alone
        codes = [wait_after_write(args, client, tenant, versions[tenant], report) for tenant in sorted(versions)]
        return max(codes, default=0)

    return with_admin_client(args, _rpc_errors(body))


def add_apply_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register ``apply`` and ``diff``."""
    for name, help_text, runner in (
        ("apply", "make the control plane match a config file (keyplane.yaml)", run_apply),
        ("diff", "show what apply would change (exit 0: nothing, 1: changes, 2: error)", run_diff),
    ):
        parser = sub.add_parser(name, help=help_text, description=help_text)
        handlers[name] = runner
        parser.add_argument("-f", "--file", type=Path, required=True, help="the config file (YAML or JSON)")
        parser.add_argument(
            "--prune",
            action="store_true",
            help="also delete keys, routes and client keys of the file's tenants that the file does not name",
        )
        parser.add_argument(
            "--prune-tenants", action="store_true", help="also delete tenants the file does not name (and all they own)"
        )
        add_output_flags(parser)
        if name == "apply":
            add_wait_flag(parser)
            parser.add_argument(
                "--yes",
                "--confirm",
                action="store_true",
                help="carry out --prune deletions (without it they are only printed)",
            )
        connection_flags(parser)
