"""The shared row codecs (``_rows``) with each store's encoding, and the
Postgres store's placeholder numbering: pure, no database."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from control_plane.store import _rows
from control_plane.store.postgres import PostgresStore, _numbered
from control_plane.store.sqlite import SqliteStore
from keyplane.domain import AccessToken, KeyStatus, TokenKind
from keyplane.errors import InvalidArgument
from tests.store import factories as f

ENCODINGS = pytest.mark.parametrize(
    "encoding", [SqliteStore._encoding, PostgresStore._encoding], ids=["sqlite", "postgres"]
)


def as_row(columns: str, values: tuple[Any, ...]) -> dict[str, Any]:
    """The row a database would return for an insert of ``values``."""
    names = columns.split(", ")
    assert len(names) == len(values)
    return dict(zip(names, values, strict=True))


def token(tenants: tuple[str, ...] | None, revoked_at: datetime | None) -> AccessToken:
    return AccessToken(
        id="tok_1",
        kind=TokenKind.SIDECAR,
        label="edge",
        prefix="kp_sc_1234",
        token_sha256=bytes(32),
        tenants=tenants,
        created_at=f.ts(0),
        revoked_at=revoked_at,
        revision=3,
    )


@ENCODINGS
@pytest.mark.parametrize(
    ("columns", "to_values", "from_row", "obj"),
    [
        (_rows.TENANT_COLUMNS, _rows.tenant_values, _rows.tenant, f.tenant()),
        (_rows.KEY_COLUMNS, _rows.provider_key_values, _rows.provider_key, f.provider_key()),
        (_rows.ROUTE_COLUMNS, _rows.route_values, _rows.route, f.route()),
        (_rows.CLIENT_KEY_COLUMNS, _rows.client_key_values, _rows.client_key, f.client_key()),
        (_rows.TOKEN_COLUMNS, _rows.token_values, _rows.token, token(("acme", "beta"), f.ts(5))),
        (_rows.TOKEN_COLUMNS, _rows.token_values, _rows.token, token(None, None)),
        (_rows.KEY_HEALTH_COLUMNS, _rows.key_health_values, _rows.key_health, f.key_health(until=f.ts(9))),
        (_rows.KEY_HEALTH_COLUMNS, _rows.key_health_values, _rows.key_health, f.key_health(until=None)),
        (_rows.PROVIDER_HEALTH_COLUMNS, _rows.provider_health_values, _rows.provider_health, f.provider_health()),
    ],
    ids=[
        "tenant",
        "provider_key",
        "route",
        "client_key",
        "token",
        "token_unscoped",
        "key_health",
        "key_health_open",
        "provider_health",
    ],
)
def test_values_are_in_column_order_and_read_back_as_written(
    encoding: _rows.Encoding,
    columns: str,
    to_values: Callable[[Any, _rows.Encoding], tuple[Any, ...]],
    from_row: Callable[[_rows.Row, _rows.Encoding], Any],
    obj: Any,
) -> None:
    assert from_row(as_row(columns, to_values(obj, encoding)), encoding) == obj


@ENCODINGS
def test_times_are_stored_in_utc_and_naive_ones_are_refused_by_field(encoding: _rows.Encoding) -> None:
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    stored = encoding.time(local, "created_at")
    assert encoding.time_from(stored) == local
    assert encoding.time_from(stored).utcoffset() == timedelta(0)
    assert _rows.opt_time(encoding, None, "until") is None
    assert _rows.opt_time_from(encoding, None) is None
    with pytest.raises(InvalidArgument, match="until"):
        _rows.key_health_values(f.key_health(until=datetime(2024, 5, 1)), encoding)


@ENCODINGS
def test_update_values_are_encoded_like_inserted_ones(encoding: _rows.Encoding) -> None:
    key = f.provider_key()
    inserted = as_row(_rows.KEY_COLUMNS, _rows.provider_key_values(key, encoding))
    for column, value in [
        ("status", key.status),
        ("allowed_models", key.allowed_models),
        ("updated_at", key.updated_at),
        ("label", key.label),
    ]:
        assert _rows.update_value(column, value, encoding) == inserted[column]
    route = f.route()
    assert _rows.update_value("targets", route.targets, encoding) == _rows.route_values(route, encoding)[3]
    assert _rows.update_value("status", KeyStatus.DISABLED, encoding) == "disabled"


def test_audit_event_rows_are_read_with_the_store_encoding() -> None:
    row = {
        "id": 7,
        "event_time": "2024-05-01T12:00:00.123456+00:00",
        "caller": "admin-token:bootstrap",
        "method": "CreateTenant",
        "tenant": "acme",
        "resource_kind": "tenant",
        "resource_id": "acme",
        "fields": '["name"]',
        "fingerprint": "",
        "result": "ok",
    }
    event = _rows.audit_event(row, SqliteStore._encoding)
    assert (event.id, event.entry.time, event.entry.fields) == (7, f.ts(0), ("name",))
    change = {"version": 3, "tenant": "acme", "kind": "tenant", "entity_id": "acme", "op": "put", "created_at": f.ts(0)}
    assert _rows.change(change, PostgresStore._encoding).created_at == f.ts(0)


@pytest.mark.parametrize(
    ("sql", "numbered"),
    [
        ("SELECT 1", "SELECT 1"),
        ("DELETE FROM t WHERE a = ?", "DELETE FROM t WHERE a = $1"),
        ("UPDATE t SET a = ?, b = ? WHERE id = ? LIMIT ?", "UPDATE t SET a = $1, b = $2 WHERE id = $3 LIMIT $4"),
        ("SELECT pg_advisory_xact_lock($1)", "SELECT pg_advisory_xact_lock($1)"),
    ],
)
def test_postgres_numbers_the_placeholders_in_order(sql: str, numbered: str) -> None:
    assert _numbered(sql) == numbered
