"""The production store: Postgres through an asyncpg pool, safe for replicas.

All tables live in one schema (``keyplane`` unless told otherwise). Every
write is one transaction that changes the entity row(s), appends one
``changes`` row and calls ``pg_notify('keyplane_changes', '<version>')``,
which Postgres delivers on commit. Before taking its version the transaction
takes a transaction-scoped advisory lock (the last thing it does before
committing), so versions become visible in commit order and a reader of
``changes_since`` never skips a version that commits late.

The ``Store`` methods themselves are ``_sql.SqlStore``'s, shared with the
SQLite store; this module holds what is Postgres's own: the pool and its
failures, migrating (the schema is in ``_postgres_schema``), numbered
placeholders, the change-log row with its lock and notification, constraint
names, LISTEN/NOTIFY and the one-statement rewrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from control_plane.store import _codec
from control_plane.store._postgres_schema import MIGRATIONS
from control_plane.store._rows import Row
from control_plane.store._sql import SqlStore
from control_plane.store.base import AuditEntry, ChangeListener, SecretRewrap
from control_plane.store.migrations import pending
from control_plane.store.quota_records import QuotaClaim
from keyplane.affinity import BindingKey
from keyplane.domain import ChangeOp, EntityKind
from keyplane.errors import Unavailable

__all__ = ["CHANNEL", "DEFAULT_COMMAND_TIMEOUT", "MIGRATIONS", "MIGRATION_TIMEOUT", "PostgresStore", "channel_for"]

log = logging.getLogger(__name__)

CHANNEL = "keyplane_changes"


def channel_for(schema: str) -> str:
    """The NOTIFY channel of one schema's change log: stores in other schemas
    of the same database (other deployments, tests) do not wake this one.
    The default schema keeps the historical name, so replicas of an older
    release and a newer one still hear each other during a rolling upgrade."""
    if schema == "keyplane":
        return CHANNEL
    name = f"{CHANNEL}__{schema}"
    if len(name) > 63:  # NAMEDATALEN - 1: pg_notify refuses longer names
        name = f"{CHANNEL}__{hashlib.sha256(schema.encode()).hexdigest()[:40]}"
    return name


# Seconds one statement, or the wait for a pooled connection, may take before
# the call fails with ``Unavailable`` (a stalled or locked database must not
# hang admin calls). A store call is a handful of statements, so it is bounded
# by a small multiple of this.
DEFAULT_COMMAND_TIMEOUT = 5.0
# Each statement of ``migrate()`` (schema changes, waiting for another replica's).
MIGRATION_TIMEOUT = 600.0


# constraint name (see _postgres_schema) -> (table, field named in the AlreadyExists message)
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


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """``sql`` with its ``?`` placeholders as asyncpg's ``$1``, ``$2``, ..."""
    head, *rest = sql.split("?")
    return head + "".join(f"${i}{text}" for i, text in enumerate(rest, start=1))


class _Encoding:
    """Timestamps as ``timestamptz`` (aware datetimes, in UTC), string lists
    as ``text[]``."""

    def time(self, value: datetime, field: str) -> datetime:
        return _codec.utc(value, field)

    def time_from(self, stored: datetime) -> datetime:
        return stored

    def strings(self, values: tuple[str, ...]) -> list[str]:
        return list(values)

    def strings_from(self, stored: list[str]) -> tuple[str, ...]:
        return tuple(stored)


class PostgresStore(SqlStore[asyncpg.Connection]):
    """``Store`` on Postgres. Connects lazily; ``close()`` releases everything.

    ``command_timeout`` bounds every statement and every wait for a pooled
    connection (seconds); a timeout, like a lost connection, is ``Unavailable``.
    """

    _encoding = _Encoding()
    _integrity_error = asyncpg.IntegrityConstraintViolationError
    _unique_violation = asyncpg.UniqueViolationError
    # A concurrent delete of the key or tenant waits for the write that
    # checked it, which the cascade then removes.
    _share_lock = " FOR SHARE"
    _bytewise = ' COLLATE "C"'
    _health_changed = (
        "({t}.state, {t}.until, {t}.reason) IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.until, EXCLUDED.reason)"
    )

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
        self._channel = channel_for(schema)
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
    async def _session(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._errors():
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._command_timeout) as conn:
                yield conn

    @asynccontextmanager
    async def try_lease(self, name: str) -> AsyncIterator[bool]:
        """A session advisory lock held on one pooled connection for the block
        (not a transaction: the block may wait on the network). Postgres frees
        it if the connection dies; the pool's reset frees it on release too."""
        key = _lock_key(f"keyplane.lease:{self._schema}:{name}")
        async with self._errors():
            pool = await self._get_pool()
            conn = await pool.acquire(timeout=self._command_timeout)
        try:
            async with self._errors():
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(Exception):
                        await conn.execute("SELECT pg_advisory_unlock($1)", key, timeout=self._command_timeout)
        finally:
            with contextlib.suppress(Exception):  # a pool closed meanwhile has let the connection go
                await pool.release(conn)

    async def _lock_binding(self, conn: asyncpg.Connection, key: BindingKey) -> None:
        """Concurrent claims of one triple wait here, on every replica."""
        name = f"keyplane.binding:{self._schema}:{key.tenant}\n{key.client_key_id}\n{key.public_model}"
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))

    async def _lock_quota(self, conn: asyncpg.Connection, claim: QuotaClaim) -> None:
        """Concurrent claims on one bucket's window wait here, on every replica."""
        bucket = f"{claim.tenant}\n{claim.client_key_id}\n{claim.kind}\n{claim.window_start_ms}"
        name = f"keyplane.quota:{self._schema}:{bucket}"
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(name))

    async def _fetchone(self, conn: asyncpg.Connection, sql: str, params: Sequence[Any]) -> Row | None:
        row: Row | None = await conn.fetchrow(_numbered(sql), *params)
        return row

    async def _fetchall(self, conn: asyncpg.Connection, sql: str, params: Sequence[Any]) -> list[Row]:
        rows: list[Row] = await conn.fetch(_numbered(sql), *params)
        return rows

    async def _execute(self, conn: asyncpg.Connection, sql: str, params: Sequence[Any]) -> int:
        status: str = await conn.execute(_numbered(sql), *params)  # e.g. "DELETE 3", "INSERT 0 1"
        return int(status.rsplit(" ", 1)[-1])

    async def _executemany(self, conn: asyncpg.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await conn.executemany(_numbered(sql), rows)

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
            self._channel,
        )
        return int(version)

    def _conflict(self, exc: Exception, table: str, tenant: str, values: dict[str, str]) -> Exception:
        # The table and field come from the constraint's name.
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            return _codec.tenant_not_found(tenant)
        if isinstance(exc, asyncpg.UniqueViolationError):
            known = _UNIQUE_CONSTRAINTS.get(getattr(exc, "constraint_name", None) or "")
            if known is not None and known[1] in values:
                table, field = known
                return _codec.already_exists(table, field, values[field], tenant)
        return exc

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
            await conn.add_listener(self._channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._listen_conn = conn

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        try:
            version = int(str(payload))
        except ValueError:
            log.warning("ignoring malformed %s notification", self._channel)
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
        log.warning("lost the %s LISTEN connection to %s; reconnecting", self._channel, self._target)
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
