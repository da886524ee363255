"""Admin commands: they talk to the control plane's gRPC AdminService only."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from google.protobuf import field_mask_pb2

from keyplane import convert
from keyplane.domain import KeyStatus, Provider
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2
from keyplane_cli.admin_client import (
    AdminClient,
    CliError,
    admin_flags,
    with_admin_client,
)
from keyplane_cli.output import emit
from keyplane_cli.tables import (
    client_keys_table,
    health_table,
    key_row,
    keys_table,
    provider_name,
    route_row,
    routes_table,
    sidecars_table,
    table,
    tenants_table,
)
from keyplane_cli.targets import split_azure_suffix
from keyplane_cli.wait import add_wait_flag, wait_after_write

__all__ = ["add_admin_commands"]


def _provider(name: str) -> int:
    try:
        return convert.provider_to_proto(Provider(name))
    except ValueError:
        choices = ", ".join(p.value for p in Provider)
        raise argparse.ArgumentTypeError(f"unknown provider {name!r}; one of: {choices}") from None


def _target(spec: str) -> resources_pb2.RouteTarget:
    """Parse ``provider:upstream_model[@priority][*weight][+endpoint,...][=node_url,node_url]``, or for
    an Azure classic deployment ``...[?api-version=V[&deployment=NAME]]``."""
    try:
        spec, api_version, deployment = split_azure_suffix(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    nodes: list[str] = []
    if "=" in spec:
        spec, node_part = spec.split("=", 1)
        nodes = [n for n in node_part.split(",") if n]
    endpoints: list[resources_pb2.Endpoint.ValueType] = []
    if "+" in spec:
        spec, endpoint_part = spec.rsplit("+", 1)
        endpoints = [_endpoint(e) for e in endpoint_part.split(",") if e]
    weight = 1
    if "*" in spec:
        spec, weight_text = spec.rsplit("*", 1)
        weight = _int(weight_text, "weight")
    priority = 0
    if "@" in spec:
        spec, priority_text = spec.rsplit("@", 1)
        priority = _int(priority_text, "priority")
    provider_name, sep, model = spec.partition(":")
    if not sep or not model:
        raise argparse.ArgumentTypeError(
            f"target {spec!r} must look like provider:upstream_model[@priority][*weight][+endpoint,...][=node_url,...]"
        )
    return resources_pb2.RouteTarget(
        provider=_provider(provider_name),  # type: ignore[arg-type]
        upstream_model=model,
        priority=priority,
        weight=weight,
        node_urls=nodes,
        endpoints=endpoints,
        api_version=api_version,
        deployment=deployment,
    )


def _endpoint(name: str) -> resources_pb2.Endpoint.ValueType:
    try:
        return convert.endpoint_to_proto(name)
    except ValueError:
        choices = ", ".join(convert.endpoint_names())
        raise argparse.ArgumentTypeError(f"unknown endpoint {name!r}; one of: {choices}") from None


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None


def _read_secret(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.secret_env:
        value = os.environ.get(args.secret_env)
        if value is None:
            raise CliError(f"environment variable {args.secret_env} is not set")
        return value.strip()
    if args.secret_stdin:
        return stdin.readline().strip()
    if args.no_secret:
        return ""
    if not stdin.isatty():
        # getpass would read a pipe with a warning that the secret may be
        # echoed, or fail with EOFError: say what to do instead.
        raise CliError("no secret given and stdin is not a terminal: use --secret-env VAR or --secret-stdin")
    return getpass.getpass("provider secret: ").strip()


# The one output module and the table helpers, under the names the command modules import.
_emit = emit
_table = table


def run_admin(args: argparse.Namespace, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> int:
    return with_admin_client(args, lambda client: _dispatch(args, client, out, stdin))


def _dispatch(args: argparse.Namespace, client: AdminClient, out: TextIO, stdin: TextIO) -> int:
    group, action = args.group, args.action
    if group == "tenants":
        if action == "create":
            resp = client.call("CreateTenant", admin_pb2.CreateTenantRequest(name=args.name))
            _emit(args, resp, f"created tenant {resp.tenant.name}", out)
        elif action == "list":
            resp = client.call("ListTenants", admin_pb2.ListTenantsRequest())
            _emit(args, resp, lambda: tenants_table(resp.tenants), out)
        elif action == "delete":
            resp = client.call("DeleteTenant", admin_pb2.DeleteTenantRequest(name=args.name))
            _emit(args, resp, f"deleted tenant {args.name}", out)
    elif group == "keys":
        _keys(args, client, out, stdin)
    elif group == "routes":
        _routes(args, client, out)
    elif group == "client-keys":
        _client_keys(args, client, out)
    elif group == "health":
        _health(args, client, out)
    elif group == "sidecars":
        resp = client.call("ListSidecars", admin_pb2.ListSidecarsRequest())
        _emit(args, resp, sidecars_table(resp.sidecars), out)
    if getattr(args, "wait", None) is not None and client.last_response is not None:
        tenant = getattr(args, "tenant", None) or args.name
        return wait_after_write(args, client, tenant, getattr(client.last_response, "version", 0), out)
    return 0


def _keys(args: argparse.Namespace, client: AdminClient, out: TextIO, stdin: TextIO) -> None:
    action = args.action
    if action == "add":
        secret = _read_secret(args, stdin)
        req = admin_pb2.CreateProviderKeyRequest(
            tenant=args.tenant,
            provider=args.provider,
            label=args.label,
            secret=secret,
            base_url=args.base_url or "",
            weight=args.weight,
            allowed_models=args.model or [],
        )
        resp = client.call("CreateProviderKey", req)
        _emit(args, resp, "added " + key_row(resp.key), out)
    elif action == "list":
        resp = client.call("ListProviderKeys", admin_pb2.ListProviderKeysRequest(tenant=args.tenant))
        _emit(args, resp, lambda: keys_table(resp.keys), out)
    elif action == "show":
        resp = client.call("GetProviderKey", admin_pb2.GetProviderKeyRequest(tenant=args.tenant, id=args.id))
        _emit(args, resp, key_row(resp.key), out)
    elif action in ("enable", "disable", "revoke"):
        status = {"enable": KeyStatus.ACTIVE, "disable": KeyStatus.DISABLED, "revoke": KeyStatus.REVOKED}[action]
        update = admin_pb2.UpdateProviderKeyRequest(
            tenant=args.tenant,
            id=args.id,
            key=resources_pb2.ProviderKey(status=convert.key_status_to_proto(status)),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            etag=args.etag or "",
        )
        resp = client.call("UpdateProviderKey", update)
        _emit(args, resp, f"{action}d " + key_row(resp.key), out)
    elif action == "rotate":
        secret = _read_secret(args, stdin)
        rotate = admin_pb2.UpdateProviderKeyRequest(
            tenant=args.tenant, id=args.id, new_secret=secret, etag=args.etag or ""
        )
        resp = client.call("UpdateProviderKey", rotate)
        _emit(args, resp, "rotated " + key_row(resp.key), out)
    elif action == "delete":
        resp = client.call("DeleteProviderKey", admin_pb2.DeleteProviderKeyRequest(tenant=args.tenant, id=args.id))
        _emit(args, resp, f"deleted key {args.id}", out)


def _keyless_targets(client: AdminClient, tenant: str, targets: list[resources_pb2.RouteTarget]) -> list[str]:
    """Targets whose provider has no active key in the tenant (a vLLM target
    with nodes needs none): requests for them would get 503 no_usable_key."""
    keys = client.call("ListProviderKeys", admin_pb2.ListProviderKeysRequest(tenant=tenant)).keys
    active = {k.provider for k in keys if k.status == resources_pb2.KEY_STATUS_ACTIVE}
    return [
        f"{provider_name(t.provider)}:{t.upstream_model}"
        for t in targets
        if t.provider not in active and not (t.provider == resources_pb2.PROVIDER_VLLM and t.node_urls)
    ]


def _check_targets_have_keys(args: argparse.Namespace, client: AdminClient) -> None:
    missing = _keyless_targets(client, args.tenant, list(args.target))
    if not missing:
        return
    providers = sorted({m.split(":", 1)[0] for m in missing})
    message = (
        f"no active key in tenant {args.tenant!r} for provider(s) {', '.join(providers)}: requests routed to "
        f"{', '.join(missing)} get 503 no_usable_key until one is added "
        f"(keyplane keys add -t {args.tenant} -p {providers[0]} ...)"
    )
    if args.strict:
        raise CliError(message + "; nothing was changed (--strict)")
    sys.stderr.write(f"warning: {message}\n")


def _routes(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    action = args.action
    if action in ("add", "set-targets"):
        _check_targets_have_keys(args, client)
    if action == "add":
        req = admin_pb2.CreateRouteRequest(tenant=args.tenant, public_model=args.model, targets=args.target)
        resp = client.call("CreateRoute", req)
        _emit(args, resp, "added " + route_row(resp.route), out)
    elif action == "list":
        resp = client.call("ListRoutes", admin_pb2.ListRoutesRequest(tenant=args.tenant))
        _emit(args, resp, lambda: routes_table(resp.routes), out)
    elif action == "set-targets":
        update = admin_pb2.UpdateRouteRequest(tenant=args.tenant, id=args.id, targets=args.target, etag=args.etag or "")
        resp = client.call("UpdateRoute", update)
        _emit(args, resp, "updated " + route_row(resp.route), out)
    elif action == "delete":
        resp = client.call("DeleteRoute", admin_pb2.DeleteRouteRequest(tenant=args.tenant, id=args.id))
        _emit(args, resp, f"deleted route {args.id}", out)


def _client_keys(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    action = args.action
    if action == "create":
        resp = client.call("CreateClientKey", admin_pb2.CreateClientKeyRequest(tenant=args.tenant, label=args.label))
        text = (
            f"created client key {resp.client_key.id} ({resp.client_key.label})\n"
            f"token (shown once, store it now): {resp.token}"
        )
        _emit(args, resp, text, out)
    elif action == "list":
        resp = client.call("ListClientKeys", admin_pb2.ListClientKeysRequest(tenant=args.tenant))
        _emit(args, resp, lambda: client_keys_table(resp.client_keys), out)
    elif action == "delete":
        resp = client.call("DeleteClientKey", admin_pb2.DeleteClientKeyRequest(tenant=args.tenant, id=args.id))
        _emit(args, resp, f"deleted client key {args.id}", out)


def _health(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    if args.action == "show":
        resp = client.call("GetHealth", admin_pb2.GetHealthRequest(tenant=args.tenant))
        _emit(args, resp, health_table(resp, now=time.time()), out)
    elif args.action == "reset":
        reset = admin_pb2.ResetKeyHealthRequest(tenant=args.tenant, key_id=args.key_id)
        resp = client.call("ResetKeyHealth", reset)
        _emit(args, resp, f"reset the health of key {args.key_id}", out)


def _tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", "-t", required=True, help="the tenant (isolation boundary) to work in")


def _etag(parser: argparse.ArgumentParser) -> None:
    # Without --etag an update is unconditional; it still writes only what the
    # command changes, so it never undoes another update of other fields.
    parser.add_argument(
        "--etag",
        help="only update if the object still has this etag (from show/list); else fail with ABORTED",
    )


def _secret_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--secret-env", metavar="VAR", help="read the provider secret from this environment variable")
    src.add_argument(
        "--secret-stdin", action="store_true", help="read the provider secret from the first line of stdin"
    )
    src.add_argument("--no-secret", action="store_true", help="no secret (self-hosted vllm nodes)")


def add_admin_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register the tenants/keys/routes/client-keys/health/sidecars command groups."""

    def group(name: str, help_text: str) -> Any:
        parser = sub.add_parser(name, help=help_text)
        handlers[name] = run_admin
        return parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(actions: Any, name: str, help_text: str, *extra: Callable[[argparse.ArgumentParser], None]) -> Any:
        parser = actions.add_parser(name, help=help_text)
        admin_flags(parser)
        for add in extra:
            add(parser)
        return parser

    tenants = group("tenants", "create, list and delete tenants")
    action(tenants, "create", "create a tenant", add_wait_flag).add_argument(
        "name", help="1-63 lower-case letters, digits, '-' or '_'"
    )
    action(tenants, "list", "list tenants")
    action(tenants, "delete", "delete a tenant and everything it owns", add_wait_flag).add_argument(
        "name", help="the tenant"
    )

    keys = group("keys", "manage provider keys (secrets are write-only)")
    add = action(keys, "add", "add a provider key", _tenant, _secret_source, add_wait_flag)
    add.add_argument(
        "--provider", "-p", required=True, type=_provider, help="one of: " + ", ".join(p.value for p in Provider)
    )
    add.add_argument("--label", "-l", required=True, help="a name for the key, unique in the tenant")
    add.add_argument("--base-url", help="required for openai_compatible and azure_openai")
    add.add_argument(
        "--weight", type=int, default=1, help="share of traffic among the provider's keys (1-1000, default 1)"
    )
    add.add_argument("--model", action="append", help="restrict the key to this upstream model (repeatable)")
    action(keys, "list", "list a tenant's keys", _tenant)
    for name, text, *extra in (
        ("show", "show one key"),
        ("enable", "set a key active", _etag, add_wait_flag),
        ("disable", "stop using a key", _etag, add_wait_flag),
        ("revoke", "revoke a key for good", _etag, add_wait_flag),
        ("delete", "delete a key", add_wait_flag),
    ):
        action(keys, name, text, _tenant, *extra).add_argument("id", help="the key's id (from keys list)")
    action(keys, "rotate", "replace a key's secret", _tenant, _secret_source, _etag, add_wait_flag).add_argument(
        "id", help="the key's id (from keys list)"
    )

    routes = group("routes", "map public model names to provider targets")
    radd = action(routes, "add", "add a route", _tenant, add_wait_flag)
    radd.add_argument("--model", "-m", required=True, help="the public model name apps ask for")
    radd.add_argument(
        "--target",
        action="append",
        required=True,
        type=_target,
        help="provider:upstream_model[@priority][*weight][+endpoint,...][=node_url,...][?api-version=V[&deployment=D]] "
        "(repeatable, in order; +endpoints limits what the target serves, e.g. +embeddings,responses; default: the "
        "provider's; ?api-version= for an Azure classic deployment)",
    )
    action(routes, "list", "list routes", _tenant)
    rset = action(routes, "set-targets", "replace a route's targets", _tenant, _etag, add_wait_flag)
    rset.add_argument("id", help="the route's id (from routes list)")
    rset.add_argument(
        "--target",
        action="append",
        required=True,
        type=_target,
        help="provider:upstream_model[@priority][*weight][+endpoint,...][=node_url,...][?api-version=V[&deployment=D]] "
        "(repeatable, in order; +endpoints limits what the target serves, e.g. +embeddings,responses; default: the "
        "provider's; ?api-version= for an Azure classic deployment)",
    )
    for parser in (radd, rset):
        parser.add_argument(
            "--strict",
            action="store_true",
            help="refuse (instead of warning) when a target's provider has no active key in the tenant",
        )
    action(routes, "delete", "delete a route", _tenant, add_wait_flag).add_argument(
        "id", help="the route's id (from routes list)"
    )

    cks = group("client-keys", "issue and revoke the bearer tokens apps use at the sidecar")
    action(cks, "create", "issue a client key (its token is shown once)", _tenant, add_wait_flag).add_argument(
        "--label", "-l", required=True, help="a name for the app's key, unique in the tenant"
    )
    action(cks, "list", "list client keys", _tenant)
    action(cks, "delete", "revoke a client key", _tenant, add_wait_flag).add_argument(
        "id", help="the client key's id (from client-keys list)"
    )

    health = group("health", "learnt key and provider health (re-enable a key with 'keys enable')")
    action(health, "show", "keys and providers that are not healthy, with reasons and until-times", _tenant)
    action(health, "reset", "clear what was learnt about one key (every model)", _tenant, add_wait_flag).add_argument(
        "key_id", help="the key's id (from keys list)"
    )

    sidecars = group("sidecars", "the sidecars connected to this control plane")
    action(sidecars, "list", "connected sidecars with their tenants and versions")
