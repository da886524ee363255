"""The ``table`` output of the admin commands (``-o table``, the default): what
people read. Lists have a header row; an empty list says so in one line.
Times are local, with how far away they are ("in 12s")."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane import convert
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2

__all__ = [
    "client_keys_table",
    "health_table",
    "key_row",
    "keys_table",
    "local_time",
    "provider_name",
    "route_row",
    "routes_table",
    "sidecars_table",
    "table",
    "tenants_table",
]

_HEALTH_FROM_PROTO = {
    v: name.removeprefix("HEALTH_STATE_").lower() for name, v in resources_pb2.HealthState.items() if v != 0
}


def provider_name(value: int) -> str:
    provider = convert.provider_from_proto(value)
    return provider.value if provider is not None else "?"


def _status_name(value: int) -> str:
    status = convert.key_status_from_proto(value)
    return status.value if status is not None else "?"


def local_time(value: Timestamp) -> str:
    return datetime.fromtimestamp(value.ToNanoseconds() / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)]


def tenants_table(tenants: Sequence[resources_pb2.Tenant]) -> str:
    if not tenants:
        return "(no tenants)"
    return "\n".join(table(("TENANT",), [(t.name,) for t in tenants]))


def key_row(key: resources_pb2.ProviderKey) -> str:
    """One key on one line (what add, show, enable, ... print)."""
    models = ",".join(key.allowed_models) or "*"
    return (
        f"{key.id}  {provider_name(key.provider):<17} {key.label:<20} "
        f"{_status_name(key.status):<8} w={key.weight:<3} ...{key.last4 or '????'} "
        f"fp={key.fingerprint} models={models} {key.base_url} etag={key.etag}"
    )


def keys_table(keys: Sequence[resources_pb2.ProviderKey]) -> str:
    if not keys:
        return "(no keys)"
    rows = [
        (
            k.id,
            provider_name(k.provider),
            k.label,
            _status_name(k.status),
            str(k.weight),
            f"...{k.last4 or '????'}",
            k.fingerprint,
            ",".join(k.allowed_models) or "*",
            k.base_url or "-",
            f"etag={k.etag}",
        )
        for k in keys
    ]
    header = ("ID", "PROVIDER", "LABEL", "STATUS", "WEIGHT", "SECRET", "FINGERPRINT", "MODELS", "BASE URL", "ETAG")
    return "\n".join(table(header, rows))


def _azure_suffix(t: resources_pb2.RouteTarget) -> str:
    if not t.api_version:
        return ""
    return f"?api-version={t.api_version}" + (f"&deployment={t.deployment}" if t.deployment else "")


def _endpoints(t: resources_pb2.RouteTarget) -> str:
    if not t.endpoints:
        return ""
    return "+" + ",".join(n for e in t.endpoints if (n := convert.endpoint_from_proto(e)))


def target_spec(t: resources_pb2.RouteTarget) -> str:
    """A target as ``--target`` takes it: provider:model@priority*weight[+endpoints][=nodes][?azure]."""
    return (
        f"{provider_name(t.provider)}:{t.upstream_model}@{t.priority}*{t.weight}"
        + _endpoints(t)
        + (("=" + ",".join(t.node_urls)) if t.node_urls else "")
        + _azure_suffix(t)
    )


def _targets(route: resources_pb2.Route) -> str:
    return " ".join(target_spec(t) for t in route.targets)


def route_row(route: resources_pb2.Route) -> str:
    return f"{route.id}  {route.public_model:<24} -> {_targets(route)}  etag={route.etag}"


def routes_table(routes: Sequence[resources_pb2.Route]) -> str:
    if not routes:
        return "(no routes)"
    rows = [(r.id, r.public_model, _targets(r), f"etag={r.etag}") for r in routes]
    return "\n".join(table(("ID", "MODEL", "TARGETS (provider:model@priority*weight)", "ETAG"), rows))


def client_keys_table(client_keys: Sequence[resources_pb2.ClientKey]) -> str:
    if not client_keys:
        return "(no client keys)"
    rows = [(c.id, c.label, f"{c.prefix}...") for c in client_keys]
    return "\n".join(table(("ID", "LABEL", "TOKEN PREFIX"), rows))


def _until(entry: resources_pb2.KeyHealth | resources_pb2.ProviderHealth, now: float) -> str:
    """``2025-01-02 03:04:05 (in 12s)`` in local time, or ``-`` when it lasts until reset."""
    if not entry.HasField("until"):
        return "-"
    until = entry.until.ToNanoseconds() / 1e9
    local = datetime.fromtimestamp(until).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    left = until - now
    return f"{local} (in {left:.0f}s)" if left >= 0 else f"{local} (ended {-left:.0f}s ago)"


def health_table(resp: admin_pb2.GetHealthResponse, *, now: float) -> str:
    """The human view of ``GetHealth``: key-wide and per-model key entries,
    then per-(provider, model) entries; anything not listed is healthy."""
    if not resp.key_health and not resp.provider_health:
        return "all keys and providers are healthy"
    lines: list[str] = []
    if resp.key_health:
        rows = [
            (
                h.key_id,
                h.model or "(all models)",
                _HEALTH_FROM_PROTO.get(h.state, "?"),
                _until(h, now),
                h.reason,
            )
            for h in resp.key_health
        ]
        lines += table(("KEY", "MODEL", "STATE", "UNTIL", "REASON"), rows)
    if resp.provider_health:
        if lines:
            lines.append("")
        rows = [
            (
                provider_name(h.provider),
                h.model,
                _HEALTH_FROM_PROTO.get(h.state, "?"),
                _until(h, now),
                h.reason,
            )
            for h in resp.provider_health
        ]
        lines += table(("PROVIDER", "MODEL", "STATE", "UNTIL", "REASON"), rows)
    lines.append("(keys and providers not listed are healthy)")
    return "\n".join(lines)


def sidecars_table(sidecars: Sequence[admin_pb2.SidecarInfo]) -> str:
    if not sidecars:
        return "(no sidecars connected)"
    rows = [
        (
            s.sidecar_id or "-",
            "*" if s.all_tenants else ",".join(s.tenants),
            s.peer,
            local_time(s.connect_time),
            str(s.version),
        )
        for s in sidecars
    ]
    return "\n".join(table(("SIDECAR", "TENANTS", "PEER", "CONNECTED", "VERSION"), rows))
