"""Store fixtures: every conformance test runs against SQLite and Postgres.

Postgres: each test gets its own schema ``kp_test_<hex>`` in database ``test``
(override the server with ``KEYPLANE_TEST_PG_DSN``), dropped afterwards. When
Postgres is unreachable the tests fail under ``CI=true`` and skip otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from control_plane.store import PostgresStore, SqliteStore, Store
from tests.pg import PG_DSN
from tests.pg import admin_connection as _admin_connection


class Backend:
    """Opens stores on one database (SQLite file or Postgres schema) and closes them all at the end."""

    def __init__(self, name: str, factory: Callable[[], Store]) -> None:
        self.name = name
        self._factory = factory
        self._opened: list[Store] = []

    def open(self) -> Store:
        store = self._factory()
        self._opened.append(store)
        return store

    async def close_all(self) -> None:
        for store in self._opened:
            await store.close()


@asynccontextmanager
async def postgres_backend() -> AsyncIterator[Backend]:
    admin = await _admin_connection()
    schema = f"kp_test_{uuid.uuid4().hex}"
    backend = Backend("postgres", lambda: PostgresStore(PG_DSN, schema=schema, max_size=4))
    try:
        yield backend
    finally:
        try:
            await backend.close_all()
        finally:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await admin.close()


@asynccontextmanager
async def sqlite_backend(directory: Path) -> AsyncIterator[Backend]:
    path = str(directory / "keyplane.db")
    backend = Backend("sqlite", lambda: SqliteStore(path))
    try:
        yield backend
    finally:
        await backend.close_all()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        async with sqlite_backend(tmp_path) as b:
            yield b
    else:
        async with postgres_backend() as b:
            yield b


@pytest.fixture
async def pg_backend() -> AsyncIterator[Backend]:
    async with postgres_backend() as b:
        yield b


@pytest.fixture
async def store(backend: Backend) -> Store:
    """A migrated store; closed by ``backend``."""
    s = backend.open()
    await s.migrate()
    return s
