"""Usage rollups and prices (migration 7), written once for both SQL stores.

``usage_rollups`` has one row per (minute, tenant, client key, public model,
provider key, upstream model); ``put_usage`` adds a flush's counters to the
rows in one transaction, one upsert per row (``ON CONFLICT ... DO UPDATE SET
n = n + excluded.n``, which SQLite and Postgres share), so replicas writing
the same row concurrently add up. Minutes are epoch seconds (integers: the
bucketing below is the same integer arithmetic in both dialects). Usage is
history: it is not in the change log and outlives deleted keys and tenants
until retention (``sweep_usage``) removes it.

``prices`` belong to a tenant (deleted with it); writes are audited in the
same transaction like every admin write. Not in the change log either: only
the control plane costs usage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime

from control_plane.store import _codec, _rows
from control_plane.store._sql_base import Conn, SqlBase
from control_plane.store.base import AuditEntry
from control_plane.usage_records import DIMENSIONS, Price, UsageQuery, UsageRow, UsageTotals
from keyplane.domain import Provider
from keyplane.errors import NotFound

__all__ = ["UsageSql"]

_COUNTERS = tuple(f.name for f in fields(UsageTotals))
_KEY = "minute, tenant, client_key_id, public_model, provider_key_id, upstream_model"
_UPSERT = (
    f"INSERT INTO usage_rollups ({_KEY}, provider, {', '.join(_COUNTERS)}) "  # noqa: S608 - fixed names
    f"VALUES ({', '.join('?' * (7 + len(_COUNTERS)))}) "
    f"ON CONFLICT ({_KEY}) DO UPDATE SET " + ", ".join(f"{c} = usage_rollups.{c} + excluded.{c}" for c in _COUNTERS)
)
_PRICE_COLUMNS = (
    "tenant, provider, model, input_micros_per_million, cached_input_micros_per_million, "
    "output_micros_per_million, updated_at"
)


def _price(row: _rows.Row, encoding: _rows.Encoding) -> Price:
    return Price(
        tenant=row["tenant"],
        provider=Provider(row["provider"]),
        model=row["model"],
        input_micros_per_million=int(row["input_micros_per_million"]),
        cached_input_micros_per_million=int(row["cached_input_micros_per_million"]),
        output_micros_per_million=int(row["output_micros_per_million"]),
        updated_at=_rows.opt_time_from(encoding, row["updated_at"]),
    )


class UsageSql(SqlBase[Conn]):
    """The usage and price methods of ``Store`` on ``SqlBase``'s primitives."""

    async def put_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add each row's counters to its stored row (created at zero), in one transaction."""
        if not rows:
            return
        values = [
            (
                r.minute,
                r.tenant,
                r.client_key_id,
                r.public_model,
                r.provider_key_id,
                r.upstream_model,
                r.provider.value,
                *(getattr(r.totals, c) for c in _COUNTERS),
            )
            for r in rows
        ]
        async with self._transaction() as conn:
            await self._executemany(conn, _UPSERT, values)

    async def query_usage(self, query: UsageQuery) -> list[tuple[dict[str, str], int | None, UsageTotals]]:
        """Sums over ``query``'s minutes and filters, grouped: (group values, bucket start, totals)."""
        group = [d for d in DIMENSIONS if d in query.group_by]
        conditions = ["minute >= ?", "minute < ?"]
        params: list[object] = [query.start, query.end]
        for column, value in sorted(query.filters.items()):
            if column not in DIMENSIONS:
                raise ValueError(f"unknown usage filter {column!r}")
            conditions.append(f"{column} = ?")
            params.append(value)
        selected = list(group)
        keys = list(group)
        if query.bucket:
            bucket = f"(minute / {int(query.bucket)}) * {int(query.bucket)}"
            selected.insert(0, f"{bucket} AS bucket")
            keys.insert(0, "bucket")
        sums = ", ".join(f"CAST(SUM({c}) AS BIGINT) AS {c}" for c in _COUNTERS)
        sql = f"SELECT {', '.join([*selected, sums])} FROM usage_rollups WHERE {' AND '.join(conditions)}"  # noqa: S608
        if keys:
            sql += f" GROUP BY {', '.join(keys)} ORDER BY " + ", ".join(
                k if k == "bucket" else k + self._bytewise for k in keys
            )
        sql += f" LIMIT {int(query.limit)} OFFSET {int(query.offset)}"
        async with self._session() as conn:
            rows = await self._fetchall(conn, sql, params)
        out: list[tuple[dict[str, str], int | None, UsageTotals]] = []
        for row in rows:
            if not keys and row["requests"] is None:
                continue  # no rows at all: SUM over nothing
            totals = UsageTotals(**{c: int(row[c] or 0) for c in _COUNTERS})
            out.append(({d: row[d] for d in group}, int(row["bucket"]) if query.bucket else None, totals))
        return out

    async def sweep_usage(self, before_minute: int) -> int:
        """Delete rollup rows of minutes before ``before_minute`` (retention); how many."""
        async with self._transaction() as conn:
            return await self._execute(conn, "DELETE FROM usage_rollups WHERE minute < ?", (before_minute,))

    async def put_price(self, price: Price, *, audit: AuditEntry | None = None) -> Price:
        """Create or replace the price of (tenant, provider, model)."""
        when = _codec.utc(price.updated_at or datetime.now().astimezone(), "updated_at")
        enc = self._encoding
        async with self._transaction() as conn:
            exists = f"SELECT name FROM tenants WHERE name = ?{self._share_lock}"  # noqa: S608
            found = await self._fetchone(conn, exists, (price.tenant,))
            if found is None:
                raise _codec.tenant_not_found(price.tenant)
            await self._execute(
                conn,
                f"INSERT INTO prices ({_PRICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT (tenant, provider, model) DO UPDATE SET "
                "input_micros_per_million = excluded.input_micros_per_million, "
                "cached_input_micros_per_million = excluded.cached_input_micros_per_million, "
                "output_micros_per_million = excluded.output_micros_per_million, updated_at = excluded.updated_at",
                (
                    price.tenant,
                    price.provider.value,
                    price.model,
                    price.input_micros_per_million,
                    price.cached_input_micros_per_million,
                    price.output_micros_per_million,
                    enc.time(when, "updated_at"),
                ),
            )
            await self._audit(conn, audit)
        return Price(
            price.tenant,
            price.provider,
            price.model,
            price.input_micros_per_million,
            price.cached_input_micros_per_million,
            price.output_micros_per_million,
            when,
        )

    async def list_prices(self, tenant: str | None) -> list[Price]:
        """The prices of ``tenant`` (every tenant's for None), by tenant, provider, model."""
        where, params = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
        b = self._bytewise
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_PRICE_COLUMNS} FROM prices{where} ORDER BY tenant{b}, provider{b}, model{b}",  # noqa: S608
                params,
            )
        return [_price(r, self._encoding) for r in rows]

    async def delete_price(
        self, tenant: str, provider: Provider, model: str, *, audit: AuditEntry | None = None
    ) -> None:
        async with self._transaction() as conn:
            deleted = await self._execute(
                conn,
                "DELETE FROM prices WHERE tenant = ? AND provider = ? AND model = ?",
                (tenant, provider.value, model),
            )
            if deleted == 0:
                raise NotFound(f"no price for {provider.value}:{model} in tenant {tenant!r}")
            await self._audit(conn, audit)
