"""The production store: Postgres through an asyncpg pool, safe for replicas.

All tables live in one schema (``keyplane`` unless told otherwise). Every
write is one transaction that changes the entity row(s), appends one
``changes`` row and calls ``pg_notify('keyplane_changes', '<version>')``,
which Postgres delivers on commit. Before taking its version the transaction
takes a transaction-scoped advisory lock (the last thing it does before
committing), so versions become visible in commit order and a reader of
``changes_since`` never skips a version that commits late.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg

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

__all__ = ["CHANNEL", "DEFAULT_COMMAND_TIMEOUT", "MIGRATIONS", "MIGRATION_TIMEOUT", "PostgresStore"]

log = logging.getLogger(__name__)

CHANNEL = "keyplane_changes"
# Seconds one statement, or the wait for a pooled connection, may take before
# the call fails with ``Unavailable`` (a stalled or locked database must not
# hang admin calls). A store call is a handful of statements, so it is bounded
# by a small multiple of this.
DEFAULT_COMMAND_TIMEOUT = 5.0
# Each statement of ``migrate()`` (schema changes, waiting for another replica's).
MIGRATION_TIMEOUT = 600.0

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE tenants (
                name text CONSTRAINT tenants_pkey PRIMARY KEY,
                created_at timestamptz NOT NULL
            )""",
            """CREATE TABLE provider_keys (
                id text CONSTRAINT provider_keys_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                provider text NOT NULL,
                label text NOT NULL,
                base_url text NOT NULL,
                status text NOT NULL,
                weight integer NOT NULL,
                allowed_models text[] NOT NULL,
                secret_ciphertext bytea NOT NULL,
                fingerprint text NOT NULL,
                last4 text NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT provider_keys_tenant_label_key UNIQUE (tenant, label)
            )""",
            "CREATE INDEX provider_keys_by_tenant ON provider_keys (tenant, created_at, id)",
            """CREATE TABLE routes (
                id text CONSTRAINT routes_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                public_model text NOT NULL,
                targets jsonb NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT routes_tenant_public_model_key UNIQUE (tenant, public_model)
            )""",
            "CREATE INDEX routes_by_tenant ON routes (tenant, created_at, id)",
            """CREATE TABLE client_keys (
                id text CONSTRAINT client_keys_pkey PRIMARY KEY,
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                label text NOT NULL,
                prefix text NOT NULL,
                token_sha256 bytea NOT NULL,
                created_at timestamptz NOT NULL,
                CONSTRAINT client_keys_tenant_label_key UNIQUE (tenant, label)
            )""",
            "CREATE INDEX client_keys_by_tenant ON client_keys (tenant, created_at, id)",
            "CREATE INDEX client_keys_by_token ON client_keys (token_sha256)",
            """CREATE TABLE changes (
                version bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                tenant text NOT NULL,
                kind text NOT NULL,
                entity_id text NOT NULL,
                op text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )""",
        ),
    ),
    Migration(
        2,
        "learnt key and provider health",
        (
            # Only non-healthy entries are stored; model '' is key-wide.
            """CREATE TABLE key_health (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                key_id text NOT NULL REFERENCES provider_keys (id) ON DELETE CASCADE,
                model text NOT NULL,
                state text NOT NULL,
                until timestamptz,
                reason text NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT key_health_pkey PRIMARY KEY (key_id, model)
            )""",
            "CREATE INDEX key_health_by_tenant ON key_health (tenant, key_id, model)",
            """CREATE TABLE provider_health (
                tenant text NOT NULL REFERENCES tenants (name) ON DELETE CASCADE,
                provider text NOT NULL,
                model text NOT NULL,
                state text NOT NULL,
                until timestamptz,
                reason text NOT NULL,
                updated_at timestamptz NOT NULL,
                CONSTRAINT provider_health_pkey PRIMARY KEY (tenant, provider, model)
            )""",
        ),
    ),
    Migration(
        3,
        "revisions (etags) of mutable objects",
        (
            "ALTER TABLE tenants ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE provider_keys ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE routes ADD COLUMN revision bigint NOT NULL DEFAULT 1",
            "ALTER TABLE client_keys ADD COLUMN revision bigint NOT NULL DEFAULT 1",
        ),
    ),
    Migration(
        4,
        "audit log of admin writes",
        (
            # No foreign keys: the record of a tenant outlives the tenant.
            """CREATE TABLE audit_events (
                id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT audit_events_pkey PRIMARY KEY,
                event_time timestamptz NOT NULL,
                caller text NOT NULL CONSTRAINT audit_events_caller_check CHECK (caller <> ''),
                method text NOT NULL CONSTRAINT audit_events_method_check CHECK (method <> ''),
                tenant text NOT NULL,
                resource_kind text NOT NULL,
                resource_id text NOT NULL,
                fields jsonb NOT NULL,
                fingerprint text NOT NULL,
                result text NOT NULL CONSTRAINT audit_events_result_check CHECK (result <> '')
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
            # Only the SHA-256 of a token; tenants NULL: every tenant.
            """CREATE TABLE access_tokens (
                id text CONSTRAINT access_tokens_pkey PRIMARY KEY,
                kind text NOT NULL,
                label text NOT NULL,
                prefix text NOT NULL,
                token_sha256 bytea NOT NULL CONSTRAINT access_tokens_token_sha256_key UNIQUE,
                tenants text[],
                created_at timestamptz NOT NULL,
                revoked_at timestamptz,
                revision bigint NOT NULL DEFAULT 1
            )""",
            "CREATE INDEX access_tokens_by_kind ON access_tokens (kind, created_at, id)",
        ),
    ),
)

# constraint name -> (table, field named in the AlreadyExists message)
_UNIQUE_CONSTRAINTS = {
    "tenants_pkey": ("tenants", "name"),
    "provider_keys_pkey": ("provider_keys", "id"),
    "provider_keys_tenant_label_key": ("provider_keys", "label"),
    "routes_pkey": ("routes", "id"),
    "routes_tenant_public_model_key": ("routes", "public_model"),
    "client_keys_pkey": ("client_keys", "id"),
    "client_keys_tenant_label_key": ("client_keys", "label"),
}

# Failures that mean "the database cannot be reached or used right now".
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes TimeoutError and ConnectionRefusedError
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # closed pool, lost connection
    # A backend killed between two calls can leave asyncpg's protocol in a
    # state it reports as an internal error ("cannot switch to state ...").
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

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
# An upsert rewrites the row only when what it says changed, so RETURNING
# yields nothing for a repeated identical verdict.
_HEALTH_CHANGED = (
    "({t}.state, {t}.until, {t}.reason) IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.until, EXCLUDED.reason)"
)


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _dsn_secrets_and_target(dsn: str) -> tuple[list[str], str]:
    """Passwords inside ``dsn`` (to scrub from messages) and a printable host/db."""
    try:
        parts = urlsplit(dsn)
        secrets = [parts.password] if parts.password else []
        secrets += [v for k, v in parse_qsl(parts.query) if k == "password" and v]
        host = parts.netloc.rsplit("@", 1)[-1] or "localhost"
        return secrets, f"{host}{parts.path}"
    except ValueError:
        return [], "<unparsable dsn>"


def _key_from_row(row: asyncpg.Record) -> ProviderKey:
    return ProviderKey(
        id=row["id"],
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        label=row["label"],
        base_url=row["base_url"],
        status=KeyStatus(row["status"]),
        weight=row["weight"],
        allowed_models=tuple(row["allowed_models"]),
        secret_ciphertext=bytes(row["secret_ciphertext"]),
        fingerprint=row["fingerprint"],
        last4=row["last4"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
    )


def _route_from_row(row: asyncpg.Record) -> Route:
    return Route(
        id=row["id"],
        tenant=row["tenant"],
        public_model=row["public_model"],
        targets=_codec.targets_from_json(row["targets"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        revision=row["revision"],
    )


def _client_key_from_row(row: asyncpg.Record) -> ClientKey:
    return ClientKey(
        id=row["id"],
        tenant=row["tenant"],
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        created_at=row["created_at"],
        revision=row["revision"],
    )


def _token_from_row(row: asyncpg.Record) -> AccessToken:
    tenants = row["tenants"]
    return AccessToken(
        id=row["id"],
        kind=TokenKind(row["kind"]),
        label=row["label"],
        prefix=row["prefix"],
        token_sha256=bytes(row["token_sha256"]),
        tenants=None if tenants is None else tuple(tenants),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        revision=row["revision"],
    )


def _tenant_from_row(row: asyncpg.Record) -> Tenant:
    return Tenant(name=row["name"], created_at=row["created_at"], revision=row["revision"])


def _column_value(column: str, value: Any) -> Any:
    """A domain value of an updatable column as asyncpg takes it."""
    if column == "status":
        return value.value
    if column == "allowed_models":
        return list(value)
    if column == "targets":
        return _codec.targets_to_json(value)
    if column == "updated_at":
        return _codec.utc(value, "updated_at")
    return value


def _key_health_from_row(row: asyncpg.Record) -> KeyHealth:
    return KeyHealth(
        tenant=row["tenant"],
        key_id=row["key_id"],
        model=row["model"],
        state=HealthState(row["state"]),
        until=row["until"],
        reason=row["reason"],
        updated_at=row["updated_at"],
    )


def _provider_health_from_row(row: asyncpg.Record) -> ProviderHealth:
    return ProviderHealth(
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        model=row["model"],
        state=HealthState(row["state"]),
        until=row["until"],
        reason=row["reason"],
        updated_at=row["updated_at"],
    )


def _conflict(exc: Exception, tenant: str, values: dict[str, str]) -> Exception:
    """Translate a constraint failure of an insert/update."""
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return _codec.tenant_not_found(tenant)
    if isinstance(exc, asyncpg.UniqueViolationError):
        known = _UNIQUE_CONSTRAINTS.get(getattr(exc, "constraint_name", None) or "")
        if known is not None and known[1] in values:
            table, field = known
            return _codec.already_exists(table, field, values[field], tenant)
    return exc


class PostgresStore:
    """``Store`` on Postgres. Connects lazily; ``close()`` releases everything.

    ``command_timeout`` bounds every statement and every wait for a pooled
    connection (seconds); a timeout, like a lost connection, is ``Unavailable``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "keyplane",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"invalid schema name {schema!r}: use lowercase letters, digits and _")
        if not command_timeout > 0:
            raise ValueError("command_timeout must be a positive number of seconds")
        self._dsn = dsn
        self._schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._secrets, self._target = _dsn_secrets_and_target(dsn)
        self._changes_lock = _lock_key(f"keyplane.changes:{schema}")
        self._migrate_lock = _lock_key(f"keyplane.migrate:{schema}")
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False
        self._listeners: list[ChangeListener] = []
        self._listen_conn: asyncpg.Connection | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"PostgresStore({self._target!r}, schema={self._schema!r})"

    @property
    def schema(self) -> str:
        return self._schema

    # connection handling ---------------------------------------------------

    def _unavailable(self, exc: BaseException) -> Unavailable:
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self._command_timeout:g} s"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            detail = detail.replace(secret, "***")
        return Unavailable(f"postgres store at {self._target} unavailable ({detail})")

    async def _connect(self) -> asyncpg.Connection:
        """A dedicated connection (the LISTEN one), outside the pool."""
        return await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            server_settings=self._server_settings(),
        )

    def _server_settings(self) -> dict[str, str]:
        return {"search_path": f'"{self._schema}"', "application_name": "keyplane"}

    async def _get_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise Unavailable("postgres store is closed")
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        timeout=self._connect_timeout,
                        command_timeout=self._command_timeout,
                        server_settings=self._server_settings(),
                    )
        return self._pool

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except asyncpg.exceptions.ClientConfigurationError:
            raise
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(exc) from None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._errors():
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._command_timeout) as conn, conn.transaction():
                yield conn

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._errors():
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._command_timeout) as conn:
                yield conn

    async def _log(self, conn: asyncpg.Connection, tenant: str, kind: EntityKind, entity_id: str, op: ChangeOp) -> int:
        """Append the change row and notify; must be the last step of a write
        (several in a row are fine). Returns the new version."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", self._changes_lock)
        version = await conn.fetchval(
            "WITH c AS (INSERT INTO changes (tenant, kind, entity_id, op) VALUES ($1, $2, $3, $4) "
            "RETURNING version) SELECT version, pg_notify($5, version::text) FROM c",
            tenant,
            kind.value,
            entity_id,
            op.value,
            CHANNEL,
        )
        return int(version)

    @staticmethod
    async def _audit(conn: asyncpg.Connection, entry: AuditEntry | None) -> int | None:
        """Write the audit row of the write in progress (none when None),
        before its change-log row; an error here fails the write: the
        transaction rolls back."""
        if entry is None:
            return None
        audit_id = await conn.fetchval(
            f"INSERT INTO audit_events ({_audit.INSERT_COLUMNS}) "  # noqa: S608
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            *_audit.insert_values(entry, _codec.utc(entry.time, "time")),
        )
        return int(audit_id)

    async def _list(self, table: str, columns: str, tenant: str) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            if await conn.fetchval("SELECT 1 FROM tenants WHERE name = $1", tenant) is None:
                raise _codec.tenant_not_found(tenant)
            rows: list[asyncpg.Record] = await conn.fetch(
                f"SELECT {columns} FROM {table} WHERE tenant = $1 ORDER BY created_at, id",  # noqa: S608
                tenant,
            )
        return rows

    async def _get(self, table: str, columns: str, tenant: str, entity_id: str) -> asyncpg.Record:
        async with self._connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(
                f"SELECT {columns} FROM {table} WHERE tenant = $1 AND id = $2",  # noqa: S608
                tenant,
                entity_id,
            )
        if row is None:
            raise _codec.not_found(table, tenant, entity_id)
        return row

    async def _delete(
        self, table: str, kind: EntityKind, tenant: str, entity_id: str, audit: AuditEntry | None
    ) -> None:
        async with self._transaction() as conn:
            status = await conn.execute(
                f"DELETE FROM {table} WHERE tenant = $1 AND id = $2",  # noqa: S608
                tenant,
                entity_id,
            )
            if status == "DELETE 0":
                raise _codec.not_found(table, tenant, entity_id)
            await self._audit(conn, audit)
            await self._log(conn, tenant, kind, entity_id, ChangeOp.DELETE)

    # lifecycle ---------------------------------------------------------------

    async def migrate(self) -> None:
        # Migrations (and waiting for another replica's) may take longer than
        # a command should: they get their own, generous bound.
        timeout = max(self._command_timeout, MIGRATION_TIMEOUT)
        async with self._transaction() as conn:
            # Several replicas may start at once: one migrates, the others wait and find nothing to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._migrate_lock, timeout=timeout)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"', timeout=timeout)
            await conn.execute(f'SET LOCAL search_path TO "{self._schema}"', timeout=timeout)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                timeout=timeout,
            )
            rows = await conn.fetch("SELECT version FROM schema_migrations", timeout=timeout)
            applied = [r["version"] for r in rows]
            for migration in pending(MIGRATIONS, applied):
                for statement in migration.statements:
                    await conn.execute(statement, timeout=timeout)
                await conn.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)", migration.version, timeout=timeout
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        if self._reconnect_task is not None:
            tasks.append(self._reconnect_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except _UNAVAILABLE_ERRORS:  # includes TimeoutError
                conn.terminate()
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    # tenants -----------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> Tenant:
        tenant = replace(tenant, created_at=_codec.utc(tenant.created_at, "created_at"), revision=1)
        async with self._transaction() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO tenants ({_TENANT_COLUMNS}) VALUES ($1, $2, $3)",  # noqa: S608
                    tenant.name,
                    tenant.created_at,
                    tenant.revision,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise _conflict(exc, tenant.name, {"name": tenant.name}) from None
            await self._audit(conn, audit)
            await self._log(conn, tenant.name, EntityKind.TENANT, tenant.name, ChangeOp.PUT)
        return tenant

    async def get_tenant(self, name: str) -> Tenant:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = $1", name)  # noqa: S608
        if row is None:
            raise _codec.tenant_not_found(name)
        return _tenant_from_row(row)

    async def list_tenants(self) -> list[Tenant]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY created_at, name")  # noqa: S608
        return [_tenant_from_row(r) for r in rows]

    async def delete_tenant(self, name: str, *, audit: AuditEntry | None = None) -> None:
        async with self._transaction() as conn:
            if await conn.execute("DELETE FROM tenants WHERE name = $1", name) == "DELETE 0":
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
                await conn.execute(
                    f"INSERT INTO provider_keys ({_KEY_COLUMNS}) "  # noqa: S608
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    key.id,
                    key.tenant,
                    key.provider.value,
                    key.label,
                    key.base_url,
                    key.status.value,
                    key.weight,
                    list(key.allowed_models),
                    key.secret_ciphertext,
                    key.fingerprint,
                    key.last4,
                    key.created_at,
                    key.updated_at,
                    key.revision,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise _conflict(exc, key.tenant, {"id": key.id, "label": key.label}) from None
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
    ) -> asyncpg.Record:
        """Write the named columns and ``revision + 1`` in one statement,
        conditional on ``expected_revision`` when given; log the change.
        A concurrent update of the row makes this one wait for its commit and
        then re-check the condition (the row lock), so the compare-and-set is
        atomic under READ COMMITTED."""
        unknown = set(values) - _codec.SET_COLUMNS[table]
        if unknown:
            raise ValueError(f"{table}: cannot update {sorted(unknown)}")
        names = list(values)
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=1))
        params = [_column_value(name, values[name]) for name in names] + [tenant, entity_id]
        n = len(names)
        condition = ""
        if expected_revision is not None:
            condition = f" AND revision = ${n + 3}"
            params.append(expected_revision)
        async with self._transaction() as conn:
            try:
                row: asyncpg.Record | None = await conn.fetchrow(
                    f"UPDATE {table} SET {assignments}, revision = revision + 1 "  # noqa: S608
                    f"WHERE tenant = ${n + 1} AND id = ${n + 2}{condition} RETURNING {columns}",
                    *params,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                unique = {k: str(v) for k, v in values.items() if k in ("label", "public_model")}
                raise _conflict(exc, tenant, unique) from None
            if row is None:
                current = await conn.fetchval(
                    f"SELECT revision FROM {table} WHERE tenant = $1 AND id = $2",  # noqa: S608
                    tenant,
                    entity_id,
                )
                if current is None or expected_revision is None:
                    raise _codec.not_found(table, tenant, entity_id)
                raise _codec.stale(table, tenant, entity_id, expected_revision, int(current))
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
                await conn.execute(
                    f"INSERT INTO routes ({_ROUTE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",  # noqa: S608
                    route.id,
                    route.tenant,
                    route.public_model,
                    _codec.targets_to_json(route.targets),
                    route.created_at,
                    route.updated_at,
                    route.revision,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise _conflict(exc, route.tenant, {"id": route.id, "public_model": route.public_model}) from None
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
                await conn.execute(
                    f"INSERT INTO client_keys ({_CLIENT_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",  # noqa: S608
                    client_key.id,
                    client_key.tenant,
                    client_key.label,
                    client_key.prefix,
                    client_key.token_sha256,
                    client_key.created_at,
                    client_key.revision,
                )
            except asyncpg.IntegrityConstraintViolationError as exc:
                values = {"id": client_key.id, "label": client_key.label}
                raise _conflict(exc, client_key.tenant, values) from None
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

    @staticmethod
    async def _require_key(conn: asyncpg.Connection, tenant: str, key_id: str) -> None:
        # FOR SHARE: a concurrent delete of the key waits for this write, which the cascade then removes.
        if await conn.fetchval("SELECT 1 FROM provider_keys WHERE tenant = $1 AND id = $2 FOR SHARE", tenant, key_id):
            return
        if await conn.fetchval("SELECT 1 FROM tenants WHERE name = $1", tenant) is None:
            raise _codec.tenant_not_found(tenant)
        raise _codec.not_found("provider_keys", tenant, key_id)

    async def put_key_health(self, health: KeyHealth) -> int | None:
        until = None if health.until is None else _codec.utc(health.until, "until")
        updated_at = _codec.utc(health.updated_at, "updated_at")
        async with self._transaction() as conn:
            await self._require_key(conn, health.tenant, health.key_id)
            if health.state is HealthState.HEALTHY:
                status = await conn.execute(
                    "DELETE FROM key_health WHERE key_id = $1 AND model = $2", health.key_id, health.model
                )
                changed = status != "DELETE 0"
                op = ChangeOp.DELETE
            else:
                changed = await conn.fetchval(
                    f"INSERT INTO key_health ({_KEY_HEALTH_COLUMNS}) "  # noqa: S608
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (key_id, model) DO UPDATE SET state = EXCLUDED.state, until = EXCLUDED.until, "
                    "reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at "
                    f"WHERE {_HEALTH_CHANGED.format(t='key_health')} RETURNING true",
                    health.tenant,
                    health.key_id,
                    health.model,
                    health.state.value,
                    until,
                    health.reason,
                    updated_at,
                )
                op = ChangeOp.PUT
            if not changed:
                return None
            return await self._log(conn, health.tenant, EntityKind.KEY_HEALTH, health.entity_id, op)

    async def get_key_health(self, tenant: str, key_id: str, model: str) -> KeyHealth | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_KEY_HEALTH_COLUMNS} FROM key_health "  # noqa: S608
                "WHERE tenant = $1 AND key_id = $2 AND model = $3",
                tenant,
                key_id,
                model,
            )
        return None if row is None else _key_health_from_row(row)

    async def list_key_health(self, tenant: str) -> list[KeyHealth]:
        async with self._connection() as conn:
            if await conn.fetchval("SELECT 1 FROM tenants WHERE name = $1", tenant) is None:
                raise _codec.tenant_not_found(tenant)
            rows = await conn.fetch(
                f"SELECT {_KEY_HEALTH_COLUMNS} FROM key_health WHERE tenant = $1 "  # noqa: S608
                'ORDER BY key_id COLLATE "C", model COLLATE "C"',
                tenant,
            )
        return [_key_health_from_row(r) for r in rows]

    async def clear_key_health(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> list[int]:
        async with self._transaction() as conn:
            await self._require_key(conn, tenant, key_id)
            rows = await conn.fetch(
                "DELETE FROM key_health WHERE tenant = $1 AND key_id = $2 RETURNING model", tenant, key_id
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
        until = None if health.until is None else _codec.utc(health.until, "until")
        updated_at = _codec.utc(health.updated_at, "updated_at")
        async with self._transaction() as conn:
            # FOR SHARE: a concurrent tenant delete waits for this write, which the cascade then removes.
            if await conn.fetchval("SELECT 1 FROM tenants WHERE name = $1 FOR SHARE", health.tenant) is None:
                raise _codec.tenant_not_found(health.tenant)
            if health.state is HealthState.HEALTHY:
                status = await conn.execute(
                    "DELETE FROM provider_health WHERE tenant = $1 AND provider = $2 AND model = $3",
                    health.tenant,
                    health.provider.value,
                    health.model,
                )
                changed = status != "DELETE 0"
                op = ChangeOp.DELETE
            else:
                changed = await conn.fetchval(
                    f"INSERT INTO provider_health ({_PROVIDER_HEALTH_COLUMNS}) "  # noqa: S608
                    "VALUES ($1, $2, $3, $4, $5, $6, $7) "
                    "ON CONFLICT (tenant, provider, model) DO UPDATE SET state = EXCLUDED.state, "
                    "until = EXCLUDED.until, reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at "
                    f"WHERE {_HEALTH_CHANGED.format(t='provider_health')} RETURNING true",
                    health.tenant,
                    health.provider.value,
                    health.model,
                    health.state.value,
                    until,
                    health.reason,
                    updated_at,
                )
                op = ChangeOp.PUT
            if not changed:
                return None
            return await self._log(conn, health.tenant, EntityKind.PROVIDER_HEALTH, health.entity_id, op)

    async def get_provider_health(self, tenant: str, provider: Provider, model: str) -> ProviderHealth | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_PROVIDER_HEALTH_COLUMNS} FROM provider_health "  # noqa: S608
                "WHERE tenant = $1 AND provider = $2 AND model = $3",
                tenant,
                provider.value,
                model,
            )
        return None if row is None else _provider_health_from_row(row)

    async def list_provider_health(self, tenant: str) -> list[ProviderHealth]:
        async with self._connection() as conn:
            if await conn.fetchval("SELECT 1 FROM tenants WHERE name = $1", tenant) is None:
                raise _codec.tenant_not_found(tenant)
            rows = await conn.fetch(
                f"SELECT {_PROVIDER_HEALTH_COLUMNS} FROM provider_health WHERE tenant = $1 "  # noqa: S608
                'ORDER BY provider COLLATE "C", model COLLATE "C"',
                tenant,
            )
        return [_provider_health_from_row(r) for r in rows]

    # API tokens --------------------------------------------------------------

    async def create_token(self, token: AccessToken, *, audit: AuditEntry | None = None) -> AccessToken:
        token = replace(token, created_at=_codec.utc(token.created_at, "created_at"), revision=1)
        revoked_at = None if token.revoked_at is None else _codec.utc(token.revoked_at, "revoked_at")
        async with self._transaction() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO access_tokens ({_TOKEN_COLUMNS}) "  # noqa: S608
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    token.id,
                    token.kind.value,
                    token.label,
                    token.prefix,
                    token.token_sha256,
                    None if token.tenants is None else list(token.tenants),
                    token.created_at,
                    revoked_at,
                    token.revision,
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"{token.kind.value} token {token.id!r} already exists") from None
            await self._audit(conn, audit)
            await self._log(conn, "", token.kind.entity_kind, token.id, ChangeOp.PUT)
        return token

    async def get_token(self, kind: TokenKind, token_id: str) -> AccessToken:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = $1 AND id = $2",  # noqa: S608
                kind.value,
                token_id,
            )
        if row is None:
            raise _codec.token_not_found(kind, token_id)
        return _token_from_row(row)

    async def list_tokens(self, kind: TokenKind) -> list[AccessToken]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = $1 ORDER BY created_at, id",  # noqa: S608
                kind.value,
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
        condition = "" if expected_revision is None else " AND revision = $4"
        params: list[Any] = [_codec.utc(revoked_at, "revoked_at"), kind.value, token_id]
        if expected_revision is not None:
            params.append(expected_revision)
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE access_tokens SET revoked_at = $1, revision = revision + 1 "  # noqa: S608
                f"WHERE kind = $2 AND id = $3 AND revoked_at IS NULL{condition} RETURNING {_TOKEN_COLUMNS}",
                *params,
            )
            if row is not None:
                await self._audit(conn, audit)
                await self._log(conn, "", kind.entity_kind, token_id, ChangeOp.PUT)
                return _token_from_row(row)
            current = await conn.fetchrow(
                f"SELECT {_TOKEN_COLUMNS} FROM access_tokens WHERE kind = $1 AND id = $2",  # noqa: S608
                kind.value,
                token_id,
            )
            if current is None:
                raise _codec.token_not_found(kind, token_id)
            if expected_revision is not None and current["revision"] != expected_revision:
                raise _codec.token_stale(kind, token_id, expected_revision, int(current["revision"]))
            await self._audit(conn, audit)  # already revoked: nothing else to do
        return _token_from_row(current)

    # change log --------------------------------------------------------------

    async def latest_version(self) -> int:
        async with self._connection() as conn:
            version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM changes")
        return int(version)

    async def changes_since(self, version: int, limit: int = 1000) -> list[ChangeRecord]:
        if limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT version, tenant, kind, entity_id, op, created_at FROM changes "
                "WHERE version > $1 ORDER BY version LIMIT $2",
                version,
                limit,
            )
        return [
            ChangeRecord(
                version=r["version"],
                tenant=r["tenant"],
                kind=EntityKind(r["kind"]),
                entity_id=r["entity_id"],
                op=ChangeOp(r["op"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

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
            return f"${len(params)}"

        where = _audit.where(query, param, _codec.utc)
        limit = param(max(query.limit, 0))
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_audit.COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT {limit}",  # noqa: S608
                *params,
            )
        return [
            AuditEvent(
                id=int(r["id"]),
                entry=AuditEntry(
                    time=r["event_time"],
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

    # LISTEN/NOTIFY -----------------------------------------------------------

    async def listen_changes(self, listener: ChangeListener) -> None:
        """Call ``listener(version)`` for every change committed by any store on
        this database (this one included); after a lost LISTEN connection is
        re-established it is called once with ``latest_version()`` to cover
        what was missed. Listeners must be idempotent: treat the version as a
        hint to read ``changes_since``."""
        if self._closed:
            raise Unavailable("postgres store is closed")
        self._listeners.append(listener)
        if self._listen_conn is None and self._reconnect_task is None:
            async with self._errors():
                await self._open_listen_connection()

    async def _open_listen_connection(self) -> None:
        conn = await self._connect()
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._listen_conn = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            version = int(str(payload))
        except ValueError:
            log.warning("ignoring malformed %s notification", CHANNEL)
            return
        self._dispatch(version)

    def _dispatch(self, version: int) -> None:
        if self._closed:
            return
        for listener in list(self._listeners):
            task = asyncio.get_running_loop().create_task(self._deliver(listener, version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _deliver(listener: ChangeListener, version: int) -> None:
        try:
            await listener(version)
        except Exception:
            log.exception("change listener failed for version %d", version)

    def _on_terminated(self, conn: object) -> None:
        if self._closed or conn is not self._listen_conn:
            return
        self._listen_conn = None
        log.warning("lost the %s LISTEN connection to %s; reconnecting", CHANNEL, self._target)
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._open_listen_connection()
            except Exception as exc:
                log.info("LISTEN reconnect to %s failed: %s", self._target, type(exc).__name__)
                delay = min(delay * 2, 5.0)
                continue
            self._reconnect_task = None
            try:
                self._dispatch(await self.latest_version())
            except Unavailable:
                pass
            return

    # master-key rewrapping ---------------------------------------------------

    async def list_sealed_secrets(self, after: str = "", limit: int = 100) -> list[StoredSecret]:
        if limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT tenant, id, secret_ciphertext FROM provider_keys WHERE id > $1 ORDER BY id LIMIT $2",
                after,
                limit,
            )
        return [StoredSecret(r["tenant"], r["id"], bytes(r["secret_ciphertext"])) for r in rows]

    async def rewrap_secrets(self, rewraps: Sequence[SecretRewrap], audit: AuditEntry | None = None) -> list[str]:
        if not rewraps:
            return []
        # One statement, one transaction; no change row and no NOTIFY: nothing
        # a sidecar holds changes.
        async with self._transaction() as conn:
            rows = await conn.fetch(
                "UPDATE provider_keys AS p SET secret_ciphertext = u.new "
                "FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[]) AS u(tenant, id, old, new) "
                "WHERE p.tenant = u.tenant AND p.id = u.id AND p.secret_ciphertext = u.old "
                "RETURNING p.tenant, p.id",
                [r.tenant for r in rewraps],
                [r.key_id for r in rewraps],
                [r.old_ciphertext for r in rewraps],
                [r.new_ciphertext for r in rewraps],
            )
            if rows:
                await self._audit(conn, audit)
        done = {(str(r["tenant"]), str(r["id"])) for r in rows}
        return [r.key_id for r in rewraps if (r.tenant, r.key_id) in done]
