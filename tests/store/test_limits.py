"""Limits per client key or tenant, on SQLite and Postgres: put replaces,
unknown owners are NotFound, a deleted client key's limits stop being listed,
a deleted tenant takes its limits along, and the audit row rides along."""

from __future__ import annotations

import pytest

from control_plane.store import Store
from control_plane.store.base import AuditQuery
from keyplane.errors import NotFound
from keyplane.limit_set import LimitSet
from tests.store import factories as f
from tests.store.test_audit import entry


async def test_put_get_list_replace_and_clear(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_client_key(f.client_key("ck_1"))
    assert await store.get_limits("acme", "ck_1") is None
    key = LimitSet("acme", "ck_1", requests_per_minute=600, tokens_per_minute=90_000, updated_at=f.ts(1))
    tenant_wide = LimitSet("acme", "", daily_budget_micros=5_000_000, monthly_budget_micros=2**40, updated_at=f.ts(2))
    await store.put_limits(key, audit=entry("SetLimits", "limits", "acme/ck_1"))
    await store.put_limits(tenant_wide)
    assert await store.get_limits("acme", "ck_1") == key
    assert await store.list_limits("acme") == [tenant_wide, key]
    assert await store.list_limits() == [tenant_wide, key]
    replaced = LimitSet("acme", "ck_1", requests_per_minute=5, updated_at=f.ts(3))
    await store.put_limits(replaced)
    assert await store.get_limits("acme", "ck_1") == replaced
    assert await store.delete_limits("acme", "ck_1") is True
    assert await store.delete_limits("acme", "ck_1") is False
    assert await store.list_limits("acme") == [tenant_wide]
    [event] = await store.list_audit_events(AuditQuery(limit=10))
    assert event.entry.method == "SetLimits"


async def test_unknown_owners_are_not_found_and_nothing_is_written(store: Store) -> None:
    await store.create_tenant(f.tenant())
    with pytest.raises(NotFound):
        await store.put_limits(LimitSet("acme", "ck_nope", requests_per_minute=1, updated_at=f.ts(1)))
    with pytest.raises(NotFound):
        await store.put_limits(LimitSet("nope", "", requests_per_minute=1, updated_at=f.ts(1)))
    with pytest.raises(NotFound):
        await store.list_limits("nope")
    assert await store.list_limits() == []


async def test_deleted_client_keys_and_tenants_take_their_limits_along(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_client_key(f.client_key("ck_1"))
    await store.put_limits(LimitSet("acme", "ck_1", requests_per_minute=1, updated_at=f.ts(1)))
    await store.delete_client_key("acme", "ck_1")
    assert await store.list_limits("acme") == []
    await store.put_limits(LimitSet("acme", "", requests_per_minute=1, updated_at=f.ts(1)))
    await store.delete_tenant("acme")
    assert await store.list_limits() == []
