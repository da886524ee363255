"""open_store: URL -> store."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.store import PostgresStore, SqliteStore, open_store
from tests.store import factories as f


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
async def test_sqlite_memory(url: str) -> None:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    try:
        await store.migrate()
        await store.create_tenant(f.tenant())
        assert await store.list_tenants() == [f.tenant()]
    finally:
        await store.close()


async def test_sqlite_file_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = tmp_path / "abs" / "keyplane.db"
    store = open_store(f"sqlite:///{absolute}")  # sqlite:////tmp/... -> absolute path
    assert isinstance(store, SqliteStore)
    try:
        await store.migrate()
    finally:
        await store.close()
    assert absolute.exists()

    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///rel/keyplane.db")
    try:
        await relative.migrate()
    finally:
        await relative.close()
    assert (tmp_path / "rel" / "keyplane.db").exists()


@pytest.mark.parametrize(
    ("url", "schema"),
    [
        ("postgresql://postgres@127.0.0.1:5432/test", "keyplane"),
        ("postgres://postgres@127.0.0.1/test?schema=kp_a", "kp_a"),
        ("postgresql://u:pw@db:5432/kp?sslmode=disable&schema=tenant_x", "tenant_x"),
    ],
)
def test_postgres_urls(url: str, schema: str) -> None:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    assert store.schema == schema
    assert "pw" not in repr(store)


@pytest.mark.parametrize(
    "url", ["mysql://root:s3cret@db/kp", "sqlite:/x.db", "sqlite:///", "", "keyplane.db", "http://x"]
)
def test_unsupported_urls(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///") as info:
        open_store(url)
    assert "s3cret" not in str(info.value)


def test_invalid_schema_name() -> None:
    with pytest.raises(ValueError, match="schema"):
        open_store("postgresql://h/db?schema=Robert';DROP")
