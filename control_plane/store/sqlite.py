"""The embedded store: one SQLite file (or ``:memory:``) through aiosqlite.

One connection serves the whole process. Every operation holds an
``asyncio.Lock`` for its duration, so a write transaction
(``BEGIN IMMEDIATE ... COMMIT``) never interleaves with another statement on
that connection and a reader never sees a half-done write. Other processes
opening the same file wait on SQLite's own lock (``busy_timeout``); WAL mode
lets them read meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from control_plane.store import _audit, _codec
from control_plane.store.base import (
    AuditEntry,
    AuditEvent,
    AuditQuery,
    ChangeListener,
    ProviderKeyUpdate,
    RouteUpdate,
    SecretRewrap,
    StoredSecret,
)
from control_plane.store.migrations import Migration, pending
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
    key_health_entity_id,
)
from keyplane.errors import AlreadyExists, Unavailable
from keyplane.home import ensure_private_file

__all__ = ["MIGRATIONS", "SqliteStore"]

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE tenants (
                name TEXT PRIMARY KEY,
                created_at TEXT NOT NULL
            )""",
            """CREATE TABLE provider_keys (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider TEXT NOT NULL,
                label TEXT NOT NULL,
                base_url TEXT NOT NULL,
                status TEXT NOT NULL,
                weight INTEGER NOT NULL,
                allowed_models TEXT NOT NULL,
                secret_ciphertext BLOB NOT NULL,
                fingerprint TEXT NOT NULL,
                last4 TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                UNIQUE (tenant, label)
            )""",
            "CREATE INDEX provider_keys_by_tenant ON provider_keys (tenant, created_at, id)",
            """CREATE TABLE routes (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                public_model TEXT NOT NULL,
                targets TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                UNIQUE (tenant, public_model)
            )""",
            "CREATE INDEX routes_by_tenant ON routes (tenant, created_at, id)",
            """CREATE TABLE client_keys (
                id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                label TEXT NOT NULL,
                prefix TEXT NOT NULL,
                token_sha256 BLOB NOT NULL,
                created_at TEXT NOT NULL,
                UNIQUE (tenant, label)
            )""",
            "CREATE INDEX client_keys_by_tenant ON client_keys (tenant, created_at, id)",
            "CREATE INDEX client_keys_by_token ON client_keys (token_sha256)",
            """CREATE TABLE changes (
                version INTEGER PRIMARY KEY AUTOINCREMENT,
                tenant TEXT NOT NULL,
                kind TEXT NOT NULL,
                entity_id TEXT NOT NULL,
                op TEXT NOT NULL,
                created_at TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "learnt key and provider health",
        (
            # Only non-healthy entries are stored; model '' is key-wide.
            """CREATE TABLE key_health (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                key_id TEXT NOT NULL REFERENCES provider_keys(id) ON DELETE CASCADE,
                model TEXT NOT NULL,
                state TEXT NOT NULL,
                until TEXT,
                reason TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (key_id, model)
            )""",
            "CREATE INDEX key_health_by_tenant ON key_health (tenant, key_id, model)",
            """CREATE TABLE provider_health (
                tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                state TEXT NOT NULL,
                until TEXT,
                reason TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (tenant, provider, model)
            )""",
        ),
    ),
    Migration(
        3,
        "revisions (etags) of mutable objects",
        (
            "ALTER TABLE tenants ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE provider_keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE routes ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE client_keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        ),
    ),
    Migration(
        4,
        "audit log of admin writes",
        (
            # No foreign keys: the record of a tenant outlives the tenant.
            """CREATE TABLE audit_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                event_time TEXT NOT NULL,
                caller TEXT NOT NULL CHECK (caller <> ''),
                method TEXT NOT NULL CHECK (method <> ''),
                tenant TEXT NOT NULL,
                resource_kind TEXT NOT NULL,
                resource_id TEXT NOT NULL,
                fields TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                result TEXT NOT NULL CHECK (result <> '')
            )""",
            "CREATE INDEX audit_events_by_time ON audit_events (event_time, id)",
            "CREATE INDEX audit_events_by_tenant ON audit_events (tenant, id)",
            "CREATE INDEX audit_events_by_resource ON audit_events (resource_id, id)",
            "CREATE INDEX audit_events_by_kind ON audit_events (resource_kind, id)",
        ),
    ),
    Migration(
        5,
        "admin and sidecar tokens managed through the API",
        (
            # Only the SHA-256 of a token; tenants: a JSON array, NULL for every tenant.
            """CREATE TABLE access_tokens (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                label TEXT NOT NULL,
                prefix TEXT NOT NULL,
                token_sha256 BLOB NOT NULL UNIQUE,
                tenants TEXT,
                created_at TEXT NOT NULL,
                revoked_at TEXT,
                revision INTEGER NOT NULL DEFAULT 1
            )""",
            "CREATE INDEX access_tokens_by_kind ON access_tokens (kind, created_at, id)",
        ),
    ),
)

_KEY_COLUMNS = (
    "id, tenant, provider, label, base_url, status, weight, allowed_models, "
    "secret_ciphertext, fingerprint, last4, created_at, updated_at, revision"
)
_ROUTE_COLUMNS = "id, tenant, public_model, targets, created_at, updated_at, revision"
_CLIENT_KEY_COLUMNS = "id, tenant, label, prefix, token_sha256, created_at, revision"
_TENANT_COLUMNS = "name, created_at, revision"
_TOKEN_COLUMNS = "id, kind, label, prefix, token_sha256, tenants, created_at, revoked_at, revision"
_KEY_HEALTH_COLUMNS = "tenant, key_id, model, state, until, reason, updated_at"
_PROVIDER_HEALTH_COLUMNS = "tenant, provider, model, state, until, reason, updated_at"
# An upsert that rewrites the row only when what it says changed (null-safe
# comparison), so RETURNING yields nothing for a repeated identical verdict.
_HEALTH_CHANGED = (
    "{t}.state IS NOT excluded.state OR {t}.until IS NOT excluded.until OR {t}.reason IS NOT excluded.reason"
)


def _ts(value: datetime, field: str) -> str:
    # Fixed width, so text order is time order.
    return _codec.utc(value, field).isoformat(timespec="microseconds")


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _models_to_json(models: tuple[str, ...]) -> str:
    return json.dumps(list(models))


def _models_from_json(text: str) -> tuple[str, ...]:
    return tuple(str(m) for m in json.loads(text))


def _key_from_row(row: sqlite3.Row) -> ProviderKey:
    return ProviderKey(
        id=row["id"],
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        label=row["label"],
        base_url=row["base_url"],
        status=KeyStatus(row["status"]),
        weight=row["weight"],
        allowed_models=_models_from_json(row["allowed_models"]),
        secret_ciphertext=bytes(row["secret_ciphertext"]),
        fingerprint=row["fingerprint"],
        last4=row["last4"],
        created_at=_parse_ts(row["created_at"]),
        updated_at=_parse_ts(row["updated_at"]),
        revision=row["revision"],
    )


def _route_from_row(row: sqlite3.Row) -> Route:
    return Route(
        id=row["id"],
        tenant=row["tenant"],
        public_model=row["public_model"],
        targets=_codec.targets_from_json(row["targets"]),
        created_at=_parse_ts(row["created_at"]),
        updated_at=_parse_ts(row["updated_at"]),
        revision=row["revision"],
    )


def _client_key_from_row(row: sqlite3.Row) -> ClientKey:
    return ClientKey(
        id=row["id"],
        tenant=row["tenant"],
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        created_at=_parse_ts(row["created_at"]),
        revision=row["revision"],
    )


def _token_from_row(row: sqlite3.Row) -> AccessToken:
    tenants = row["tenants"]
    return AccessToken(
        id=row["id"],
        kind=TokenKind(row["kind"]),
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        tenants=None if tenants is None else _models_from_json(tenants),
        created_at=_parse_ts(row["created_at"]),
        revoked_at=_parse_opt_ts(row["revoked_at"]),
        revision=row["revision"],
    )


def _tenant_from_row(row: sqlite3.Row) -> Tenant:
    return Tenant(name=row["name"], created_at=_parse_ts(row["created_at"]), revision=row["revision"])


def _column_value(column: str, value: Any) -> Any:
    """A domain value of an updatable column as SQLite stores it."""
    if column == "status":
        return value.value
    if column == "allowed_models":
        return _models_to_json(value)
    if column == "targets":
        return _codec.targets_to_json(value)
    if column == "updated_at":
        return _ts(value, "updated_at")
    return value


def _opt_ts(value: datetime | None, field: str) -> str | None:
    return None if value is None else _ts(value, field)


def _parse_opt_ts(text: str | None) -> datetime | None:
    return None if text is None else _parse_ts(text)


def _key_health_from_row(row: sqlite3.Row) -> KeyHealth:
    return KeyHealth(
        tenant=row["tenant"],
        key_id=row["key_id"],
        model=row["model"],
        state=HealthState(row["state"]),
        until=_parse_opt_ts(row["until"]),
        reason=row["reason"],
        updated_at=_parse_ts(row["updated_at"]),
    )


def _provider_health_from_row(row: sqlite3.Row) -> ProviderHealth:
    return ProviderHealth(
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        model=row["model"],
        state=HealthState(row["state"]),
        until=_parse_opt_ts(row["until"]),
        reason=row["reason"],
        updated_at=_parse_ts(row["updated_at"]),
    )


def _change_from_row(row: sqlite3.Row) -> ChangeRecord:
    return ChangeRecord(
        version=row["version"],
        tenant=row["tenant"],
        kind=EntityKind(row["kind"]),
        entity_id=row["entity_id"],
        op=ChangeOp(row["op"]),
        created_at=_parse_ts(row["created_at"]),
    )


def _conflict(exc: sqlite3.IntegrityError, table: str, tenant: str, values: dict[str, str]) -> Exception:
    """Translate a constraint failure of an insert/update on ``table``."""
    message = str(exc)
    if "FOREIGN KEY" in message:
        return _codec.tenant_not_found(tenant)
    prefix = "UNIQUE constraint failed: "
    if message.startswith(prefix):
        # "UNIQUE constraint failed: provider_keys.tenant, provider_keys.label" -> "label"
        field = message[len(prefix) :].split(",")[-1].strip().split(".")[-1]
        if field in values:
            return _codec.already_exists(table, field, values[field], tenant)
    return exc


def _prepare_file(path: Path) -> None:
    """The database file exists with mode 0600 before SQLite opens it, so the
    ``-wal`` and ``-shm`` files SQLite creates next to it get 0600 too (it
    copies the database file's mode); existing ones wider than that are
    tightened."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ensure_private_file(path)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            ensure_private_file(companion)


class SqliteStore:
    """``Store`` on SQLite. ``path`` is a file path or ``":memory:"``."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    # connection and transactions ------------------------------------------

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection, opening it on first use (caller holds the lock)."""
        if self._closed:
            raise Unavailable("sqlite store is closed")
        if self._conn is None:
            memory = self._path == ":memory:"
            if not memory:
                await asyncio.to_thread(_prepare_file, Path(self._path))
            conn = await aiosqlite.connect(self._path, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                await conn.execute("PRAGMA foreign_keys = ON")
                await conn.execute("PRAGMA busy_timeout = 5000")
                if not memory:
                    await conn.execute("PRAGMA journal_mode = WAL")
                    await conn.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection; database failures become Unavailable."""
        async with self._lock:
            try:
                yield await self._connection()
            except (sqlite3.OperationalError, OSError) as exc:
                raise Unavailable(f"sqlite store unavailable: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                if type(exc) is sqlite3.DatabaseError:  # corrupt file, not a database, ...
                    raise Unavailable(f"sqlite store unavailable: {exc}") from exc
                raise

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed on success, rolled back on any error."""
        async with self._session() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # Some failures (disk full, I/O error) already ended the transaction.
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    @staticmethod
    async def _fetchone(conn: aiosqlite.Connection, sql: str, params: Iterable[Any]) -> sqlite3.Row | None:
        async with conn.execute(sql, tuple(params)) as cursor:
            row: sqlite3.Row | None = await cursor.fetchone()
        return row

    @staticmethod
    async def _fetchall(conn: aiosqlite.Connection, sql: str, params: Iterable[Any]) -> list[sqlite3.Row]:
        async with conn.execute(sql, tuple(params)) as cursor:
            rows = await cursor.fetchall()
        return list(rows)

    @staticmethod
    async def _execute(conn: aiosqlite.Connection, sql: str, params: Iterable[Any]) -> int:
        """Run one statement and return the number of rows it changed."""
        async with conn.execute(sql, tuple(params)) as cursor:
            return int(cursor.rowcount)

    async def _log(
        self, conn: aiosqlite.Connection, tenant: str, kind: EntityKind, entity_id: str, op: ChangeOp
    ) -> int:
        """Append one change row; returns its version."""
        async with conn.execute(
            "INSERT INTO changes (tenant, kind, entity_id, op, created_at) VALUES (?, ?, ?, ?, ?)",
            (tenant, kind.value, entity_id, op.value, _ts(datetime.now(UTC), "created_at")),
        ) as cursor:
            version = cursor.lastrowid
        assert version is not None
        return version

    async def _audit(self, conn: aiosqlite.Connection, entry: AuditEntry | None) -> int | None:
        """Write the audit row of the write in progress (none when None); an
        error here fails the write: the transaction rolls back."""
        if entry is None:
            return None
        async with conn.execute(
            f"INSERT INTO audit_events ({_audit.INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            _audit.insert_values(entry, _ts(entry.time, "time")),
        ) as cursor:
            return cursor.lastrowid

    async def _require_tenant(self, conn: aiosqlite.Connection, tenant: str) -> None:
        if await self._fetchone(conn, "SELECT 1 FROM tenants WHERE name = ?", (tenant,)) is None:
            raise _codec.tenant_not_found(tenant)

    async def _list(self, table: str, columns: str, tenant: str) -> list[sqlite3.Row]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            return await self._fetchall(
                conn,
                f"SELECT {columns} FROM {table} WHERE tenant = ? ORDER BY created_at, id",  # noqa: S608
                (tenant,),
            )

    async def _get(self, table: str, columns: str, tenant: str, entity_id: str) -> sqlite3.Row:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {columns} FROM {table} WHERE tenant = ? AND id = ?",  # noqa: S608
                (tenant, entity_id),
            )
        if row is None:
            raise _codec.not_found(table, tenant, entity_id)
        return row

    async def _delete(
        self, table: str, kind: EntityKind, tenant: str, entity_id: str, audit: AuditEntry | None
    ) -> None:
        async with self._transaction() as conn:
            deleted = await self._execute(
                conn,
                f"DELETE FROM {table} WHERE tenant = ? AND id = ?",  # noqa: S608
                (tenant, entity_id),
            )
            if deleted == 0:
                raise _codec.not_found(table, tenant, entity_id)
            await self._audit(conn, audit)
            await self._log(conn, tenant, kind, entity_id, ChangeOp.DELETE)

    # lifecycle ---------------------------------------------------------------

    async def migrate(self) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            applied = [r["version"] for r in await self._fetchall(conn, "SELECT version FROM schema_migrations", ())]
            for migration in pending(MIGRATIONS, applied):
                for statement in migration.statements:
                    await conn.execute(statement)
                await self._execute(
                    conn,
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (migration.version, _ts(datetime.now(UTC), "applied_at")),
                )

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    # tenants -----------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> Tenant:
        tenant = replace(tenant, created_at=_codec.utc(tenant.created_at, "created_at"), revision=1)
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO tenants ({_TENANT_COLUMNS}) VALUES (?, ?, ?)",  # noqa: S608
                    (tenant.name, _ts(tenant.created_at, "created_at"), tenant.revision),
                )
            except sqlite3.IntegrityError as exc:
                raise _conflict(exc, "tenants", tenant.name, {"name": tenant.name}) from None
            await self._audit(conn, audit)
            await self._log(conn, tenant.name, EntityKind.TENANT, tenant.name, ChangeOp.PUT)
        return tenant

    async def get_tenant(self, name: str) -> Tenant:
        async with self._session() as conn:
            row = await self._fetchone(conn, f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = ?", (name,))  # noqa: S608
        if row is None:
            raise _codec.tenant_not_found(name)
        return _tenant_from_row(row)

    async def list_tenants(self) -> list[Tenant]:
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY created_at, name",  # noqa: S608
                (),
            )
        return [_tenant_from_row(r) for r in rows]

    async def delete_tenant(self, name: str, *, audit: AuditEntry | None = None) -> None:
        async with self._transaction() as conn:
            if await self._execute(conn, "DELETE FROM tenants WHERE name = ?", (name,)) == 0:
                raise _codec.tenant_not_found(name)
            await self._audit(conn, audit)
            await self._log(conn, name, EntityKind.TENANT, name, ChangeOp.DELETE)

    # provider keys -----------------------------------------------------------

    async def create_provider_key(self, key: ProviderKey, *, audit: AuditEntry | None = None) -> ProviderKey:
        key = replace(
            key,
            created_at=_codec.utc(key.created_at, "created_at"),
            updated_at=_codec.utc(key.updated_at, "updated_at"),
            revision=1,
        )
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO provider_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        key.id,
                        key.tenant,
                        key.provider.value,
                        key.label,
                        key.base_url,
                        key.status.value,
                        key.weight,
                        _models_to_json(key.allowed_models),
                        key.secret_ciphertext,
                        key.fingerprint,
                        key.last4,
                        _ts(key.created_at, "created_at"),
                        _ts(key.updated_at, "updated_at"),
                        key.revision,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise _conflict(exc, "provider_keys", key.tenant, {"id": key.id, "label": key.label}) from None
            await self._audit(conn, audit)
            await self._log(conn, key.tenant, EntityKind.PROVIDER_KEY, key.id, ChangeOp.PUT)
        return key

    async def get_provider_key(self, tenant: str, key_id: str) -> ProviderKey:
        return _key_from_row(await self._get("provider_keys", _KEY_COLUMNS, tenant, key_id))

    async def list_provider_keys(self, tenant: str) -> list[ProviderKey]:
        return [_key_from_row(r) for r in await self._list("provider_keys", _KEY_COLUMNS, tenant)]

    async def _update(
        self,
        table: str,
        columns: str,
        kind: EntityKind,
        tenant: str,
        entity_id: str,
        values: dict[str, Any],
        expected_revision: int | None,
        audit: AuditEntry | None,
    ) -> sqlite3.Row:
        """Write the named columns and ``revision + 1`` in one statement,
        conditional on ``expected_revision`` when given; log the change."""
        unknown = set(values) - _codec.SET_COLUMNS[table]
        if unknown:
            raise ValueError(f"{table}: cannot update {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        condition = "" if expected_revision is None else " AND revision = ?"
        params = [_column_value(name, value) for name, value in values.items()] + [tenant, entity_id]
        if expected_revision is not None:
            params.append(expected_revision)
        async with self._transaction() as conn:
            try:
                row = await self._fetchone(
                    conn,
                    f"UPDATE {table} SET {assignments}, revision = revision + 1 "  # noqa: S608
                    f"WHERE tenant = ? AND id = ?{condition} RETURNING {columns}",
                    params,
                )
            except sqlite3.IntegrityError as exc:
                unique = {k: str(v) for k, v in values.items() if k in ("label", "public_model")}
                raise _conflict(exc, table, tenant, unique) from None
            if row is None:
                current = await self._fetchone(
                    conn,
                    f"SELECT revision FROM {table} WHERE tenant = ? AND id = ?",  # noqa: S608
                    (tenant, entity_id),
                )
                if current is None or expected_revision is None:
                    raise _codec.not_found(table, tenant, entity_id)
                raise _codec.stale(table, tenant, entity_id, expected_revision, current["revision"])
            await self._audit(conn, audit)
            await self._log(conn, tenant, kind, entity_id, ChangeOp.PUT)
        return row

    async def update_provider_key(
        self,
        tenant: str,
        key_id: str,
        update: ProviderKeyUpdate,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> ProviderKey:
        row = await self._update(
            "provider_keys",
            _KEY_COLUMNS,
            EntityKind.PROVIDER_KEY,
            tenant,
            key_id,
            update.columns(),
            expected_revision,
            audit,
        )
        return _key_from_row(row)

    async def delete_provider_key(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> None:
        await self._delete("provider_keys", EntityKind.PROVIDER_KEY, tenant, key_id, audit)

    # routes ------------------------------------------------------------------

    async def create_route(self, route: Route, *, audit: AuditEntry | None = None) -> Route:
        route = replace(
            route,
            created_at=_codec.utc(route.created_at, "created_at"),
            updated_at=_codec.utc(route.updated_at, "updated_at"),
            revision=1,
        )
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO routes ({_ROUTE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        route.id,
                        route.tenant,
                        route.public_model,
                        _codec.targets_to_json(route.targets),
                        _ts(route.created_at, "created_at"),
                        _ts(route.updated_at, "updated_at"),
                        route.revision,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                values = {"id": route.id, "public_model": route.public_model}
                raise _conflict(exc, "routes", route.tenant, values) from None
            await self._audit(conn, audit)
            await self._log(conn, route.tenant, EntityKind.ROUTE, route.id, ChangeOp.PUT)
        return route

    async def get_route(self, tenant: str, route_id: str) -> Route:
        return _route_from_row(await self._get("routes", _ROUTE_COLUMNS, tenant, route_id))

    async def list_routes(self, tenant: str) -> list[Route]:
        return [_route_from_row(r) for r in await self._list("routes", _ROUTE_COLUMNS, tenant)]

    async def update_route(
        self,
        tenant: str,
        route_id: str,
        update: RouteUpdate,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> Route:
        row = await self._update(
            "routes", _ROUTE_COLUMNS, EntityKind.ROUTE, tenant, route_id, update.columns(), expected_revision, audit
        )
        return _route_from_row(row)

    async def delete_route(self, tenant: str, route_id: str, *, audit: AuditEntry | None = None) -> None:
        await self._delete("routes", EntityKind.ROUTE, tenant, route_id, audit)

    # client keys -------------------------------------------------------------

    async def create_client_key(self, client_key: ClientKey, *, audit: AuditEntry | None = None) -> ClientKey:
        client_key = replace(client_key, created_at=_codec.utc(client_key.created_at, "created_at"), revision=1)
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO client_keys ({_CLIENT_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        client_key.id,
                        client_key.tenant,
                        client_key.label,
                        client_key.prefix,
                        client_key.token_sha256,
                        _ts(client_key.created_at, "created_at"),
                        client_key.revision,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                values = {"id": client_key.id, "label": client_key.label}
                raise _conflict(exc, "client_keys", client_key.tenant, values) from None
            await self._audit(conn, audit)
            await self._log(conn, client_key.tenant, EntityKind.CLIENT_KEY, client_key.id, ChangeOp.PUT)
        return client_key

    async def get_client_key(self, tenant: str, client_key_id: str) -> ClientKey:
        return _client_key_from_row(await self._get("client_keys", _CLIENT_KEY_COLUMNS, tenant, client_key_id))

    async def list_client_keys(self, tenant: str) -> list[ClientKey]:
        return [_client_key_from_row(r) for r in await self._list("client_keys", _CLIENT_KEY_COLUMNS, tenant)]

    async def delete_client_key(self, tenant: str, client_key_id: str, *, audit: AuditEntry | None = None) -> None:
        await self._delete("client_keys", EntityKind.CLIENT_KEY, tenant, client_key_id, audit)

    # learnt health -----------------------------------------------------------

    async def _require_key(self, conn: aiosqlite.Connection, tenant: str, key_id: str) -> None:
        row = await self._fetchone(conn, "SELECT 1 FROM provider_keys WHERE tenant = ? AND id = ?", (tenant, key_id))
        if row is None:
            await self._require_tenant(conn, tenant)
            raise _codec.not_found("provider_keys", tenant, key_id)

    async def put_key_health(self, health: KeyHealth) -> int | None:
        until = _opt_ts(health.until, "until")
        updated_at = _ts(health.updated_at, "updated_at")
        async with self._transaction() as conn:
            await self._require_key(conn, health.tenant, health.key_id)
            if health.state is HealthState.HEALTHY:
                changed = await self._execute(
                    conn,
                    "DELETE FROM key_health WHERE key_id = ? AND model = ?",
                    (health.key_id, health.model),
                )
                op = ChangeOp.DELETE
            else:
                row = await self._fetchone(
                    conn,
                    f"INSERT INTO key_health ({_KEY_HEALTH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                    "ON CONFLICT (key_id, model) DO UPDATE SET state = excluded.state, until = excluded.until, "
                    "reason = excluded.reason, updated_at = excluded.updated_at "
                    f"WHERE {_HEALTH_CHANGED.format(t='key_health')} RETURNING 1",
                    (
                        health.tenant,
                        health.key_id,
                        health.model,
                        health.state.value,
                        until,
                        health.reason,
                        updated_at,
                    ),
                )
                changed = 0 if row is None else 1
                op = ChangeOp.PUT
            if changed == 0:
                return None
            return await self._log(conn, health.tenant, EntityKind.KEY_HEALTH, health.entity_id, op)

    async def get_key_health(self, tenant: str, key_id: str, model: str) -> KeyHealth | None:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {_KEY_HEALTH_COLUMNS} FROM key_health WHERE tenant = ? AND key_id = ? AND model = ?",  # noqa: S608
                (tenant, key_id, model),
            )
        return None if row is None else _key_health_from_row(row)

    async def list_key_health(self, tenant: str) -> list[KeyHealth]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                f"SELECT {_KEY_HEALTH_COLUMNS} FROM key_health WHERE tenant = ? ORDER BY key_id, model",  # noqa: S608
                (tenant,),
            )
        return [_key_health_from_row(r) for r in rows]

    async def clear_key_health(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> list[int]:
        async with self._transaction() as conn:
            await self._require_key(conn, tenant, key_id)
            rows = await self._fetchall(
                conn, "DELETE FROM key_health WHERE tenant = ? AND key_id = ? RETURNING model", (tenant, key_id)
            )
            await self._audit(conn, audit)
            return [
                await self._log(
                    conn, tenant, EntityKind.KEY_HEALTH, key_health_entity_id(key_id, model), ChangeOp.DELETE
                )
                # The key-wide entry ("") always: a reset must reach the sidecars.
                for model in sorted({"", *(r["model"] for r in rows)})
            ]

    async def put_provider_health(self, health: ProviderHealth) -> int | None:
        until = _opt_ts(health.until, "until")
        updated_at = _ts(health.updated_at, "updated_at")
        async with self._transaction() as conn:
            await self._require_tenant(conn, health.tenant)
            if health.state is HealthState.HEALTHY:
                changed = await self._execute(
                    conn,
                    "DELETE FROM provider_health WHERE tenant = ? AND provider = ? AND model = ?",
                    (health.tenant, health.provider.value, health.model),
                )
                op = ChangeOp.DELETE
            else:
                row = await self._fetchone(
                    conn,
                    f"INSERT INTO provider_health ({_PROVIDER_HEALTH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                    "ON CONFLICT (tenant, provider, model) DO UPDATE SET state = excluded.state, "
                    "until = excluded.until, reason = excluded.reason, updated_at = excluded.updated_at "
                    f"WHERE {_HEALTH_CHANGED.format(t='provider_health')} RETURNING 1",
                    (
                        health.tenant,
                        health.provider.value,
                        health.model,
                        health.state.value,
                        until,
                        health.reason,
                        updated_at,
                    ),
                )
                changed = 0 if row is None else 1
                op = ChangeOp.PUT
            if changed == 0:
                return None
            return await self._log(conn, health.tenant, EntityKind.PROVIDER_HEALTH, health.entity_id, op)

    async def get_provider_health(self, tenant: str, provider: Provider, model: str) -> ProviderHealth | None:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {_PROVIDER_HEALTH_COLUMNS} FROM provider_health "  # noqa: S608
                "WHERE tenant = ? AND provider = ? AND model = ?",
                (tenant, provider.value, model),
            )
        return None if row is None else _provider_health_from_row(row)

    async def list_provider_health(self, tenant: str) -> list[ProviderHealth]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                f"SELECT {_PROVIDER_HEALTH_COLUMNS} FROM provider_health "  # noqa: S608
                "WHERE tenant = ? ORDER BY provider, model",
                (tenant,),
            )
        return [_provider_health_from_row(r) for r in rows]

    # API tokens --------------------------------------------------------------

    async def create_token(self, token: AccessToken, *, audit: AuditEntry | None = None) -> AccessToken:
        token = replace(token, created_at=_codec.utc(token.created_at, "created_at"), revision=1)
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO access_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (
                        token.id,
                        token.kind.value,
                        token.label,
                        token.prefix,
                        token.token_sha256,
                        None if token.tenants is None else _models_to_json(token.tenants),
                        _ts(token.created_at, "created_at"),
                        _opt_ts(token.revoked_at, "revoked_at"),
                        token.revision,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"{token.kind.value} token {token.id!r} already exists") from None
            await self._audit(conn, audit)
            await self._log(conn, "", token.kind.entity_kind, token.id, ChangeOp.PUT)
        return token

    async def get_token(self, kind: TokenKind, token_id: str) -> AccessToken:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = ? AND id = ?",  # noqa: S608
                (kind.value, token_id),
            )
        if row is None:
            raise _codec.token_not_found(kind, token_id)
        return _token_from_row(row)

    async def list_tokens(self, kind: TokenKind) -> list[AccessToken]:
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = ? ORDER BY created_at, id",  # noqa: S608
                (kind.value,),
            )
        return [_token_from_row(r) for r in rows]

    async def revoke_token(
        self,
        kind: TokenKind,
        token_id: str,
        revoked_at: datetime,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> AccessToken:
        condition = "" if expected_revision is None else " AND revision = ?"
        params: list[Any] = [_ts(revoked_at, "revoked_at"), kind.value, token_id]
        if expected_revision is not None:
            params.append(expected_revision)
        async with self._transaction() as conn:
            row = await self._fetchone(
                conn,
                "UPDATE access_tokens SET revoked_at = ?, revision = revision + 1 "  # noqa: S608
                f"WHERE kind = ? AND id = ? AND revoked_at IS NULL{condition} RETURNING {_TOKEN_COLUMNS}",
                params,
            )
            if row is not None:
                await self._audit(conn, audit)
                await self._log(conn, "", kind.entity_kind, token_id, ChangeOp.PUT)
                return _token_from_row(row)
            current = await self._fetchone(
                conn,
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = ? AND id = ?",  # noqa: S608
                (kind.value, token_id),
            )
            if current is None:
                raise _codec.token_not_found(kind, token_id)
            if expected_revision is not None and current["revision"] != expected_revision:
                raise _codec.token_stale(kind, token_id, expected_revision, current["revision"])
            await self._audit(conn, audit)  # already revoked: nothing else to do
        return _token_from_row(current)

    # change log --------------------------------------------------------------

    async def latest_version(self) -> int:
        async with self._session() as conn:
            row = await self._fetchone(conn, "SELECT COALESCE(MAX(version), 0) AS v FROM changes", ())
        return int(row["v"]) if row is not None else 0

    async def changes_since(self, version: int, limit: int = 1000) -> list[ChangeRecord]:
        if limit <= 0:
            return []
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                "SELECT version, tenant, kind, entity_id, op, created_at FROM changes "
                "WHERE version > ? ORDER BY version LIMIT ?",
                (version, limit),
            )
        return [_change_from_row(r) for r in rows]

    async def listen_changes(self, listener: ChangeListener) -> None:
        """Nothing to do: this process is the only writer of an embedded store."""

    # audit log ---------------------------------------------------------------

    async def append_audit(self, entry: AuditEntry) -> int:
        async with self._transaction() as conn:
            audit_id = await self._audit(conn, entry)
        assert audit_id is not None
        return audit_id

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        params: list[Any] = []

        def param(value: Any) -> str:
            params.append(value)
            return "?"

        where = _audit.where(query, param, _ts)
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_audit.COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT ?",  # noqa: S608
                [*params, max(query.limit, 0)],
            )
        return [
            AuditEvent(
                id=r["id"],
                entry=AuditEntry(
                    time=_parse_ts(r["event_time"]),
                    caller=r["caller"],
                    method=r["method"],
                    tenant=r["tenant"],
                    resource_kind=r["resource_kind"],
                    resource_id=r["resource_id"],
                    fields=_audit.fields_from_json(r["fields"]),
                    fingerprint=r["fingerprint"],
                    result=r["result"],
                ),
            )
            for r in rows
        ]

    # master-key rewrapping ---------------------------------------------------

    async def list_sealed_secrets(self, after: str = "", limit: int = 100) -> list[StoredSecret]:
        if limit <= 0:
            return []
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                "SELECT tenant, id, secret_ciphertext FROM provider_keys WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
        return [StoredSecret(r["tenant"], r["id"], bytes(r["secret_ciphertext"])) for r in rows]

    async def rewrap_secrets(self, rewraps: Sequence[SecretRewrap], audit: AuditEntry | None = None) -> list[str]:
        if not rewraps:
            return []
        done: list[str] = []
        async with self._transaction() as conn:
            for rewrap in rewraps:
                changed = await self._execute(
                    conn,
                    "UPDATE provider_keys SET secret_ciphertext = ? "
                    "WHERE tenant = ? AND id = ? AND secret_ciphertext = ?",
                    (rewrap.new_ciphertext, rewrap.tenant, rewrap.key_id, rewrap.old_ciphertext),
                )
                if changed:
                    done.append(rewrap.key_id)
            if done:
                await self._audit(conn, audit)
        return done
