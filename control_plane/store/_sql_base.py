"""The footing both SQL stores share: :class:`SqlBase`.

A store subclasses (through ``_sql.SqlStore``) with its driver and dialect:
how to open a session or a transaction, run a statement (the SQL written here
uses ``?`` placeholders; the Postgres store numbers them), append a change
row, translate a constraint failure, and the few SQL fragments that differ
(class attributes). On those primitives this module builds, once, the steps
every write is made of (insert, field-mask update with compare-and-set,
delete, each with its audit row and then its change-log row, the last step
as Postgres's version lock wants) and the store-wide methods: tokens, the
change log, the audit log and the listing of sealed secrets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

from control_plane.store import _audit, _codec, _rows
from control_plane.store._rows import Row
from control_plane.store.base import AuditEntry, AuditEvent, AuditQuery, StoredSecret
from keyplane.domain import AccessToken, ChangeOp, ChangeRecord, EntityKind, TokenKind
from keyplane.errors import AlreadyExists

__all__ = ["Conn", "SqlBase"]

Conn = TypeVar("Conn")

# The unique columns an update may change, named in an AlreadyExists message.
_UNIQUE_UPDATE_COLUMNS = ("label", "public_model")


class SqlBase(ABC, Generic[Conn]):
    """Driver primitives, write steps and store-wide methods; ``Conn`` is the
    driver's connection."""

    # The store's value encodings (timestamps, string lists).
    _encoding: ClassVar[_rows.Encoding]
    # What the driver raises for any constraint failure, and for a unique one.
    _integrity_error: ClassVar[type[Exception]]
    _unique_violation: ClassVar[type[Exception]]
    # Appended to a SELECT that checks a parent row exists before writing a
    # child of it, so a concurrent delete of the parent waits ('' if the
    # store serialises its writes anyway).
    _share_lock: ClassVar[str] = ""
    # Appended to an ORDER BY column to sort by bytes, not by locale.
    _bytewise: ClassVar[str] = ""
    # WHERE of a health upsert: the stored row ``{t}`` says something other
    # than the new one, so a repeated verdict rewrites (and returns) nothing.
    _health_changed: ClassVar[str]

    # driver primitives -------------------------------------------------------

    @abstractmethod
    def _session(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads; database failures become Unavailable."""

    @abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A write transaction: committed on success, rolled back on any error."""

    @abstractmethod
    async def _fetchone(self, conn: Conn, sql: str, params: Sequence[Any]) -> Row | None: ...

    @abstractmethod
    async def _fetchall(self, conn: Conn, sql: str, params: Sequence[Any]) -> list[Row]: ...

    @abstractmethod
    async def _execute(self, conn: Conn, sql: str, params: Sequence[Any]) -> int:
        """Run one statement; the number of rows it changed."""

    @abstractmethod
    async def _executemany(self, conn: Conn, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each of ``rows`` in one round trip."""

    @abstractmethod
    async def _log(self, conn: Conn, tenant: str, kind: EntityKind, entity_id: str, op: ChangeOp) -> int:
        """Append one change row; the last step of a write (several in a row
        are fine). Returns its version."""

    @abstractmethod
    def _conflict(self, exc: Exception, table: str, tenant: str, values: dict[str, str]) -> Exception:
        """The error for a constraint failure of an insert or update on
        ``table``; ``values``: the unique fields written, by name."""

    # shared steps ------------------------------------------------------------

    async def _audit(self, conn: Conn, entry: AuditEntry | None) -> int | None:
        """Write the audit row of the write in progress (none when None),
        before its change-log row; an error here fails the write: the
        transaction rolls back."""
        if entry is None:
            return None
        row = await self._fetchone(
            conn,
            f"INSERT INTO audit_events ({_audit.INSERT_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            _audit.insert_values(entry, self._encoding.time(entry.time, "time")),
        )
        assert row is not None
        return int(row["id"])

    async def _require_tenant(self, conn: Conn, tenant: str, *, lock: bool = False) -> None:
        share = self._share_lock if lock else ""
        if await self._fetchone(conn, f"SELECT 1 FROM tenants WHERE name = ?{share}", (tenant,)) is None:  # noqa: S608
            raise _codec.tenant_not_found(tenant)

    async def _require_key(self, conn: Conn, tenant: str, key_id: str) -> None:
        sql = f"SELECT 1 FROM provider_keys WHERE tenant = ? AND id = ?{self._share_lock}"  # noqa: S608
        if await self._fetchone(conn, sql, (tenant, key_id)) is None:
            await self._require_tenant(conn, tenant)
            raise _codec.not_found("provider_keys", tenant, key_id)

    async def _insert(
        self,
        table: str,
        columns: str,
        values: tuple[Any, ...],
        kind: EntityKind,
        tenant: str,
        entity_id: str,
        unique: dict[str, str],
        audit: AuditEntry | None,
    ) -> None:
        """Insert one row of a tenant's object and log its PUT; ``unique``:
        its unique fields, for the AlreadyExists message."""
        placeholders = ", ".join("?" for _ in values)
        async with self._transaction() as conn:
            try:
                await self._execute(conn, f"INSERT INTO {table} ({columns}) VALUES ({placeholders})", values)  # noqa: S608
            except self._integrity_error as exc:
                raise self._conflict(exc, table, tenant, unique) from None
            await self._audit(conn, audit)
            await self._log(conn, tenant, kind, entity_id, ChangeOp.PUT)

    async def _get(self, table: str, columns: str, tenant: str, entity_id: str) -> Row:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {columns} FROM {table} WHERE tenant = ? AND id = ?",  # noqa: S608
                (tenant, entity_id),
            )
        if row is None:
            raise _codec.not_found(table, tenant, entity_id)
        return row

    async def _list(self, table: str, columns: str, tenant: str) -> list[Row]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            return await self._fetchall(
                conn,
                f"SELECT {columns} FROM {table} WHERE tenant = ? ORDER BY created_at, id",  # noqa: S608
                (tenant,),
            )

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
    ) -> Row:
        """Write the named columns and ``revision + 1`` in one statement,
        conditional on ``expected_revision`` when given; log the change.
        (On Postgres a concurrent update of the row makes this one wait for
        its commit and then re-check the condition, the row lock, so the
        compare-and-set is atomic under READ COMMITTED.)"""
        unknown = set(values) - _codec.SET_COLUMNS[table]
        if unknown:
            raise ValueError(f"{table}: cannot update {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        condition = "" if expected_revision is None else " AND revision = ?"
        params = [_rows.update_value(name, value, self._encoding) for name, value in values.items()]
        params += [tenant, entity_id]
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
            except self._integrity_error as exc:
                unique = {k: str(v) for k, v in values.items() if k in _UNIQUE_UPDATE_COLUMNS}
                raise self._conflict(exc, table, tenant, unique) from None
            if row is None:
                current = await self._fetchone(
                    conn,
                    f"SELECT revision FROM {table} WHERE tenant = ? AND id = ?",  # noqa: S608
                    (tenant, entity_id),
                )
                if current is None or expected_revision is None:
                    raise _codec.not_found(table, tenant, entity_id)
                raise _codec.stale(table, tenant, entity_id, expected_revision, int(current["revision"]))
            await self._audit(conn, audit)
            await self._log(conn, tenant, kind, entity_id, ChangeOp.PUT)
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

    # API tokens --------------------------------------------------------------

    async def create_token(self, token: AccessToken, *, audit: AuditEntry | None = None) -> AccessToken:
        token = replace(token, created_at=_codec.utc(token.created_at, "created_at"), revision=1)
        values = _rows.token_values(token, self._encoding)
        async with self._transaction() as conn:
            try:
                await self._execute(
                    conn,
                    f"INSERT INTO access_tokens ({_rows.TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    values,
                )
            except self._unique_violation:
                raise AlreadyExists(f"{token.kind.value} token {token.id!r} already exists") from None
            await self._audit(conn, audit)
            await self._log(conn, "", token.kind.entity_kind, token.id, ChangeOp.PUT)
        return token

    async def _fetch_token(self, conn: Conn, kind: TokenKind, token_id: str) -> Row:
        row = await self._fetchone(
            conn,
            f"SELECT {_rows.TOKEN_COLUMNS} FROM access_tokens WHERE kind = ? AND id = ?",  # noqa: S608
            (kind.value, token_id),
        )
        if row is None:
            raise _codec.token_not_found(kind, token_id)
        return row

    async def get_token(self, kind: TokenKind, token_id: str) -> AccessToken:
        async with self._session() as conn:
            row = await self._fetch_token(conn, kind, token_id)
        return _rows.token(row, self._encoding)

    async def list_tokens(self, kind: TokenKind) -> list[AccessToken]:
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_rows.TOKEN_COLUMNS} FROM access_tokens WHERE kind = ? ORDER BY created_at, id",  # noqa: S608
                (kind.value,),
            )
        return [_rows.token(r, self._encoding) for r in rows]

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
        params: list[Any] = [self._encoding.time(revoked_at, "revoked_at"), kind.value, token_id]
        if expected_revision is not None:
            params.append(expected_revision)
        async with self._transaction() as conn:
            row = await self._fetchone(
                conn,
                "UPDATE access_tokens SET revoked_at = ?, revision = revision + 1 "  # noqa: S608
                f"WHERE kind = ? AND id = ? AND revoked_at IS NULL{condition} RETURNING {_rows.TOKEN_COLUMNS}",
                params,
            )
            if row is not None:
                await self._audit(conn, audit)
                await self._log(conn, "", kind.entity_kind, token_id, ChangeOp.PUT)
                return _rows.token(row, self._encoding)
            current = await self._fetch_token(conn, kind, token_id)
            if expected_revision is not None and current["revision"] != expected_revision:
                raise _codec.token_stale(kind, token_id, expected_revision, int(current["revision"]))
            await self._audit(conn, audit)  # already revoked: nothing else to do
        return _rows.token(current, self._encoding)

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
                f"SELECT {_rows.CHANGE_COLUMNS} FROM changes WHERE version > ? ORDER BY version LIMIT ?",  # noqa: S608
                (version, limit),
            )
        return [_rows.change(r, self._encoding) for r in rows]

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

        where = _audit.where(query, param, self._encoding.time)
        params.append(max(query.limit, 0))
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_audit.COLUMNS} FROM audit_events{where} ORDER BY id DESC LIMIT ?",  # noqa: S608
                params,
            )
        return [_rows.audit_event(r, self._encoding) for r in rows]

    # master-key rewrapping (``rewrap_secrets`` is each store's own) -----------

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
