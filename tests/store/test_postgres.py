"""Postgres-only behaviour: replicas, LISTEN/NOTIFY, outages."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from control_plane.store import PostgresStore
from keyplane.errors import Unavailable
from tests.pg import PG_DSN
from tests.store import factories as f
from tests.store.conftest import Backend


async def _wait_for(queue: asyncio.Queue[int], version: int, seconds: float = 2.0) -> None:
    """Other test runs may share the channel, so skip versions that are not ours."""
    async with asyncio.timeout(seconds):
        while await queue.get() != version:
            pass


async def test_listener_on_another_replica_hears_a_write(pg_backend: Backend) -> None:
    writer = pg_backend.open()
    await writer.migrate()
    reader = pg_backend.open()
    heard: asyncio.Queue[int] = asyncio.Queue()

    async def listener(version: int) -> None:
        await heard.put(version)

    await reader.listen_changes(listener)
    await writer.create_tenant(f.tenant())
    await _wait_for(heard, await writer.latest_version())
    await writer.create_provider_key(f.provider_key())
    await _wait_for(heard, await writer.latest_version())
    assert [c.entity_id for c in await reader.changes_since(0)] == ["acme", "pk_1"]


async def test_health_writes_notify_other_replicas(pg_backend: Backend) -> None:
    writer = pg_backend.open()
    await writer.migrate()
    reader = pg_backend.open()
    heard: asyncio.Queue[int] = asyncio.Queue()

    async def listener(version: int) -> None:
        await heard.put(version)

    await reader.listen_changes(listener)
    await writer.create_tenant(f.tenant())
    await writer.create_provider_key(f.provider_key())
    for model in ("", "gpt-4o"):
        version = await writer.put_key_health(f.key_health("pk_1", model))
        assert version is not None
        await _wait_for(heard, version)
    version = await writer.put_provider_health(f.provider_health())
    assert version is not None
    await _wait_for(heard, version)
    # Each entry a clear deletes is announced, the last one included.
    versions = await writer.clear_key_health("acme", "pk_1")
    assert len(versions) == 2
    await _wait_for(heard, versions[-1])
    assert await reader.list_key_health("acme") == []
    # A clear with nothing stored still announces the key-wide reset.
    [version] = await writer.clear_key_health("acme", "pk_1")
    await _wait_for(heard, version)


async def test_listener_survives_a_lost_connection(pg_backend: Backend) -> None:
    writer = pg_backend.open()
    await writer.migrate()
    reader = pg_backend.open()
    heard: asyncio.Queue[int] = asyncio.Queue()

    async def listener(version: int) -> None:
        await heard.put(version)

    await reader.listen_changes(listener)
    assert isinstance(reader, PostgresStore)
    listen_conn = reader._listen_conn
    assert listen_conn is not None
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", listen_conn.get_server_pid())
    finally:
        await admin.close()
    # A write while the LISTEN connection is down is caught up after reconnecting.
    await writer.create_tenant(f.tenant())
    await _wait_for(heard, await writer.latest_version(), seconds=5)
    await writer.create_tenant(f.tenant("other"))
    await _wait_for(heard, await writer.latest_version(), seconds=5)


async def test_concurrent_migrations_from_several_replicas(pg_backend: Backend) -> None:
    replicas = [pg_backend.open() for _ in range(4)]
    await asyncio.gather(*(r.migrate() for r in replicas))
    await replicas[0].create_tenant(f.tenant())
    assert await replicas[3].list_tenants() == [f.tenant()]


async def test_schemas_are_isolated(pg_backend: Backend) -> None:
    store = pg_backend.open()
    assert isinstance(store, PostgresStore)
    await store.migrate()
    await store.create_tenant(f.tenant())
    async with asyncio.timeout(10):
        other = PostgresStore(PG_DSN, schema=f"{store.schema}_b")
        try:
            await other.migrate()
            assert await other.list_tenants() == []
            assert await other.latest_version() == 0
        finally:
            await other.close()
            admin = await asyncpg.connect(PG_DSN)
            await admin.execute(f'DROP SCHEMA IF EXISTS "{other.schema}" CASCADE')
            await admin.close()


async def test_unreachable_database_is_unavailable_without_the_password() -> None:
    store = PostgresStore("postgresql://keyplane:hunter2-secret@127.0.0.1:1/test", connect_timeout=2)
    try:
        for attempt in (store.migrate(), store.list_tenants(), store.create_tenant(f.tenant())):
            with pytest.raises(Unavailable) as info:
                await attempt
            assert "hunter2-secret" not in str(info.value)
            assert "127.0.0.1:1/test" in str(info.value)
        assert "hunter2-secret" not in repr(store)
    finally:
        await store.close()


async def test_unknown_database_is_unavailable() -> None:
    dsn = PG_DSN.rsplit("/", 1)[0] + "/keyplane_no_such_db"
    store = PostgresStore(dsn)
    try:
        with pytest.raises(Unavailable):
            await store.migrate()
    finally:
        await store.close()
