"""The persisted snapshot file: sealing, refusal of anything altered or foreign, atomic 0600 writes."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from sidecar.snapshot_file import (
    MAGIC,
    KeySource,
    SnapshotFileError,
    SnapshotKey,
    open_snapshot,
    read_snapshot_file,
    seal_snapshot,
    write_snapshot_file,
)
from tests.sidecar import protos as p

TOKEN = "kps-snapshot-file-token-0123456789"
SECRET = "sk-live-secret-in-the-snapshot-4242"


def _response(version: int = 17) -> bytes:
    return p.snapshot(
        version, p.tenant_state("acme", keys=[p.pkey("k1", SECRET)], client_keys=[p.client_key("c1", "kp-x")])
    ).SerializeToString()


def test_round_trip_keeps_version_time_and_contents() -> None:
    key = SnapshotKey.from_token(TOKEN)
    data = seal_snapshot(_response(17), 17, 1234.5, key)
    assert data.startswith(MAGIC)
    assert SECRET.encode() not in data and TOKEN.encode() not in data  # sealed, not just encoded
    opened = open_snapshot(data, key)
    assert (opened.version, opened.synced_at) == (17, 1234.5)
    assert opened.response.snapshot.tenants[0].keys[0].secret == SECRET
    # A fresh salt and nonce every time: two seals of the same state differ.
    assert seal_snapshot(_response(17), 17, 1234.5, key) != data


def test_another_token_or_a_key_file_does_not_open_it(tmp_path: Path) -> None:
    data = seal_snapshot(_response(), 17, 0.0, SnapshotKey.from_token(TOKEN))
    with pytest.raises(SnapshotFileError, match="another sidecar token or key file"):
        open_snapshot(data, SnapshotKey.from_token(TOKEN + "x"))
    key_file = tmp_path / "snapshot.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    with pytest.raises(SnapshotFileError, match="sealed under a key from SIDECAR_TOKEN"):
        open_snapshot(data, SnapshotKey.from_file(key_file))
    sealed = seal_snapshot(_response(), 17, 0.0, SnapshotKey.from_file(key_file))
    assert open_snapshot(sealed, SnapshotKey.from_file(key_file)).version == 17


@pytest.mark.parametrize("where", ["magic", "version", "synced_at", "salt", "ciphertext", "tag"])
def test_any_altered_byte_is_refused(where: str) -> None:
    key = SnapshotKey.from_token(TOKEN)
    data = bytearray(seal_snapshot(_response(), 17, 99.0, key))
    offset = {"magic": 0, "version": 12, "synced_at": 20, "salt": 28, "ciphertext": 60, "tag": len(data) - 1}[where]
    data[offset] ^= 0x01
    with pytest.raises(SnapshotFileError) as info:
        open_snapshot(bytes(data), key)
    assert TOKEN not in str(info.value) and SECRET not in str(info.value)


def test_truncated_foreign_and_future_files_are_refused() -> None:
    key = SnapshotKey.from_token(TOKEN)
    data = seal_snapshot(_response(), 17, 0.0, key)
    with pytest.raises(SnapshotFileError, match="too short"):
        open_snapshot(data[:40], key)
    with pytest.raises(SnapshotFileError):
        open_snapshot(data[:-5], key)
    with pytest.raises(SnapshotFileError, match="not a keyplane snapshot"):
        open_snapshot(b"{" + b"x" * 200, key)
    future = data[:8] + struct.pack(">H", 2) + data[10:]
    with pytest.raises(SnapshotFileError, match="format 2 is not supported"):
        open_snapshot(future, key)


def test_a_header_version_that_disagrees_with_the_contents_is_refused() -> None:
    key = SnapshotKey.from_token(TOKEN)
    with pytest.raises(SnapshotFileError, match="not the snapshot its header names"):
        open_snapshot(seal_snapshot(_response(17), 18, 0.0, key), key)


def test_write_is_atomic_private_and_replaces(tmp_path: Path) -> None:
    key = SnapshotKey.from_token(TOKEN)
    path = tmp_path / "state" / "sidecar.snapshot"
    assert read_snapshot_file(path, key) is None  # no file yet: nothing, no error
    write_snapshot_file(path, seal_snapshot(_response(1), 1, 0.0, key))
    write_snapshot_file(path, seal_snapshot(_response(2), 2, 0.0, key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["sidecar.snapshot"]  # no temporary file left behind
    found = read_snapshot_file(path, key)
    assert found is not None and found.version == 2


def test_the_key_never_shows_in_its_repr(tmp_path: Path) -> None:
    key = SnapshotKey.from_token(TOKEN)
    assert TOKEN not in repr(key) and key.source is KeySource.SIDECAR_TOKEN
    short = tmp_path / "short.key"
    short.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="fewer than 16 bytes"):
        SnapshotKey.from_file(short)
