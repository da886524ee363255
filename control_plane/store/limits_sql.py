"""Limits per client key or tenant in both SQL stores (migration 8): the
``Store`` methods written once on ``SqlBase``'s primitives.

One row per (tenant, client_key_id), client_key_id '' for the tenant as a
whole. Not in the change log: sidecars learn limits through their leases
(``StreamQuota``), not through Watch. A client key's row outlives the key
harmlessly: listings only return rows of client keys that still exist.
"""

from __future__ import annotations

from typing import Any

from control_plane.store import _codec, _rows
from control_plane.store._sql_base import Conn, SqlBase
from control_plane.store.base import AuditEntry
from keyplane.limit_set import LimitSet

__all__ = ["LimitsSql"]

_COLUMNS = (
    "tenant, client_key_id, requests_per_minute, tokens_per_minute, "
    "daily_budget_micros, monthly_budget_micros, updated_at"
)
_LIVE = "(client_key_id = '' OR client_key_id IN (SELECT id FROM client_keys WHERE tenant = ?))"


def _limit_set(row: _rows.Row, encoding: _rows.Encoding) -> LimitSet:
    return LimitSet(
        tenant=row["tenant"],
        client_key_id=row["client_key_id"],
        requests_per_minute=int(row["requests_per_minute"]),
        tokens_per_minute=int(row["tokens_per_minute"]),
        daily_budget_micros=int(row["daily_budget_micros"]),
        monthly_budget_micros=int(row["monthly_budget_micros"]),
        updated_at=encoding.time_from(row["updated_at"]),
    )


class LimitsSql(SqlBase[Conn]):
    """The limits methods of ``Store``."""

    async def put_limits(self, limits: LimitSet, *, audit: AuditEntry | None = None) -> LimitSet:
        """Create or replace the limits of (tenant, client key); NotFound for an
        unknown tenant or client key."""
        assert limits.updated_at is not None
        values: tuple[Any, ...] = (
            limits.tenant,
            limits.client_key_id,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.daily_budget_micros,
            limits.monthly_budget_micros,
            self._encoding.time(limits.updated_at, "updated_at"),
        )
        sql = (
            f"INSERT INTO limits ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
            "ON CONFLICT (tenant, client_key_id) DO UPDATE SET requests_per_minute = excluded.requests_per_minute, "
            "tokens_per_minute = excluded.tokens_per_minute, daily_budget_micros = excluded.daily_budget_micros, "
            "monthly_budget_micros = excluded.monthly_budget_micros, updated_at = excluded.updated_at"
        )
        async with self._transaction() as conn:
            await self._require_owner(conn, limits.tenant, limits.client_key_id)
            await self._execute(conn, sql, values)
            await self._audit(conn, audit)
        return limits

    async def _require_owner(self, conn: Conn, tenant: str, client_key_id: str) -> None:
        await self._require_tenant(conn, tenant, lock=True)
        if client_key_id:
            found = await self._fetchone(
                conn, "SELECT 1 FROM client_keys WHERE tenant = ? AND id = ?", (tenant, client_key_id)
            )
            if found is None:
                raise _codec.not_found("client_keys", tenant, client_key_id)

    async def get_limits(self, tenant: str, client_key_id: str) -> LimitSet | None:
        """The limits of (tenant, client key), None when none are set; NotFound
        for an unknown tenant or client key."""
        async with self._session() as conn:
            await self._require_owner(conn, tenant, client_key_id)
            row = await self._fetchone(
                conn,
                f"SELECT {_COLUMNS} FROM limits WHERE tenant = ? AND client_key_id = ?",  # noqa: S608
                (tenant, client_key_id),
            )
        return None if row is None else _limit_set(row, self._encoding)

    async def list_limits(self, tenant: str | None = None) -> list[LimitSet]:
        """Every limit set of ``tenant`` (of every tenant when None), by tenant and client key id."""
        async with self._session() as conn:
            if tenant is None:
                sql = (
                    f"SELECT {_COLUMNS} FROM limits l WHERE client_key_id = '' OR EXISTS "  # noqa: S608
                    "(SELECT 1 FROM client_keys c WHERE c.tenant = l.tenant AND c.id = l.client_key_id) "
                    "ORDER BY tenant, client_key_id"
                )
                rows = await self._fetchall(conn, sql, ())
            else:
                await self._require_tenant(conn, tenant)
                sql = f"SELECT {_COLUMNS} FROM limits WHERE tenant = ? AND {_LIVE} ORDER BY client_key_id"  # noqa: S608
                rows = await self._fetchall(conn, sql, (tenant, tenant))
        return [_limit_set(r, self._encoding) for r in rows]

    async def delete_limits(self, tenant: str, client_key_id: str, *, audit: AuditEntry | None = None) -> bool:
        """Clear the limits of (tenant, client key); False when none were set."""
        async with self._transaction() as conn:
            await self._require_tenant(conn, tenant, lock=True)
            removed = await self._execute(
                conn, "DELETE FROM limits WHERE tenant = ? AND client_key_id = ?", (tenant, client_key_id)
            )
            await self._audit(conn, audit)
        return removed > 0
