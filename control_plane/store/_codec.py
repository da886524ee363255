"""What both stores share: value encodings, timestamps and error messages.

Pure functions, no I/O. Keeping the messages here makes the two stores
report the same failure with the same words (the conformance suite checks it).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from keyplane.domain import Provider, RouteTarget, TokenKind
from keyplane.errors import Aborted, AlreadyExists, InvalidArgument, NotFound

__all__ = [
    "KIND_NAMES",
    "SET_COLUMNS",
    "already_exists",
    "not_found",
    "stale",
    "targets_from_json",
    "targets_to_json",
    "tenant_not_found",
    "token_not_found",
    "token_stale",
    "utc",
]

# Human name of each table's rows, used in messages.
KIND_NAMES = {
    "tenants": "tenant",
    "provider_keys": "provider key",
    "routes": "route",
    "client_keys": "client key",
    "nodes": "node",
}


# The columns an update may name, per table (what goes into an UPDATE's SET).
SET_COLUMNS = {
    "provider_keys": frozenset(
        {
            "label",
            "status",
            "weight",
            "allowed_models",
            "base_url",
            "secret_ciphertext",
            "fingerprint",
            "last4",
            "updated_at",
        }
    ),
    "routes": frozenset({"public_model", "targets", "updated_at"}),
}


def utc(value: datetime, field: str = "timestamp") -> datetime:
    """``value`` converted to UTC; a naive datetime is a caller bug."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{field} must be a timezone-aware datetime")
    return value.astimezone(UTC)


def _target_json(t: RouteTarget) -> dict[str, Any]:
    item: dict[str, Any] = {
        "provider": t.provider.value,
        "upstream_model": t.upstream_model,
        "priority": t.priority,
        "weight": t.weight,
        "node_urls": list(t.node_urls),
    }
    if t.endpoints:  # absent: the provider's default (rows written before endpoints existed)
        item["endpoints"] = list(t.endpoints)
    # Only when set, so routes without them store what they always did.
    if t.api_version:
        item["api_version"] = t.api_version
    if t.deployment:
        item["deployment"] = t.deployment
    return item


def targets_to_json(targets: tuple[RouteTarget, ...]) -> str:
    return json.dumps([_target_json(t) for t in targets], separators=(",", ":"))


def targets_from_json(text: str) -> tuple[RouteTarget, ...]:
    items: list[dict[str, Any]] = json.loads(text)
    return tuple(
        RouteTarget(
            provider=Provider(item["provider"]),
            upstream_model=str(item["upstream_model"]),
            priority=int(item["priority"]),
            weight=int(item["weight"]),
            node_urls=tuple(str(u) for u in item["node_urls"]),
            api_version=str(item.get("api_version", "")),
            deployment=str(item.get("deployment", "")),
            endpoints=tuple(str(e) for e in item.get("endpoints", ())),
        )
        for item in items
    )


def tenant_not_found(tenant: str) -> NotFound:
    return NotFound(f"tenant {tenant!r} not found")


def not_found(table: str, tenant: str, entity_id: str) -> NotFound:
    return NotFound(f"{KIND_NAMES[table]} {entity_id!r} not found in tenant {tenant!r}")


def already_exists(table: str, field: str, value: str, tenant: str | None = None) -> AlreadyExists:
    """E.g. ``provider key label 'main' already exists in tenant 'acme'``."""
    # Ids are unique store-wide, names only within their tenant.
    per_tenant = tenant is not None and table != "tenants" and field != "id"
    where = f" in tenant {tenant!r}" if per_tenant else ""
    return AlreadyExists(f"{KIND_NAMES[table]} {field} {value!r} already exists{where}")


def stale(table: str, tenant: str, entity_id: str, expected: int, current: int) -> Aborted:
    """A compare-and-set update found another revision than the caller read."""
    return Aborted(
        f"{KIND_NAMES[table]} {entity_id!r} in tenant {tenant!r} was changed since it was read "
        f"(revision {current}, the request expected {expected}); read it again and retry"
    )


def token_not_found(kind: TokenKind, token_id: str) -> NotFound:
    return NotFound(f"{kind.value} token {token_id!r} not found")


def token_stale(kind: TokenKind, token_id: str, expected: int, current: int) -> Aborted:
    return Aborted(
        f"{kind.value} token {token_id!r} was changed since it was read "
        f"(revision {current}, the request expected {expected}); read it again and retry"
    )
