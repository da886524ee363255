"""Rows both stores read and write: the column lists of each table and the
conversions between a domain object and its row.

Both drivers hand back mapping-like rows (``asyncpg.Record``,
``sqlite3.Row``), so one function per table reads them. What the two
databases store differently (a timestamp: ``timestamptz`` or ISO text; a list
of strings: ``text[]`` or a JSON array) goes through the store's
:class:`Encoding`. Pure functions, no I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from control_plane.store import _audit, _codec
from control_plane.store.base import AuditEntry, AuditEvent
from keyplane.domain import (
    AccessToken,
    ChangeOp,
    ChangeRecord,
    ClientKey,
    EntityKind,
    HealthState,
    KeyHealth,
    KeyStatus,
    Provider,
    ProviderHealth,
    ProviderKey,
    Route,
    Tenant,
    TokenKind,
)

__all__ = [
    "CHANGE_COLUMNS",
    "CLIENT_KEY_COLUMNS",
    "KEY_COLUMNS",
    "KEY_HEALTH_COLUMNS",
    "PROVIDER_HEALTH_COLUMNS",
    "ROUTE_COLUMNS",
    "TENANT_COLUMNS",
    "TOKEN_COLUMNS",
    "Encoding",
    "Row",
    "audit_event",
    "change",
    "client_key",
    "client_key_values",
    "key_health",
    "key_health_values",
    "opt_time",
    "opt_time_from",
    "provider_health",
    "provider_health_values",
    "provider_key",
    "provider_key_values",
    "route",
    "route_values",
    "tenant",
    "tenant_values",
    "token",
    "token_values",
    "update_value",
]

KEY_COLUMNS = (
    "id, tenant, provider, label, base_url, status, weight, allowed_models, "
    "secret_ciphertext, fingerprint, last4, created_at, updated_at, revision"
)
ROUTE_COLUMNS = "id, tenant, public_model, targets, created_at, updated_at, revision"
CLIENT_KEY_COLUMNS = "id, tenant, label, prefix, token_sha256, created_at, revision"
TENANT_COLUMNS = "name, created_at, revision"
TOKEN_COLUMNS = "id, kind, label, prefix, token_sha256, tenants, created_at, revoked_at, revision"
KEY_HEALTH_COLUMNS = "tenant, key_id, model, state, until, reason, updated_at"
PROVIDER_HEALTH_COLUMNS = "tenant, provider, model, state, until, reason, updated_at"
CHANGE_COLUMNS = "version, tenant, kind, entity_id, op, created_at"


class Row(Protocol):
    """A row as either driver returns it: values by column name."""

    def __getitem__(self, column: str, /) -> Any: ...


class Encoding(Protocol):
    """How one store's database holds the values that differ between them."""

    def time(self, value: datetime, field: str) -> Any:
        """A timezone-aware ``value`` as stored (InvalidArgument naming
        ``field`` for a naive one)."""

    def time_from(self, stored: Any) -> datetime: ...

    def strings(self, values: tuple[str, ...]) -> Any:
        """A list of strings (allowed models, token tenants) as stored."""

    def strings_from(self, stored: Any) -> tuple[str, ...]: ...


def opt_time(encoding: Encoding, value: datetime | None, field: str) -> Any:
    return None if value is None else encoding.time(value, field)


def opt_time_from(encoding: Encoding, stored: Any) -> datetime | None:
    return None if stored is None else encoding.time_from(stored)


# domain object -> row values ------------------------------------------------


def tenant_values(t: Tenant, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``TENANT_COLUMNS``."""
    return (t.name, encoding.time(t.created_at, "created_at"), t.revision)


def provider_key_values(key: ProviderKey, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``KEY_COLUMNS``."""
    return (
        key.id,
        key.tenant,
        key.provider.value,
        key.label,
        key.base_url,
        key.status.value,
        key.weight,
        encoding.strings(key.allowed_models),
        key.secret_ciphertext,
        key.fingerprint,
        key.last4,
        encoding.time(key.created_at, "created_at"),
        encoding.time(key.updated_at, "updated_at"),
        key.revision,
    )


def route_values(r: Route, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``ROUTE_COLUMNS``."""
    return (
        r.id,
        r.tenant,
        r.public_model,
        _codec.targets_to_json(r.targets),
        encoding.time(r.created_at, "created_at"),
        encoding.time(r.updated_at, "updated_at"),
        r.revision,
    )


def client_key_values(key: ClientKey, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``CLIENT_KEY_COLUMNS``."""
    return (
        key.id,
        key.tenant,
        key.label,
        key.prefix,
        key.token_sha256,
        encoding.time(key.created_at, "created_at"),
        key.revision,
    )


def token_values(t: AccessToken, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``TOKEN_COLUMNS``."""
    return (
        t.id,
        t.kind.value,
        t.label,
        t.prefix,
        t.token_sha256,
        None if t.tenants is None else encoding.strings(t.tenants),
        encoding.time(t.created_at, "created_at"),
        opt_time(encoding, t.revoked_at, "revoked_at"),
        t.revision,
    )


def key_health_values(health: KeyHealth, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``KEY_HEALTH_COLUMNS``."""
    return (
        health.tenant,
        health.key_id,
        health.model,
        health.state.value,
        opt_time(encoding, health.until, "until"),
        health.reason,
        encoding.time(health.updated_at, "updated_at"),
    )


def provider_health_values(health: ProviderHealth, encoding: Encoding) -> tuple[Any, ...]:
    """The values of ``PROVIDER_HEALTH_COLUMNS``."""
    return (
        health.tenant,
        health.provider.value,
        health.model,
        health.state.value,
        opt_time(encoding, health.until, "until"),
        health.reason,
        encoding.time(health.updated_at, "updated_at"),
    )


def update_value(column: str, value: Any, encoding: Encoding) -> Any:
    """A domain value of an updatable column (``_codec.SET_COLUMNS``) as stored."""
    if column == "status":
        return value.value
    if column == "allowed_models":
        return encoding.strings(value)
    if column == "targets":
        return _codec.targets_to_json(value)
    if column == "updated_at":
        return encoding.time(value, "updated_at")
    return value


# row -> domain object -------------------------------------------------------


def tenant(row: Row, encoding: Encoding) -> Tenant:
    return Tenant(name=row["name"], created_at=encoding.time_from(row["created_at"]), revision=row["revision"])


def provider_key(row: Row, encoding: Encoding) -> ProviderKey:
    return ProviderKey(
        id=row["id"],
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        label=row["label"],
        base_url=row["base_url"],
        status=KeyStatus(row["status"]),
        weight=row["weight"],
        allowed_models=encoding.strings_from(row["allowed_models"]),
        secret_ciphertext=bytes(row["secret_ciphertext"]),
        fingerprint=row["fingerprint"],
        last4=row["last4"],
        created_at=encoding.time_from(row["created_at"]),
        updated_at=encoding.time_from(row["updated_at"]),
        revision=row["revision"],
    )


def route(row: Row, encoding: Encoding) -> Route:
    return Route(
        id=row["id"],
        tenant=row["tenant"],
        public_model=row["public_model"],
        targets=_codec.targets_from_json(row["targets"]),
        created_at=encoding.time_from(row["created_at"]),
        updated_at=encoding.time_from(row["updated_at"]),
        revision=row["revision"],
    )


def client_key(row: Row, encoding: Encoding) -> ClientKey:
    return ClientKey(
        id=row["id"],
        tenant=row["tenant"],
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        created_at=encoding.time_from(row["created_at"]),
        revision=row["revision"],
    )


def token(row: Row, encoding: Encoding) -> AccessToken:
    tenants = row["tenants"]
    return AccessToken(
        id=row["id"],
        kind=TokenKind(row["kind"]),
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        tenants=None if tenants is None else encoding.strings_from(tenants),
        created_at=encoding.time_from(row["created_at"]),
        revoked_at=opt_time_from(encoding, row["revoked_at"]),
        revision=row["revision"],
    )


def key_health(row: Row, encoding: Encoding) -> KeyHealth:
    return KeyHealth(
        tenant=row["tenant"],
        key_id=row["key_id"],
        model=row["model"],
        state=HealthState(row["state"]),
        until=opt_time_from(encoding, row["until"]),
        reason=row["reason"],
        updated_at=encoding.time_from(row["updated_at"]),
    )


def provider_health(row: Row, encoding: Encoding) -> ProviderHealth:
    return ProviderHealth(
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        model=row["model"],
        state=HealthState(row["state"]),
        until=opt_time_from(encoding, row["until"]),
        reason=row["reason"],
        updated_at=encoding.time_from(row["updated_at"]),
    )


def change(row: Row, encoding: Encoding) -> ChangeRecord:
    return ChangeRecord(
        version=row["version"],
        tenant=row["tenant"],
        kind=EntityKind(row["kind"]),
        entity_id=row["entity_id"],
        op=ChangeOp(row["op"]),
        created_at=encoding.time_from(row["created_at"]),
    )


def audit_event(row: Row, encoding: Encoding) -> AuditEvent:
    """A row of ``_audit.COLUMNS``."""
    return AuditEvent(
        id=int(row["id"]),
        entry=AuditEntry(
            time=encoding.time_from(row["event_time"]),
            caller=row["caller"],
            method=row["method"],
            tenant=row["tenant"],
            resource_kind=row["resource_kind"],
            resource_id=row["resource_id"],
            fields=_audit.fields_from_json(row["fields"]),
            fingerprint=row["fingerprint"],
            result=row["result"],
        ),
    )
