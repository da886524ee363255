"""Postgres outages a store call must answer with ``Unavailable`` (gRPC
UNAVAILABLE), never an internal error or a hang: a backend killed in the
middle of a transaction or between two calls (``pg_terminate_backend`` from
a second connection), and a database that stalls (a lock held elsewhere)
longer than the command timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from control_plane.store import PostgresStore
from keyplane.errors import Unavailable
from tests.pg import PG_DSN
from tests.store import factories as f
from tests.store.conftest import Backend


@asynccontextmanager
async def locked(schema: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection holding ``table`` in ACCESS EXCLUSIVE mode (every
    read and write of it waits) until the block ends."""
    conn = await asyncpg.connect(PG_DSN, timeout=3)
    try:
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{schema}".{table} IN ACCESS EXCLUSIVE MODE')
            yield conn
    finally:
        await conn.close()


async def blocked_pid(admin: asyncpg.Connection, locker: asyncpg.Connection) -> int:
    """The backend waiting for ``locker``'s lock (the store's connection)."""
    async with asyncio.timeout(5):
        while True:
            pids = await admin.fetch(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", locker.get_server_pid()
            )
            if pids:
                assert len(pids) == 1, pids
                return int(pids[0]["pid"])
            await asyncio.sleep(0.02)


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PG_DSN, timeout=3)
    yield conn
    await conn.close()


async def one_connection_store(pg_backend: Backend, **options: Any) -> PostgresStore:
    """A migrated store on ``pg_backend``'s schema with a pool of one connection."""
    first = pg_backend.open()
    assert isinstance(first, PostgresStore)
    await first.migrate()
    await first.create_tenant(f.tenant())
    await first.close()
    store = PostgresStore(PG_DSN, schema=first.schema, min_size=1, max_size=1, **options)
    pg_backend._opened.append(store)  # closed with the backend
    return store


async def test_backend_killed_mid_transaction_is_unavailable(pg_backend: Backend, admin: asyncpg.Connection) -> None:
    store = await one_connection_store(pg_backend)
    async with locked(store.schema, "provider_keys") as locker:
        write = asyncio.create_task(store.create_provider_key(f.provider_key()))
        pid = await blocked_pid(admin, locker)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(Unavailable, match="unavailable"):
            await write
    # The pool replaces the dead connection: the next calls work.
    await store.create_provider_key(f.provider_key())
    assert [k.id for k in await store.list_provider_keys("acme")] == ["pk_1"]


async def test_backend_killed_between_calls_is_unavailable(pg_backend: Backend, admin: asyncpg.Connection) -> None:
    """A pooled connection whose backend was killed while idle: the next call
    on it fails (asyncpg says ConnectionDoesNotExistError or, depending on
    timing, InternalClientError "cannot switch to state ..."), as Unavailable."""
    store = await one_connection_store(pg_backend)
    calls: list[Callable[[int], Awaitable[object]]] = [
        lambda n: store.create_tenant(f.tenant(f"t{n}")),
        lambda n: store.list_tenants(),
    ]
    failures: list[Unavailable] = []
    successes = 0
    for round_ in range(12):
        # Learn the pid of the pool's only connection: make it wait for a lock.
        async with locked(store.schema, "tenants") as locker:
            read = asyncio.create_task(store.list_tenants())
            pid = await blocked_pid(admin, locker)
        await read
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        try:
            await calls[round_ % 2](round_)
        except Unavailable as exc:  # anything else fails the test
            failures.append(exc)
        else:
            successes += 1
        await store.list_tenants()  # and the store recovers at once
    assert failures, "no call ever met the killed connection"


async def test_a_stalled_database_fails_within_the_command_timeout(
    pg_backend: Backend, admin: asyncpg.Connection
) -> None:
    store = await one_connection_store(pg_backend, command_timeout=0.5)
    async with locked(store.schema, "tenants"):
        for call in (lambda: store.create_tenant(f.tenant("beta")), store.list_tenants):
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"no answer within 0\.5 s"):
                await call()
            assert 0.4 < time.monotonic() - started < 2.0
    # The cancelled statements left the connection usable.
    await store.create_tenant(f.tenant("beta"))
    assert [t.name for t in await store.list_tenants()] == ["acme", "beta"]


async def test_a_stalled_database_fails_a_waiting_caller_too(pg_backend: Backend) -> None:
    """With the only pooled connection stuck, a second call waiting for a
    connection is bounded by the same timeout."""
    store = await one_connection_store(pg_backend, command_timeout=0.5)
    async with locked(store.schema, "tenants"):
        started = time.monotonic()
        results = await asyncio.gather(store.list_tenants(), store.get_tenant("acme"), return_exceptions=True)
        elapsed = time.monotonic() - started
    assert all(isinstance(r, Unavailable) for r in results), results
    assert elapsed < 2.5


def test_command_timeout_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="command_timeout"):
            PostgresStore(PG_DSN, command_timeout=bad)
