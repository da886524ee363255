from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from keyplane.crypto import MASTER_KEY_ENV, MasterKeyError, SecretBox, fingerprint, last4, load_master_key


def test_seal_open_round_trip_and_binding_to_key_id() -> None:
    box = SecretBox(os.urandom(32))
    blob = box.seal("sk-live-abcdef123456", "pk_1")
    assert b"sk-live" not in blob
    assert box.open(blob, "pk_1") == "sk-live-abcdef123456"
    with pytest.raises(MasterKeyError):
        box.open(blob, "pk_2")  # a ciphertext copied onto another row does not open


def test_each_seal_uses_a_fresh_nonce() -> None:
    box = SecretBox(os.urandom(32))
    assert box.seal("same", "id") != box.seal("same", "id")


def test_wrong_master_key_does_not_open() -> None:
    blob = SecretBox(os.urandom(32)).seal("secret-value", "id")
    with pytest.raises(MasterKeyError, match="does not open"):
        SecretBox(os.urandom(32)).open(blob, "id")


def test_tampered_ciphertext_is_rejected() -> None:
    box = SecretBox(os.urandom(32))
    blob = bytearray(box.seal("secret-value", "id"))
    blob[-1] ^= 1
    with pytest.raises(MasterKeyError):
        box.open(bytes(blob), "id")
    with pytest.raises(MasterKeyError, match="unknown format"):
        box.open(b"\x02" + bytes(blob[1:]), "id")


def test_fingerprint_and_last4_do_not_reveal_the_secret() -> None:
    secret = "sk-proj-0123456789abcdef"
    fp = fingerprint(secret)
    assert len(fp) == 16 and secret not in fp
    assert last4(secret) == "cdef"
    assert last4("short") == ""  # too short to show any of it


def test_key_file_created_with_mode_0600_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    path = tmp_path / "home" / "master.key"
    with pytest.raises(MasterKeyError, match="no master key"):
        load_master_key(path)
    key = load_master_key(path, create=True)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key(path) == key


def test_env_master_key_wins_and_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = os.urandom(32)
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(raw).decode())
    assert load_master_key(tmp_path / "absent.key") == raw
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(b"too short").decode())
    with pytest.raises(MasterKeyError, match="32 bytes"):
        load_master_key(None)
    monkeypatch.setenv(MASTER_KEY_ENV, "not base64 !!")
    with pytest.raises(MasterKeyError, match="base64"):
        load_master_key(None)
