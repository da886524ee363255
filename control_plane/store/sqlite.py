"""The embedded store: one SQLite file (or ``:memory:``) through aiosqlite.

One connection serves the whole process. Every operation holds an
``asyncio.Lock`` for its duration, so a write transaction
(``BEGIN IMMEDIATE ... COMMIT``) never interleaves with another statement on
that connection and a reader never sees a half-done write. Other processes
opening the same file wait on SQLite's own lock (``busy_timeout``); WAL mode
lets them read meanwhile.

The ``Store`` methods themselves are ``_sql.SqlStore``'s, shared with the
Postgres store; this module holds what is SQLite's own: the connection and
its transactions, migrating (the schema is in ``_sqlite_schema``), timestamps
as ISO text and string lists as JSON, the change-log row and the reading of
constraint errors.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from control_plane.store import _codec
from control_plane.store._rows import Row
from control_plane.store._sql import SqlStore
from control_plane.store._sqlite_schema import MIGRATIONS
from control_plane.store.base import AuditEntry, ChangeListener, SecretRewrap
from control_plane.store.migrations import pending
from keyplane.domain import ChangeOp, EntityKind
from keyplane.errors import Unavailable
from keyplane.home import ensure_private_file

__all__ = ["MIGRATIONS", "SqliteStore"]


class _Encoding:
    """Timestamps as fixed-width ISO text in UTC (so text order is time
    order), string lists as JSON arrays."""

    def time(self, value: datetime, field: str) -> str:
        return _codec.utc(value, field).isoformat(timespec="microseconds")

    def time_from(self, stored: str) -> datetime:
        return datetime.fromisoformat(stored).astimezone(UTC)

    def strings(self, values: tuple[str, ...]) -> str:
        return json.dumps(list(values))

    def strings_from(self, stored: str) -> tuple[str, ...]:
        return tuple(str(m) for m in json.loads(stored))


_ENCODING = _Encoding()


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


class SqliteStore(SqlStore[aiosqlite.Connection]):
    """``Store`` on SQLite. ``path`` is a file path or ``":memory:"``."""

    _encoding = _ENCODING
    _integrity_error = sqlite3.IntegrityError
    _unique_violation = sqlite3.IntegrityError
    # A null-safe comparison.
    _health_changed = (
        "{t}.state IS NOT excluded.state OR {t}.until IS NOT excluded.until OR {t}.reason IS NOT excluded.reason"
    )

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._leases: set[str] = set()

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    @asynccontextmanager
    async def try_lease(self, name: str) -> AsyncIterator[bool]:
        """One process writes a SQLite store, so its leases live in memory."""
        if name in self._leases:
            yield False
            return
        self._leases.add(name)
        try:
            yield True
        finally:
            self._leases.discard(name)

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

    async def _fetchone(self, conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> Row | None:
        async with conn.execute(sql, tuple(params)) as cursor:
            row: sqlite3.Row | None = await cursor.fetchone()
        return row

    async def _fetchall(self, conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> list[Row]:
        async with conn.execute(sql, tuple(params)) as cursor:
            rows = await cursor.fetchall()
        return list(rows)

    async def _execute(self, conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> int:
        async with conn.execute(sql, tuple(params)) as cursor:
            return int(cursor.rowcount)

    async def _executemany(self, conn: aiosqlite.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await conn.executemany(sql, [tuple(row) for row in rows])

    async def _log(
        self, conn: aiosqlite.Connection, tenant: str, kind: EntityKind, entity_id: str, op: ChangeOp
    ) -> int:
        async with conn.execute(
            "INSERT INTO changes (tenant, kind, entity_id, op, created_at) VALUES (?, ?, ?, ?, ?)",
            (tenant, kind.value, entity_id, op.value, _ENCODING.time(datetime.now(UTC), "created_at")),
        ) as cursor:
            version = cursor.lastrowid
        assert version is not None
        return version

    def _conflict(self, exc: Exception, table: str, tenant: str, values: dict[str, str]) -> Exception:
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
                    (migration.version, _ENCODING.time(datetime.now(UTC), "applied_at")),
                )

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    async def listen_changes(self, listener: ChangeListener) -> None:
        """Nothing to do: this process is the only writer of an embedded store."""

    # master-key rewrapping ---------------------------------------------------

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
