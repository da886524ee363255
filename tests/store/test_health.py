"""Learnt key and provider health: conformance of both stores (SQLite and Postgres)."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from control_plane.store import PostgresStore, SqliteStore, Store
from keyplane.domain import ChangeOp, EntityKind, HealthState, KeyHealth, Provider
from keyplane.errors import InvalidArgument, NotFound
from tests.pg import PG_DSN
from tests.store import factories as f
from tests.store import legacy
from tests.store.conftest import Backend
from tests.store.test_conformance import assert_utc, changes

KH = EntityKind.KEY_HEALTH
PH = EntityKind.PROVIDER_HEALTH
PUT = ChangeOp.PUT
DELETE = ChangeOp.DELETE

COOLDOWN = HealthState.COOLDOWN
HEALTHY = HealthState.HEALTHY


async def two_keys(store: Store) -> int:
    """Tenants acme (keys pk_1, pk_2) and other (key pk_o); returns the version after."""
    await store.create_tenant(f.tenant())
    await store.create_tenant(f.tenant("other", 1))
    await store.create_provider_key(f.provider_key("pk_1", label="one"))
    await store.create_provider_key(f.provider_key("pk_2", label="two", n=1))
    await store.create_provider_key(f.provider_key("pk_o", tenant="other", label="one", n=2))
    return await store.latest_version()


def cooldown(key_id: str = "pk_1", model: str = "gpt-4o", *, seconds: int = 60, n: int = 1, **kw: str) -> KeyHealth:
    return f.key_health(key_id, model, state=COOLDOWN, until=f.ts(n + seconds), reason="429 rate limited", n=n, **kw)


# key health ---------------------------------------------------------------------


async def test_key_health_roundtrip_and_change_rows(store: Store) -> None:
    version = await two_keys(store)
    plus2 = timezone(timedelta(hours=2))
    wide = f.key_health("pk_1", "", n=1)
    per_model = replace(cooldown(n=2), until=f.ts(62).astimezone(plus2), updated_at=f.ts(2).astimezone(plus2))

    v1 = await store.put_key_health(wide)
    v2 = await store.put_key_health(per_model)

    assert v1 is not None and v2 is not None and version < v1 < v2 == await store.latest_version()
    assert await changes(store, version) == [("acme", KH, "pk_1/", PUT), ("acme", KH, "pk_1/gpt-4o", PUT)]
    assert [c.version for c in await store.changes_since(version)] == [v1, v2]
    got_wide = await store.get_key_health("acme", "pk_1", "")
    assert got_wide == wide
    assert got_wide is not None and got_wide.until is None
    assert_utc(got_wide.updated_at)
    got = await store.get_key_health("acme", "pk_1", "gpt-4o")
    assert got == per_model  # the same instants ...
    assert got is not None and got.until is not None
    assert_utc(got.until)  # ... in UTC
    assert_utc(got.updated_at)
    assert got.until == f.ts(62)
    assert await store.list_key_health("acme") == [wide, per_model]
    assert await store.list_key_health("other") == []


async def test_put_key_health_replaces_the_entry(store: Store) -> None:
    await two_keys(store)
    await store.put_key_health(cooldown(seconds=10, n=1))
    version = await store.latest_version()
    longer = cooldown(seconds=20, n=2)
    assert await store.put_key_health(longer) == version + 1
    assert await store.get_key_health("acme", "pk_1", "gpt-4o") == longer
    # A different state or reason, or until going from set to None, is a change too.
    unhealthy = replace(longer, state=HealthState.UNHEALTHY, until=None, updated_at=f.ts(3))
    assert await store.put_key_health(unhealthy) == version + 2
    other_reason = replace(unhealthy, reason="403 forbidden", updated_at=f.ts(4))
    assert await store.put_key_health(other_reason) == version + 3
    assert await store.list_key_health("acme") == [other_reason]
    assert await changes(store, version) == [("acme", KH, "pk_1/gpt-4o", PUT)] * 3


async def test_identical_key_health_is_a_noop(store: Store) -> None:
    await two_keys(store)
    first = cooldown(n=1)
    wide = f.key_health("pk_1", "", n=1)
    await store.put_key_health(first)
    await store.put_key_health(wide)
    version = await store.latest_version()
    # Same state, until and reason: nothing is written, not even updated_at.
    assert await store.put_key_health(replace(first, updated_at=f.ts(50))) is None
    assert await store.put_key_health(replace(wide, updated_at=f.ts(50))) is None
    assert await store.latest_version() == version
    assert await store.get_key_health("acme", "pk_1", "gpt-4o") == first
    assert await store.get_key_health("acme", "pk_1", "") == wide


async def test_healthy_deletes_the_key_entry(store: Store) -> None:
    await two_keys(store)
    await store.put_key_health(cooldown())
    await store.put_key_health(cooldown("pk_2"))
    version = await store.latest_version()
    healthy = f.key_health("pk_1", "gpt-4o", state=HEALTHY, reason="", n=5)
    assert await store.put_key_health(healthy) == version + 1
    assert await changes(store, version) == [("acme", KH, "pk_1/gpt-4o", DELETE)]
    assert await store.get_key_health("acme", "pk_1", "gpt-4o") is None
    assert [h.key_id for h in await store.list_key_health("acme")] == ["pk_2"]
    # HEALTHY for an absent entry changes nothing.
    assert await store.put_key_health(healthy) is None
    assert await store.put_key_health(f.key_health("pk_1", "", state=HEALTHY)) is None
    assert await store.latest_version() == version + 1


async def test_key_health_of_a_missing_or_foreign_key_is_not_found(store: Store) -> None:
    version = await two_keys(store)
    for health in [
        cooldown("pk_o"),  # a key of another tenant
        cooldown("nope"),
        f.key_health("pk_o", "", state=HEALTHY),
        cooldown("pk_1", tenant="other"),
    ]:
        with pytest.raises(NotFound, match=r"provider key '.*' not found in tenant '.*'"):
            await store.put_key_health(health)
    with pytest.raises(NotFound, match=r"^tenant 'ghost' not found$"):
        await store.put_key_health(cooldown(tenant="ghost"))
    for tenant, key_id in [("acme", "pk_o"), ("acme", "nope"), ("other", "pk_1")]:
        with pytest.raises(NotFound, match=f"provider key '{key_id}' not found in tenant '{tenant}'"):
            await store.clear_key_health(tenant, key_id)
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await store.clear_key_health("ghost", "pk_1")
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await store.list_key_health("ghost")
    assert await store.latest_version() == version
    assert await store.list_key_health("acme") == []
    assert await store.list_key_health("other") == []
    # Reads of absent entries are None, whatever is missing.
    await store.put_key_health(cooldown("pk_o", tenant="other"))
    assert await store.get_key_health("acme", "pk_o", "gpt-4o") is None
    assert await store.get_key_health("acme", "nope", "gpt-4o") is None
    assert await store.get_key_health("ghost", "pk_1", "gpt-4o") is None
    assert await store.get_key_health("acme", "pk_1", "gpt-4o") is None


async def test_clear_key_health(store: Store) -> None:
    await two_keys(store)
    for model in ["gpt-4o-mini", "", "gpt-4o"]:
        await store.put_key_health(cooldown("pk_1", model))
    kept = await store.put_key_health(cooldown("pk_2"))
    assert kept is not None
    version = await store.latest_version()

    versions = await store.clear_key_health("acme", "pk_1")

    assert versions == [version + 1, version + 2, version + 3]
    records = await store.changes_since(version)
    assert [(c.tenant, c.kind, c.entity_id, c.op) for c in records] == [
        ("acme", KH, "pk_1/", DELETE),
        ("acme", KH, "pk_1/gpt-4o", DELETE),
        ("acme", KH, "pk_1/gpt-4o-mini", DELETE),
    ]
    assert [c.version for c in records] == versions
    assert [h.key_id for h in await store.list_key_health("acme")] == ["pk_2"]


async def test_clear_key_health_always_logs_the_key_wide_reset(store: Store) -> None:
    """A reset must reach the sidecars even when the store held nothing (or
    nothing key-wide) for the key: their own findings may never have been
    reported. So the key-wide entry is always logged, first."""
    await two_keys(store)
    version = await store.latest_version()

    # Nothing stored at all.
    assert await store.clear_key_health("acme", "pk_1") == [version + 1]
    assert await changes(store, version) == [("acme", KH, "pk_1/", DELETE)]

    # Only a per-model entry stored: the key-wide reset comes too.
    await store.put_key_health(cooldown("pk_1", "gpt-4o"))
    version = await store.latest_version()
    assert await store.clear_key_health("acme", "pk_1") == [version + 1, version + 2]
    assert await changes(store, version) == [
        ("acme", KH, "pk_1/", DELETE),
        ("acme", KH, "pk_1/gpt-4o", DELETE),
    ]
    assert await store.list_key_health("acme") == []


async def test_key_health_goes_with_its_key(store: Store) -> None:
    await two_keys(store)
    await store.put_key_health(f.key_health("pk_1", ""))
    await store.put_key_health(cooldown("pk_1"))
    await store.put_key_health(cooldown("pk_2"))
    version = await store.latest_version()

    await store.delete_provider_key("acme", "pk_1")

    # Only the key's own change: its DELETE implies its health went.
    assert await changes(store, version) == [("acme", EntityKind.PROVIDER_KEY, "pk_1", DELETE)]
    assert [h.key_id for h in await store.list_key_health("acme")] == ["pk_2"]
    assert await store.get_key_health("acme", "pk_1", "") is None
    # A new key with the same id starts healthy.
    await store.create_provider_key(f.provider_key("pk_1", label="one", n=9))
    assert [h.key_id for h in await store.list_key_health("acme")] == ["pk_2"]


async def test_health_goes_with_its_tenant(store: Store) -> None:
    await two_keys(store)
    await store.put_key_health(cooldown("pk_1"))
    await store.put_provider_health(f.provider_health())
    await store.put_key_health(cooldown("pk_o", tenant="other"))
    await store.put_provider_health(f.provider_health(tenant="other"))
    version = await store.latest_version()

    await store.delete_tenant("acme")

    assert await changes(store, version) == [("acme", EntityKind.TENANT, "acme", DELETE)]
    await store.create_tenant(f.tenant())
    await store.create_provider_key(f.provider_key("pk_1", label="one"))
    assert await store.list_key_health("acme") == []
    assert await store.list_provider_health("acme") == []
    assert await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o") is None
    assert [h.key_id for h in await store.list_key_health("other")] == ["pk_o"]
    assert await store.list_provider_health("other") == [f.provider_health(tenant="other")]


async def test_list_key_health_ordered_by_key_then_model(store: Store) -> None:
    await two_keys(store)
    entries = [("pk_2", "gpt-4o"), ("pk_1", "gpt-4o-mini"), ("pk_2", ""), ("pk_1", "Claude"), ("pk_1", "gpt-4o")]
    for i, (key_id, model) in enumerate(entries):
        await store.put_key_health(cooldown(key_id, model, n=len(entries) - i))
    await store.put_key_health(cooldown("pk_o", tenant="other"))
    listed = await store.list_key_health("acme")
    assert [(h.key_id, h.model) for h in listed] == sorted(entries)
    assert {h.tenant for h in listed} == {"acme"}


async def test_naive_health_timestamps_are_rejected(store: Store) -> None:
    await two_keys(store)
    version = await store.latest_version()
    naive = datetime(2024, 1, 1)
    with pytest.raises(InvalidArgument):
        await store.put_key_health(replace(cooldown(), until=naive))
    with pytest.raises(InvalidArgument):
        await store.put_key_health(replace(cooldown(), updated_at=naive))
    with pytest.raises(InvalidArgument):
        await store.put_provider_health(replace(f.provider_health(), until=naive))
    with pytest.raises(InvalidArgument):
        await store.put_provider_health(replace(f.provider_health(), updated_at=naive))
    assert await store.latest_version() == version
    assert await store.list_key_health("acme") == []
    assert await store.list_provider_health("acme") == []


async def test_concurrent_identical_puts_log_once(store: Store) -> None:
    await two_keys(store)
    version = await store.latest_version()
    results = await asyncio.gather(*(store.put_key_health(cooldown(n=1)) for _ in range(4)))
    provider = await asyncio.gather(*(store.put_provider_health(f.provider_health()) for _ in range(4)))
    assert sum(r is not None for r in results) == 1
    assert sum(r is not None for r in provider) == 1
    assert await changes(store, version) == [("acme", KH, "pk_1/gpt-4o", PUT), ("acme", PH, "openai/gpt-4o", PUT)]


# provider health ----------------------------------------------------------------


async def test_provider_health_lifecycle(store: Store) -> None:
    await two_keys(store)
    version = await store.latest_version()
    plus5 = timezone(timedelta(hours=-5))
    degraded = replace(f.provider_health(n=1), until=f.ts(31).astimezone(plus5))

    v1 = await store.put_provider_health(degraded)
    got = await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o")
    assert got == degraded
    assert got is not None and got.until is not None
    assert_utc(got.until)
    assert_utc(got.updated_at)

    # Identical verdict: no-op, updated_at kept.
    assert await store.put_provider_health(replace(degraded, updated_at=f.ts(9))) is None
    assert await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o") == degraded
    # Replaced by a longer one, then by one without until.
    longer = f.provider_health(until=f.ts(90), n=2)
    v2 = await store.put_provider_health(longer)
    assert await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o") == longer
    open_ended = f.provider_health(until=None, n=3)
    v3 = await store.put_provider_health(open_ended)
    got = await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o")
    assert got == open_ended and got is not None and got.until is None
    # HEALTHY deletes.
    healthy = f.provider_health(state=HEALTHY, until=None, reason="", n=4)
    v4 = await store.put_provider_health(healthy)
    assert await store.get_provider_health("acme", Provider.OPENAI, "gpt-4o") is None
    assert await store.put_provider_health(healthy) is None

    assert [v1, v2, v3, v4] == [version + 1, version + 2, version + 3, version + 4]
    assert await changes(store, version) == [("acme", PH, "openai/gpt-4o", PUT)] * 3 + [
        ("acme", PH, "openai/gpt-4o", DELETE)
    ]
    assert await store.latest_version() == version + 4


async def test_provider_health_is_per_tenant_and_ordered(store: Store) -> None:
    await two_keys(store)
    entries = [
        (Provider.OPENAI, "gpt-4o"),
        (Provider.ANTHROPIC, "claude-sonnet"),
        (Provider.OPENAI, "gpt-4o-mini"),
        (Provider.GEMINI, "gemini-1.5-pro"),
        (Provider.ANTHROPIC, "claude-haiku"),
    ]
    for i, (provider, model) in enumerate(entries):
        await store.put_provider_health(f.provider_health(provider, model, n=i))
    other = await store.put_provider_health(f.provider_health(tenant="other"))
    assert other is not None
    listed = await store.list_provider_health("acme")
    assert [(h.provider.value, h.model) for h in listed] == sorted((p.value, m) for p, m in entries)
    assert await store.list_provider_health("other") == [f.provider_health(tenant="other")]
    # Clearing one tenant's entry leaves the other's.
    await store.put_provider_health(f.provider_health(state=HEALTHY))
    assert await store.get_provider_health("other", Provider.OPENAI, "gpt-4o") == f.provider_health(tenant="other")
    assert (await changes(store, other))[-1] == ("acme", PH, "openai/gpt-4o", DELETE)


async def test_provider_health_of_a_missing_tenant(store: Store) -> None:
    with pytest.raises(NotFound, match=r"^tenant 'ghost' not found$"):
        await store.put_provider_health(f.provider_health(tenant="ghost"))
    with pytest.raises(NotFound, match=r"^tenant 'ghost' not found$"):
        await store.put_provider_health(f.provider_health(tenant="ghost", state=HEALTHY))
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await store.list_provider_health("ghost")
    assert await store.get_provider_health("ghost", Provider.OPENAI, "gpt-4o") is None
    assert await store.latest_version() == 0


# upgrading a store made by the previous schema version ------------------------------


async def applied_migrations(store: Store) -> list[int]:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store._path) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        conn.close()
        return [int(r[0]) for r in rows]
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(PG_DSN)
    try:
        records = await conn.fetch(f'SELECT version FROM "{store.schema}".schema_migrations ORDER BY version')
    finally:
        await conn.close()
    return [int(r["version"]) for r in records]


async def test_upgrade_from_the_schema_before_health(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    old = backend.open()
    module = sys.modules[type(old).__module__]
    migrations = module.MIGRATIONS
    assert [m.version for m in migrations[:2]] == [1, 2]
    with monkeypatch.context() as patch:
        # The code before health: only migration 1 (its rows written as it wrote them).
        patch.setattr(module, "MIGRATIONS", migrations[:1])
        await old.migrate()
        await legacy.insert_tenant(old, f.tenant())
        key = f.provider_key()
        await legacy.insert_provider_key(old, key)
        await old.close()

    new = backend.open()
    assert await applied_migrations(new) == [1]
    await new.migrate()
    everything = [m.version for m in migrations]
    assert await applied_migrations(new) == everything
    version = await new.latest_version()
    assert version == 2
    assert await new.get_provider_key("acme", key.id) == key
    assert await new.put_key_health(cooldown()) == 3
    assert await new.put_provider_health(f.provider_health()) == 4
    # Migrating again (this store or another replica) changes nothing.
    await new.migrate()
    again = backend.open()
    await again.migrate()
    assert await applied_migrations(again) == everything
    assert await again.list_key_health("acme") == [cooldown()]
    assert await again.list_provider_health("acme") == [f.provider_health()]
    assert await again.latest_version() == 4
