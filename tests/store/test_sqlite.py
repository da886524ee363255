"""SQLite-only behaviour: file settings and an unusable file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from control_plane.store import SqliteStore
from control_plane.store.sqlite import MIGRATIONS
from keyplane.errors import Unavailable
from tests.store import factories as f


async def test_file_database_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "kp.db"
    store = SqliteStore(str(path))
    try:
        await store.migrate()
        await store.create_tenant(f.tenant())
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        applied = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert applied == [(m.version,) for m in MIGRATIONS]
    conn.close()


async def test_unusable_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    store = SqliteStore(str(path))
    try:
        with pytest.raises(Unavailable, match="sqlite store unavailable"):
            await store.migrate()
    finally:
        await store.close()


async def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "kp.db")
    a, b = SqliteStore(path), SqliteStore(path)
    try:
        await a.migrate()
        await b.migrate()
        await a.create_tenant(f.tenant())
        await b.create_tenant(f.tenant("other", 1))
        assert [t.name for t in await a.list_tenants()] == ["acme", "other"]
        assert await a.latest_version() == await b.latest_version() == 2
    finally:
        await a.close()
        await b.close()
