"""``Store.try_lease``: one holder at a time, never a wait, released on exit
(and, on Postgres, across replicas: two stores on one schema)."""

from __future__ import annotations

import asyncio

from control_plane.store import Store
from tests.store.conftest import Backend


async def test_one_holder_at_a_time_and_released_on_exit(store: Store) -> None:
    async with store.try_lease("probe:k1") as first:
        assert first
        async with store.try_lease("probe:k1") as second:
            assert not second
        async with store.try_lease("probe:k2") as other:
            assert other
    async with store.try_lease("probe:k1") as again:
        assert again


async def test_released_when_the_block_raises(store: Store) -> None:
    try:
        async with store.try_lease("probe:k1") as held:
            assert held
            raise RuntimeError("probe failed")
    except RuntimeError:
        pass
    async with store.try_lease("probe:k1") as again:
        assert again


async def test_replicas_on_postgres_exclude_each_other(pg_backend: Backend) -> None:
    one, two = pg_backend.open(), pg_backend.open()
    await one.migrate()
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def hold() -> None:
        async with one.try_lease("probe:k1") as held:
            assert held
            entered.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    async with two.try_lease("probe:k1") as held:
        assert not held
    leave.set()
    await task
    async with two.try_lease("probe:k1") as held:
        assert held
