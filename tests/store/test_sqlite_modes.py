"""The SQLite database and the -wal/-shm files SQLite puts next to it are
0600 (owner only), on real files under a permissive umask; files and data
directories that others can read are tightened, with a warning."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.store import SqliteStore
from keyplane.home import ensure_private_dir, ensure_private_file
from tests.store import factories as f


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual 022, so files would be 0644 unless created tighter."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]


@pytest.mark.usefixtures("permissive_umask")
async def test_a_new_database_and_its_wal_files_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keyplane.db"
    store = SqliteStore(str(path))
    try:
        await store.migrate()
        await store.create_tenant(f.tenant())
        # While the store is open (WAL mode) the -wal and -shm files exist.
        for file in (path, *companions(path)):
            assert file.exists(), file
            assert mode(file) == 0o600, (file, oct(mode(file)))
        assert mode(path.parent) == 0o700
    finally:
        await store.close()
    assert mode(path) == 0o600


@pytest.mark.usefixtures("permissive_umask")
async def test_existing_wide_files_are_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keyplane.db"
    first = SqliteStore(str(path))
    await first.migrate()
    await first.create_tenant(f.tenant())
    await first.close()
    path.chmod(0o644)  # what an older keyplane left behind
    wal, shm = companions(path)
    wal.touch(mode=0o666)  # a stray wal file from a crash
    wal.chmod(0o664)
    caplog.set_level(logging.WARNING, logger="keyplane.home")
    store = SqliteStore(str(path))
    try:
        assert [t.name for t in await store.list_tenants()] == ["acme"]
        for file in (path, wal, shm):
            assert mode(file) == 0o600, (file, oct(mode(file)))
    finally:
        await store.close()
    warned = [r.getMessage() for r in caplog.records if "tightened it to 0600" in r.getMessage()]
    assert len(warned) == 2
    assert "(mode 0644)" in warned[0] and str(path) in warned[0]


@pytest.mark.usefixtures("permissive_umask")
def test_private_dir_is_created_0700_and_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyplane.home")
    fresh = tmp_path / "a" / "home"
    ensure_private_dir(fresh)
    assert mode(fresh) == 0o700
    assert not caplog.records

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    ensure_private_dir(shared)
    assert mode(shared) == 0o700
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "(mode 0755)" in record.getMessage() and "0700" in record.getMessage()

    ensure_private_dir(shared)  # already private: nothing to say
    assert len(caplog.records) == 1


@pytest.mark.usefixtures("permissive_umask")
def test_private_file_keeps_content_and_is_never_wider(tmp_path: Path) -> None:
    path = tmp_path / "f"
    ensure_private_file(path)
    assert mode(path) == 0o600 and path.read_bytes() == b""
    path.write_bytes(b"data")
    path.chmod(0o640)
    ensure_private_file(path)
    assert mode(path) == 0o600 and path.read_bytes() == b"data"
