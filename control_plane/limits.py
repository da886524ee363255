"""Configuration size caps: pure checks that raise ``InvalidArgument`` naming
the limit.

They keep every tenant's state small enough to travel to sidecars in one
Watch message (``keyplane.limits``) and keep one admin call from making the
control plane build, hold and send unbounded state.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyplane.errors import InvalidArgument
from keyplane.limits import MAX_TENANT_SNAPSHOT_BYTES

__all__ = [
    "MAX_ALLOWED_MODELS_PER_KEY",
    "MAX_CLIENT_KEYS_PER_TENANT",
    "MAX_KEYS_PER_TENANT",
    "MAX_NODE_URLS_PER_TARGET",
    "MAX_ROUTES_PER_TENANT",
    "MAX_ROUTE_BYTES",
    "MAX_TARGETS_PER_ROUTE",
    "MAX_TENANT_SNAPSHOT_BYTES",
    "TenantUsage",
    "check_allowed_models",
    "check_room",
    "check_route_bytes",
    "check_route_shape",
    "check_snapshot_growth",
]

MAX_TARGETS_PER_ROUTE = 64
MAX_NODE_URLS_PER_TARGET = 64
MAX_ALLOWED_MODELS_PER_KEY = 256
MAX_KEYS_PER_TENANT = 1000
MAX_ROUTES_PER_TENANT = 1000
MAX_CLIENT_KEYS_PER_TENANT = 10_000
# One route as sent to sidecars (targets with their node URLs).
MAX_ROUTE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """How much of its caps a tenant uses (as the control plane holds it)."""

    keys: int = 0
    routes: int = 0
    client_keys: int = 0
    snapshot_bytes: int = 0


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def check_route_shape(target_node_urls: list[int], *, field: str = "targets") -> None:
    """``target_node_urls``: the number of node URLs of each target, in order.
    Checked before anything else of the targets is looked at."""
    if len(target_node_urls) > MAX_TARGETS_PER_ROUTE:
        raise InvalidArgument(
            f"{field}: a route has at most {MAX_TARGETS_PER_ROUTE} targets (got {len(target_node_urls)})"
        )
    for index, count in enumerate(target_node_urls):
        if count > MAX_NODE_URLS_PER_TARGET:
            raise InvalidArgument(
                f"{field}[{index}].node_urls: a target has at most {MAX_NODE_URLS_PER_TARGET} node URLs (got {count})"
            )


def check_allowed_models(count: int, *, field: str = "allowed_models") -> None:
    if count > MAX_ALLOWED_MODELS_PER_KEY:
        raise InvalidArgument(f"{field}: a key allows at most {MAX_ALLOWED_MODELS_PER_KEY} models (got {count})")


def check_route_bytes(size: int) -> None:
    if size > MAX_ROUTE_BYTES:
        raise InvalidArgument(
            f"targets: the route is {size} bytes encoded; a route may take at most {MAX_ROUTE_BYTES} bytes "
            "(fewer targets or node URLs)"
        )


_ROOM = {
    "keys": ("provider keys", MAX_KEYS_PER_TENANT),
    "routes": ("routes", MAX_ROUTES_PER_TENANT),
    "client_keys": ("client keys", MAX_CLIENT_KEYS_PER_TENANT),
}


def check_room(usage: TenantUsage, kind: str, tenant: str) -> None:
    """One more ``kind`` (``keys``, ``routes`` or ``client_keys``) fits in the tenant."""
    what, limit = _ROOM[kind]
    if getattr(usage, kind) >= limit:
        raise InvalidArgument(f"tenant {tenant!r} already has {limit} {what}, the most a tenant may have")


def check_snapshot_growth(usage: TenantUsage, tenant: str, *, adding: int, removing: int = 0) -> None:
    """The tenant's state, as sent to sidecars, stays within its cap once an
    object of ``adding`` bytes replaces one of ``removing`` bytes."""
    after = usage.snapshot_bytes - removing + adding
    if after > MAX_TENANT_SNAPSHOT_BYTES:
        raise InvalidArgument(
            f"tenant {tenant!r} would hold {_mib(after)} of configuration as sent to sidecars; "
            f"the most a tenant may hold is {_mib(MAX_TENANT_SNAPSHOT_BYTES)}"
        )
