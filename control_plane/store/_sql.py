"""The ``Store`` methods of tenants and what they own, written once for both
SQL stores: :class:`SqlStore`.

Tenants, provider keys, routes, client keys and learnt health, on the steps
and primitives of ``_sql_base.SqlBase``. ``sqlite.SqliteStore`` and
``postgres.PostgresStore`` subclass it with their driver and dialect.
"""

from __future__ import annotations

from dataclasses import replace

from control_plane.store import _codec, _rows
from control_plane.store._bindings import BindingsSql
from control_plane.store._quota_claims import QuotaClaimsSql
from control_plane.store._sql_base import Conn
from control_plane.store._usage import UsageSql
from control_plane.store.base import AuditEntry, ProviderKeyUpdate, RouteUpdate
from control_plane.store.limits_sql import LimitsSql
from keyplane.domain import (
    ChangeOp,
    ClientKey,
    EntityKind,
    HealthState,
    KeyHealth,
    Provider,
    ProviderHealth,
    ProviderKey,
    Route,
    Tenant,
    key_health_entity_id,
)

__all__ = ["SqlStore"]


class SqlStore(BindingsSql[Conn], LimitsSql[Conn], UsageSql[Conn], QuotaClaimsSql[Conn]):
    """The whole ``Store`` but for what each driver does its own way
    (``migrate``, ``close``, ``listen_changes``, ``rewrap_secrets``)."""

    # tenants -----------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> Tenant:
        tenant = replace(tenant, created_at=_codec.utc(tenant.created_at, "created_at"), revision=1)
        values = _rows.tenant_values(tenant, self._encoding)
        unique = {"name": tenant.name}
        await self._insert(
            "tenants", _rows.TENANT_COLUMNS, values, EntityKind.TENANT, tenant.name, tenant.name, unique, audit
        )
        return tenant

    async def get_tenant(self, name: str) -> Tenant:
        async with self._session() as conn:
            row = await self._fetchone(conn, f"SELECT {_rows.TENANT_COLUMNS} FROM tenants WHERE name = ?", (name,))  # noqa: S608
        if row is None:
            raise _codec.tenant_not_found(name)
        return _rows.tenant(row, self._encoding)

    async def list_tenants(self) -> list[Tenant]:
        async with self._session() as conn:
            sql = f"SELECT {_rows.TENANT_COLUMNS} FROM tenants ORDER BY created_at, name"  # noqa: S608
            rows = await self._fetchall(conn, sql, ())
        return [_rows.tenant(r, self._encoding) for r in rows]

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
        values = _rows.provider_key_values(key, self._encoding)
        unique = {"id": key.id, "label": key.label}
        await self._insert(
            "provider_keys", _rows.KEY_COLUMNS, values, EntityKind.PROVIDER_KEY, key.tenant, key.id, unique, audit
        )
        return key

    async def get_provider_key(self, tenant: str, key_id: str) -> ProviderKey:
        return _rows.provider_key(await self._get("provider_keys", _rows.KEY_COLUMNS, tenant, key_id), self._encoding)

    async def list_provider_keys(self, tenant: str) -> list[ProviderKey]:
        rows = await self._list("provider_keys", _rows.KEY_COLUMNS, tenant)
        return [_rows.provider_key(r, self._encoding) for r in rows]

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
            _rows.KEY_COLUMNS,
            EntityKind.PROVIDER_KEY,
            tenant,
            key_id,
            update.columns(),
            expected_revision,
            audit,
        )
        return _rows.provider_key(row, self._encoding)

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
        values = _rows.route_values(route, self._encoding)
        unique = {"id": route.id, "public_model": route.public_model}
        await self._insert(
            "routes", _rows.ROUTE_COLUMNS, values, EntityKind.ROUTE, route.tenant, route.id, unique, audit
        )
        return route

    async def get_route(self, tenant: str, route_id: str) -> Route:
        return _rows.route(await self._get("routes", _rows.ROUTE_COLUMNS, tenant, route_id), self._encoding)

    async def list_routes(self, tenant: str) -> list[Route]:
        return [_rows.route(r, self._encoding) for r in await self._list("routes", _rows.ROUTE_COLUMNS, tenant)]

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
            "routes",
            _rows.ROUTE_COLUMNS,
            EntityKind.ROUTE,
            tenant,
            route_id,
            update.columns(),
            expected_revision,
            audit,
        )
        return _rows.route(row, self._encoding)

    async def delete_route(self, tenant: str, route_id: str, *, audit: AuditEntry | None = None) -> None:
        await self._delete("routes", EntityKind.ROUTE, tenant, route_id, audit)

    # client keys -------------------------------------------------------------

    async def create_client_key(self, client_key: ClientKey, *, audit: AuditEntry | None = None) -> ClientKey:
        client_key = replace(client_key, created_at=_codec.utc(client_key.created_at, "created_at"), revision=1)
        values = _rows.client_key_values(client_key, self._encoding)
        unique = {"id": client_key.id, "label": client_key.label}
        kind = EntityKind.CLIENT_KEY
        await self._insert(
            "client_keys", _rows.CLIENT_KEY_COLUMNS, values, kind, client_key.tenant, client_key.id, unique, audit
        )
        return client_key

    async def get_client_key(self, tenant: str, client_key_id: str) -> ClientKey:
        row = await self._get("client_keys", _rows.CLIENT_KEY_COLUMNS, tenant, client_key_id)
        return _rows.client_key(row, self._encoding)

    async def list_client_keys(self, tenant: str) -> list[ClientKey]:
        rows = await self._list("client_keys", _rows.CLIENT_KEY_COLUMNS, tenant)
        return [_rows.client_key(r, self._encoding) for r in rows]

    async def delete_client_key(self, tenant: str, client_key_id: str, *, audit: AuditEntry | None = None) -> None:
        await self._delete("client_keys", EntityKind.CLIENT_KEY, tenant, client_key_id, audit)

    # learnt health -----------------------------------------------------------

    def _health_upsert(self, table: str, columns: str, key: str) -> str:
        """Insert or rewrite one health row; returns a row only if it changed."""
        return (
            f"INSERT INTO {table} ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
            f"ON CONFLICT ({key}) DO UPDATE SET state = excluded.state, until = excluded.until, "
            "reason = excluded.reason, updated_at = excluded.updated_at "
            f"WHERE {self._health_changed.format(t=table)} RETURNING 1"
        )

    async def put_key_health(self, health: KeyHealth) -> int | None:
        values = _rows.key_health_values(health, self._encoding)
        async with self._transaction() as conn:
            await self._require_key(conn, health.tenant, health.key_id)
            if health.state is HealthState.HEALTHY:
                sql = "DELETE FROM key_health WHERE key_id = ? AND model = ?"
                changed = await self._execute(conn, sql, (health.key_id, health.model)) > 0
                op = ChangeOp.DELETE
            else:
                sql = self._health_upsert("key_health", _rows.KEY_HEALTH_COLUMNS, "key_id, model")
                changed = await self._fetchone(conn, sql, values) is not None
                op = ChangeOp.PUT
            if not changed:
                return None
            return await self._log(conn, health.tenant, EntityKind.KEY_HEALTH, health.entity_id, op)

    async def get_key_health(self, tenant: str, key_id: str, model: str) -> KeyHealth | None:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {_rows.KEY_HEALTH_COLUMNS} FROM key_health "  # noqa: S608
                "WHERE tenant = ? AND key_id = ? AND model = ?",
                (tenant, key_id, model),
            )
        return None if row is None else _rows.key_health(row, self._encoding)

    async def list_key_health(self, tenant: str) -> list[KeyHealth]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                f"SELECT {_rows.KEY_HEALTH_COLUMNS} FROM key_health WHERE tenant = ? "  # noqa: S608
                f"ORDER BY key_id{self._bytewise}, model{self._bytewise}",
                (tenant,),
            )
        return [_rows.key_health(r, self._encoding) for r in rows]

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
        values = _rows.provider_health_values(health, self._encoding)
        async with self._transaction() as conn:
            await self._require_tenant(conn, health.tenant, lock=True)
            if health.state is HealthState.HEALTHY:
                sql = "DELETE FROM provider_health WHERE tenant = ? AND provider = ? AND model = ?"
                changed = await self._execute(conn, sql, (health.tenant, health.provider.value, health.model)) > 0
                op = ChangeOp.DELETE
            else:
                sql = self._health_upsert("provider_health", _rows.PROVIDER_HEALTH_COLUMNS, "tenant, provider, model")
                changed = await self._fetchone(conn, sql, values) is not None
                op = ChangeOp.PUT
            if not changed:
                return None
            return await self._log(conn, health.tenant, EntityKind.PROVIDER_HEALTH, health.entity_id, op)

    async def get_provider_health(self, tenant: str, provider: Provider, model: str) -> ProviderHealth | None:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {_rows.PROVIDER_HEALTH_COLUMNS} FROM provider_health "  # noqa: S608
                "WHERE tenant = ? AND provider = ? AND model = ?",
                (tenant, provider.value, model),
            )
        return None if row is None else _rows.provider_health(row, self._encoding)

    async def list_provider_health(self, tenant: str) -> list[ProviderHealth]:
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                f"SELECT {_rows.PROVIDER_HEALTH_COLUMNS} FROM provider_health WHERE tenant = ? "  # noqa: S608
                f"ORDER BY provider{self._bytewise}, model{self._bytewise}",
                (tenant,),
            )
        return [_rows.provider_health(r, self._encoding) for r in rows]
