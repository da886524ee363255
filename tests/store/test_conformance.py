"""One behaviour, two stores: every test runs on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from control_plane.store import ProviderKeyUpdate, RouteUpdate, Store
from keyplane.domain import ChangeOp, EntityKind
from keyplane.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from tests.store import factories as f
from tests.store.conftest import Backend

Change = tuple[str, EntityKind, str, ChangeOp]  # (tenant, kind, entity_id, op)


async def changes(store: Store, since: int = 0) -> list[Change]:
    return [(c.tenant, c.kind, c.entity_id, c.op) for c in await store.changes_since(since)]


@dataclass(frozen=True)
class Kind:
    """How to drive one tenant-owned entity type through the Store API."""

    entity_kind: EntityKind
    unique_field: str
    make: Callable[[str, str, str, int], Any]  # (id, tenant, unique name, n) -> entity
    create: Callable[[Store], Callable[[Any], Awaitable[Any]]]
    get: Callable[[Store], Callable[[str, str], Awaitable[Any]]]
    list: Callable[[Store], Callable[[str], Awaitable[list[Any]]]]
    delete: Callable[[Store], Callable[[str, str], Awaitable[None]]]


KINDS = {
    "provider_key": Kind(
        EntityKind.PROVIDER_KEY,
        "label",
        lambda i, t, u, n: f.provider_key(i, tenant=t, label=u, n=n),
        lambda s: s.create_provider_key,
        lambda s: s.get_provider_key,
        lambda s: s.list_provider_keys,
        lambda s: s.delete_provider_key,
    ),
    "route": Kind(
        EntityKind.ROUTE,
        "public_model",
        lambda i, t, u, n: f.route(i, tenant=t, public_model=u, n=n),
        lambda s: s.create_route,
        lambda s: s.get_route,
        lambda s: s.list_routes,
        lambda s: s.delete_route,
    ),
    "client_key": Kind(
        EntityKind.CLIENT_KEY,
        "label",
        lambda i, t, u, n: f.client_key(i, tenant=t, label=u, n=n),
        lambda s: s.create_client_key,
        lambda s: s.get_client_key,
        lambda s: s.list_client_keys,
        lambda s: s.delete_client_key,
    ),
}

kinds = pytest.mark.parametrize("kind", list(KINDS.values()), ids=list(KINDS))


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# migrations and lifecycle ------------------------------------------------------


async def test_empty_store(store: Store) -> None:
    assert await store.latest_version() == 0
    assert await store.changes_since(0) == []
    assert await store.list_tenants() == []


async def test_migrate_twice_is_a_noop(store: Store) -> None:
    await store.create_tenant(f.tenant())
    version = await store.latest_version()
    await store.migrate()
    await store.migrate()
    assert await store.list_tenants() == [f.tenant()]
    assert await store.latest_version() == version


async def test_data_survives_close_and_reopen(backend: Backend) -> None:
    first = backend.open()
    await first.migrate()
    await first.create_tenant(f.tenant())
    key = await first.create_provider_key(f.provider_key())
    version = await first.latest_version()
    await first.close()

    second = backend.open()
    await second.migrate()
    assert await second.list_tenants() == [f.tenant()]
    assert await second.get_provider_key("acme", key.id) == key
    assert await second.latest_version() == version
    await second.create_route(f.route())
    assert await second.latest_version() > version


async def test_closed_store_is_unavailable(store: Store) -> None:
    await store.close()
    with pytest.raises(Unavailable):
        await store.list_tenants()
    await store.close()  # idempotent


# tenants -----------------------------------------------------------------------


async def test_tenant_roundtrip(store: Store) -> None:
    created = await store.create_tenant(f.tenant())
    assert created == f.tenant()
    got = await store.get_tenant("acme")
    assert got == f.tenant()
    assert_utc(got.created_at)
    assert await changes(store) == [("acme", EntityKind.TENANT, "acme", ChangeOp.PUT)]


async def test_duplicate_tenant(store: Store) -> None:
    await store.create_tenant(f.tenant())
    with pytest.raises(AlreadyExists, match="tenant name 'acme' already exists"):
        await store.create_tenant(f.tenant(n=5))
    assert await store.list_tenants() == [f.tenant()]
    assert await store.latest_version() == 1


async def test_missing_tenant(store: Store) -> None:
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await store.get_tenant("ghost")
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await store.delete_tenant("ghost")
    assert await store.latest_version() == 0


async def test_list_tenants_ordered_by_creation(store: Store) -> None:
    for name, n in [("c", 2), ("b", 1), ("a", 1)]:
        await store.create_tenant(f.tenant(name, n))
    assert [t.name for t in await store.list_tenants()] == ["a", "b", "c"]


async def test_delete_tenant_cascades(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_tenant(f.tenant("other"))
    await store.create_provider_key(f.provider_key())
    await store.create_route(f.route())
    await store.create_client_key(f.client_key())
    kept = await store.create_provider_key(f.provider_key("pk_other", tenant="other"))
    version = await store.latest_version()

    await store.delete_tenant("acme")

    assert await changes(store, version) == [("acme", EntityKind.TENANT, "acme", ChangeOp.DELETE)]
    with pytest.raises(NotFound):
        await store.get_tenant("acme")
    with pytest.raises(NotFound):
        await store.get_provider_key("acme", "pk_1")
    # Re-creating the tenant shows the rows are gone, not merely hidden.
    await store.create_tenant(f.tenant())
    assert await store.list_provider_keys("acme") == []
    assert await store.list_routes("acme") == []
    assert await store.list_client_keys("acme") == []
    assert await store.list_provider_keys("other") == [kept]
    # ... and the old ids and names are free again.
    await store.create_provider_key(f.provider_key())


# every tenant-owned entity -----------------------------------------------------


@kinds
async def test_entity_roundtrip(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    entity = kind.make("e1", "acme", "one", 0)
    assert await kind.create(store)(entity) == entity
    got = await kind.get(store)("acme", "e1")
    assert got == entity
    assert_utc(got.created_at)
    assert await kind.list(store)("acme") == [entity]
    assert (await changes(store))[-1] == ("acme", kind.entity_kind, "e1", ChangeOp.PUT)
    assert await store.latest_version() == 2


@kinds
async def test_create_under_unknown_tenant(store: Store, kind: Kind) -> None:
    with pytest.raises(NotFound, match=r"^tenant 'ghost' not found$"):
        await kind.create(store)(kind.make("e1", "ghost", "one", 0))
    assert await store.latest_version() == 0
    assert await store.list_tenants() == []


@kinds
async def test_duplicate_unique_name(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    await store.create_tenant(f.tenant("other"))
    first = await kind.create(store)(kind.make("e1", "acme", "one", 0))
    version = await store.latest_version()
    with pytest.raises(AlreadyExists, match=f"{kind.unique_field} 'one' already exists in tenant 'acme'"):
        await kind.create(store)(kind.make("e2", "acme", "one", 1))
    assert await kind.list(store)("acme") == [first]
    assert await store.latest_version() == version
    # The name is unique per tenant only.
    await kind.create(store)(kind.make("e2", "other", "one", 1))


@kinds
async def test_duplicate_id(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    await kind.create(store)(kind.make("e1", "acme", "one", 0))
    version = await store.latest_version()
    with pytest.raises(AlreadyExists, match="id 'e1' already exists"):
        await kind.create(store)(kind.make("e1", "acme", "two", 1))
    assert await store.latest_version() == version


@kinds
async def test_missing_or_foreign_entity_is_not_found(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    await store.create_tenant(f.tenant("other"))
    entity = await kind.create(store)(kind.make("e1", "acme", "one", 0))
    version = await store.latest_version()
    for tenant, entity_id in [("acme", "nope"), ("other", "e1"), ("ghost", "e1")]:
        with pytest.raises(NotFound):
            await kind.get(store)(tenant, entity_id)
        with pytest.raises(NotFound):
            await kind.delete(store)(tenant, entity_id)
    assert await kind.get(store)("acme", "e1") == entity
    assert await store.latest_version() == version


@kinds
async def test_delete_entity(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    await kind.create(store)(kind.make("e1", "acme", "one", 0))
    version = await store.latest_version()
    await kind.delete(store)("acme", "e1")
    assert await changes(store, version) == [("acme", kind.entity_kind, "e1", ChangeOp.DELETE)]
    with pytest.raises(NotFound):
        await kind.get(store)("acme", "e1")
    assert await kind.list(store)("acme") == []
    with pytest.raises(NotFound):
        await kind.delete(store)("acme", "e1")
    assert await store.latest_version() == version + 1


@kinds
async def test_list_ordered_by_created_at_then_id(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    for entity_id, name, n in [("c", "n1", 2), ("b", "n2", 1), ("a", "n3", 1), ("d", "n4", 0)]:
        await kind.create(store)(kind.make(entity_id, "acme", name, n))
    assert [e.id for e in await kind.list(store)("acme")] == ["d", "a", "b", "c"]


@kinds
async def test_list_of_unknown_tenant(store: Store, kind: Kind) -> None:
    with pytest.raises(NotFound, match="tenant 'ghost' not found"):
        await kind.list(store)("ghost")


@kinds
async def test_naive_timestamp_is_rejected(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    entity = replace(kind.make("e1", "acme", "one", 0), created_at=datetime(2024, 1, 1))
    with pytest.raises(InvalidArgument):
        await kind.create(store)(entity)
    assert await kind.list(store)("acme") == []
    assert await store.latest_version() == 1


@kinds
async def test_concurrent_creates_of_one_name(store: Store, kind: Kind) -> None:
    await store.create_tenant(f.tenant())
    version = await store.latest_version()
    results = await asyncio.gather(
        *(kind.create(store)(kind.make(f"e{i}", "acme", "same", i)) for i in range(4)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, AlreadyExists) for r in results) == 3
    assert len(await kind.list(store)("acme")) == 1
    assert len(await store.changes_since(version)) == 1


async def test_non_utc_timestamps_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    await store.create_tenant(f.tenant())
    key = replace(f.provider_key(), created_at=f.T0.astimezone(plus2), updated_at=f.ts(1).astimezone(plus2))
    await store.create_provider_key(key)
    got = await store.get_provider_key("acme", key.id)
    assert got.created_at == f.T0
    assert got.updated_at == f.ts(1)
    assert_utc(got.created_at)
    assert_utc(got.updated_at)


# updates: tests/store/test_updates.py


# change log --------------------------------------------------------------------


async def test_every_write_appends_one_change(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_provider_key(f.provider_key())
    await store.update_provider_key("acme", "pk_1", ProviderKeyUpdate(updated_at=f.ts(1), weight=9))
    await store.create_route(f.route())
    await store.update_route("acme", "rt_1", RouteUpdate(updated_at=f.ts(1), public_model="x"))
    await store.create_client_key(f.client_key())
    await store.delete_client_key("acme", "ck_1")
    await store.delete_route("acme", "rt_1")
    await store.delete_provider_key("acme", "pk_1")
    await store.delete_tenant("acme")
    expected = [
        ("acme", EntityKind.TENANT, "acme", ChangeOp.PUT),
        ("acme", EntityKind.PROVIDER_KEY, "pk_1", ChangeOp.PUT),
        ("acme", EntityKind.PROVIDER_KEY, "pk_1", ChangeOp.PUT),
        ("acme", EntityKind.ROUTE, "rt_1", ChangeOp.PUT),
        ("acme", EntityKind.ROUTE, "rt_1", ChangeOp.PUT),
        ("acme", EntityKind.CLIENT_KEY, "ck_1", ChangeOp.PUT),
        ("acme", EntityKind.CLIENT_KEY, "ck_1", ChangeOp.DELETE),
        ("acme", EntityKind.ROUTE, "rt_1", ChangeOp.DELETE),
        ("acme", EntityKind.PROVIDER_KEY, "pk_1", ChangeOp.DELETE),
        ("acme", EntityKind.TENANT, "acme", ChangeOp.DELETE),
    ]
    assert await changes(store) == expected
    records = await store.changes_since(0)
    versions = [r.version for r in records]
    assert versions == sorted(set(versions))
    assert await store.latest_version() == versions[-1]
    for record in records:
        assert_utc(record.created_at)


async def test_changes_since_and_limit(store: Store) -> None:
    for i in range(5):
        await store.create_tenant(f.tenant(f"t{i}", i))
    everything = await store.changes_since(0)
    assert [c.entity_id for c in everything] == ["t0", "t1", "t2", "t3", "t4"]
    v = [c.version for c in everything]
    assert [c.entity_id for c in await store.changes_since(v[1])] == ["t2", "t3", "t4"]
    assert [c.entity_id for c in await store.changes_since(v[1], limit=2)] == ["t2", "t3"]
    assert await store.changes_since(v[4]) == []
    assert await store.changes_since(0, limit=0) == []


async def test_concurrent_writes_get_distinct_increasing_versions(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await asyncio.gather(*(store.create_provider_key(f.provider_key(f"pk_{i}", label=f"l{i}")) for i in range(20)))
    records = await store.changes_since(1)
    assert len(records) == 20
    assert sorted({r.entity_id for r in records}) == sorted(f"pk_{i}" for i in range(20))
    versions = [r.version for r in records]
    assert versions == sorted(set(versions))
