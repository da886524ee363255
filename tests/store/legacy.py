"""Rows as an older keyplane wrote them, straight into a store's database
(the current code no longer writes an old schema), for upgrade tests."""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

import asyncpg

from control_plane.store import PostgresStore, SqliteStore, Store
from keyplane.domain import ProviderKey, Route, Tenant
from tests.pg import PG_DSN


def _sqlite_value(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return value


async def execute(store: Store, sql: str, *params: Any) -> None:
    """Run one statement (``?`` placeholders) on the store's database."""
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store._path)
        try:
            with conn:
                conn.execute(sql, tuple(_sqlite_value(p) for p in params))
        finally:
            conn.close()
        return
    assert isinstance(store, PostgresStore)
    count = iter(range(1, len(params) + 1))
    pg_sql = re.sub(r"\?", lambda _: f"${next(count)}", sql)
    pg_params = [list(p) if isinstance(p, tuple) else p for p in params]
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{store.schema}"'})
    try:
        await conn.execute(pg_sql, *pg_params)
    finally:
        await conn.close()


async def insert_tenant(store: Store, tenant: Tenant) -> None:
    await execute(store, "INSERT INTO tenants (name, created_at) VALUES (?, ?)", tenant.name, tenant.created_at)
    await execute(
        store,
        "INSERT INTO changes (tenant, kind, entity_id, op, created_at) VALUES (?, 'tenant', ?, 'put', ?)",
        tenant.name,
        tenant.name,
        tenant.created_at,
    )


async def insert_provider_key(store: Store, key: ProviderKey) -> None:
    await execute(
        store,
        "INSERT INTO provider_keys (id, tenant, provider, label, base_url, status, weight, allowed_models, "
        "secret_ciphertext, fingerprint, last4, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        key.id,
        key.tenant,
        key.provider.value,
        key.label,
        key.base_url,
        key.status.value,
        key.weight,
        key.allowed_models,
        key.secret_ciphertext,
        key.fingerprint,
        key.last4,
        key.created_at,
        key.updated_at,
    )
    await execute(
        store,
        "INSERT INTO changes (tenant, kind, entity_id, op, created_at) VALUES (?, 'provider_key', ?, 'put', ?)",
        key.tenant,
        key.id,
        key.updated_at,
    )


async def insert_route(store: Store, route: Route, targets_json: str) -> None:
    await execute(
        store,
        "INSERT INTO routes (id, tenant, public_model, targets, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        route.id,
        route.tenant,
        route.public_model,
        targets_json,
        route.created_at,
        route.updated_at,
    )
