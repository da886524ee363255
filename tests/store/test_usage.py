"""Usage rollups and prices on SQLite and Postgres: upserts add up (also from two
store instances at once, as two replicas would), queries group, bucket, filter
and page, retention deletes old minutes, prices are per tenant and audited."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import pytest

from control_plane.store import Store
from control_plane.store.base import AuditEntry
from control_plane.usage import Price, UsageQuery, UsageRow, UsageTotals
from keyplane.domain import Provider, Tenant
from keyplane.errors import NotFound

from . import legacy
from .conftest import Backend

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a minute (and day) boundary


def row(minute: int, client: str = "ck_1", model: str = "gpt", key: str = "pk_1", **counts: int) -> UsageRow:
    totals = UsageTotals(**({"requests": 1, "input_tokens": 10, "output_tokens": 5} | counts))
    return UsageRow(minute, "acme", client, model, key, Provider.OPENAI, "gpt-4o-mini", totals)


async def test_rows_add_up_and_group(store: Store) -> None:
    await store.put_usage([row(T0), row(T0 + 60), row(T0, client="ck_2", cost_micros=7)])
    await store.put_usage([row(T0, failed_requests=1, cached_input_tokens=4, cost_micros=3)])
    everything = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600))
    assert everything == [
        (
            {},
            None,
            UsageTotals(
                requests=4, failed_requests=1, input_tokens=40, cached_input_tokens=4, output_tokens=20, cost_micros=10
            ),
        )
    ]
    by_client = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600, group_by=("client_key_id",)))
    assert [(g, t.requests, t.cost_micros) for g, _, t in by_client] == [
        ({"client_key_id": "ck_1"}, 3, 3),
        ({"client_key_id": "ck_2"}, 1, 7),
    ]
    per_minute = await store.query_usage(
        UsageQuery(start=T0, end=T0 + 3600, group_by=("tenant", "provider"), bucket=60)
    )
    assert [(b, g, t.requests) for g, b, t in per_minute] == [
        (T0, {"tenant": "acme", "provider": "openai"}, 3),
        (T0 + 60, {"tenant": "acme", "provider": "openai"}, 1),
    ]
    hourly = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600, bucket=3600))
    assert [(b, t.requests) for _, b, t in hourly] == [(T0, 4)]
    only = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600, filters={"client_key_id": "ck_2"}))
    assert [t.requests for _, _, t in only] == [1]
    assert await store.query_usage(UsageQuery(start=T0 + 120, end=T0 + 3600)) == []
    page = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600, group_by=("client_key_id",), limit=1, offset=1))
    assert [g for g, _, _ in page] == [{"client_key_id": "ck_2"}]


async def test_attempts_add_up_apart_from_requests(store: Store) -> None:
    """Migration 11's column: written, added up, summed and grouped like every counter."""
    failover = row(T0, key="pk_1", requests=0, attempts=1, input_tokens=0, output_tokens=0)
    await store.put_usage([failover, row(T0, key="pk_2", attempts=1)])
    await store.put_usage([row(T0, key="pk_1", failed_requests=1, attempts=3), row(T0 + 60, key="pk_2", attempts=2)])
    by_key = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600, group_by=("provider_key_id",)))
    assert [(g, t.requests, t.failed_requests, t.attempts) for g, _, t in by_key] == [
        ({"provider_key_id": "pk_1"}, 1, 1, 4),
        ({"provider_key_id": "pk_2"}, 2, 0, 3),
    ]
    [(_, _, total)] = await store.query_usage(UsageQuery(start=T0, end=T0 + 3600))
    assert (total.requests, total.failed_requests, total.attempts) == (3, 1, 7)


async def test_rows_from_before_attempts_keep_zero_attempts(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollup row written before migration 11 keeps its counters and reads attempts 0
    (its requests counted attempts); what is added to it later adds up."""
    old = backend.open()
    module = sys.modules[type(old).__module__]
    migrations = module.MIGRATIONS
    assert [m.version for m in migrations[10:11]] == [11]
    with monkeypatch.context() as patch:
        patch.setattr(module, "MIGRATIONS", migrations[:10])
        await old.migrate()
        await legacy.execute(
            old,
            "INSERT INTO usage_rollups (minute, tenant, client_key_id, public_model, provider_key_id, "
            "upstream_model, provider, requests, failed_requests, input_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            T0, "acme", "ck_1", "gpt", "pk_1", "gpt-4o-mini", "openai", 5, 2, 50,
        )  # fmt: skip
        await old.close()
    new = backend.open()
    try:
        await new.migrate()
        [(_, _, before)] = await new.query_usage(UsageQuery(start=T0, end=T0 + 60))
        assert (before.requests, before.failed_requests, before.input_tokens, before.attempts) == (5, 2, 50, 0)
        await new.put_usage([row(T0, attempts=2)])
        [(_, _, after)] = await new.query_usage(UsageQuery(start=T0, end=T0 + 60))
        assert (after.requests, after.attempts) == (6, 2)
    finally:
        await new.close()


async def test_concurrent_writers_add_up(backend: Backend, store: Store) -> None:
    """Two store instances (two replicas) adding to the same rows at once lose nothing."""
    a, b = store, backend.open()

    async def write(store: Store) -> None:
        for _ in range(10):
            await store.put_usage([row(T0), row(T0 + 60, key="pk_2")])

    await asyncio.gather(write(a), write(b))
    [(_, _, totals)] = await a.query_usage(UsageQuery(start=T0, end=T0 + 120))
    assert (totals.requests, totals.input_tokens) == (40, 400)


async def test_retention_sweeps_old_minutes(store: Store) -> None:
    await store.put_usage([row(T0), row(T0 + 60), row(T0 + 120)])
    assert await store.sweep_usage(T0 + 120) == 2
    assert [b for _, b, _ in await store.query_usage(UsageQuery(start=T0, end=T0 + 600, bucket=60))] == [T0 + 120]


async def test_prices_are_per_tenant_replaced_and_audited(store: Store) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    await store.create_tenant(Tenant(name="acme", created_at=now))
    price = Price("acme", Provider.OPENAI, "gpt-4o-mini", 150_000, 75_000, 600_000, now)
    audit = AuditEntry(
        time=now,
        caller="admin",
        method="SetPrice",
        tenant="acme",
        resource_kind="price",
        resource_id="openai:gpt-4o-mini",
    )
    assert await store.put_price(price, audit=audit) == price
    dearer = Price("acme", Provider.OPENAI, "gpt-4o-mini", 300_000, 150_000, 1_200_000, now)
    await store.put_price(dearer)
    assert await store.list_prices("acme") == [dearer]
    assert await store.list_prices(None) == [dearer]
    assert await store.list_prices("globex") == []
    with pytest.raises(NotFound):
        await store.put_price(Price("globex", Provider.OPENAI, "m", 1, 1, 1, now))
    await store.delete_price("acme", Provider.OPENAI, "gpt-4o-mini")
    with pytest.raises(NotFound):
        await store.delete_price("acme", Provider.OPENAI, "gpt-4o-mini")
    assert await store.list_prices("acme") == []
