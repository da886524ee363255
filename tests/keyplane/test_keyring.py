"""The master keyring: ciphertext formats, legacy ciphertexts, unknown key
ids, the keyring file (format, atomic 0600 writes, reload on change)."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest

from keyplane.crypto import MasterKeyError, SecretBox
from keyplane.keyring import (
    Keyring,
    UnknownMasterKey,
    ciphertext_key_id,
    format_keyring,
    legacy_key_id,
    new_key_id,
    parse_keyring,
)
from keyplane.keyring_file import KeyringFile, read_keyring_file, write_keyring_file

K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)


def test_seal_names_the_primary_key_and_opens_bound_to_the_row() -> None:
    ring = Keyring([("old", K1), ("new", K2)])
    assert ring.primary_id == "new" and ring.ids == ("old", "new")
    blob = ring.seal("sk-live-abcdef123456", "pk_1")
    assert b"sk-live" not in blob
    assert ciphertext_key_id(blob) == "new"
    assert ring.open(blob, "pk_1") == "sk-live-abcdef123456"
    assert ring.seal("x", "pk_1") != ring.seal("x", "pk_1")  # fresh nonces
    with pytest.raises(MasterKeyError):
        ring.open(blob, "pk_2")  # copied onto another row


def test_an_older_key_still_opens_what_it_sealed() -> None:
    old_blob = Keyring([("old", K1)]).seal("secret-one", "pk_1")
    ring = Keyring([("old", K1), ("new", K2)])
    assert ring.open(old_blob, "pk_1") == "secret-one"
    assert ring.sealed_by(old_blob, "pk_1") == "old"


def test_the_key_id_in_the_header_cannot_be_swapped() -> None:
    ring = Keyring([("aa", K1), ("bb", K2)])
    blob = ring.seal("secret-value", "pk_1")
    swapped = bytes((2, 2)) + b"aa" + blob[4:]
    with pytest.raises(MasterKeyError, match="does not open with master key 'aa'"):
        ring.open(swapped, "pk_1")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(MasterKeyError):
        ring.open(bytes(tampered), "pk_1")


def test_unknown_key_id_is_reported_by_id_only() -> None:
    blob = Keyring([("gone", K1)]).seal("secret-value", "pk_1")
    with pytest.raises(UnknownMasterKey) as info:
        Keyring([("other", K2)]).open(blob, "pk_1")
    assert info.value.key_id == "gone"
    assert "secret-value" not in str(info.value)
    assert Keyring([("other", K2)]).sealed_by(blob, "pk_1") == "gone"


def test_legacy_ciphertexts_open_with_the_single_key_under_its_stable_id() -> None:
    legacy = SecretBox(K1).seal("legacy-secret", "pk_1")  # what keyplane wrote before the keyring
    assert ciphertext_key_id(legacy) is None
    single = Keyring.single(K1)
    assert single.primary_id == legacy_key_id(K1) == legacy_key_id(K1)  # stable
    assert legacy_key_id(K1) != legacy_key_id(K2)
    assert base64.b64encode(K1).decode() not in legacy_key_id(K1)
    assert single.open(legacy, "pk_1") == "legacy-secret"
    # In a ring with newer keys, under its legacy id or any other id.
    assert Keyring([(legacy_key_id(K1), K1), ("new", K2)]).open(legacy, "pk_1") == "legacy-secret"
    ring = Keyring([("renamed", K1), ("new", K2)])
    assert ring.open(legacy, "pk_1") == "legacy-secret"
    assert ring.sealed_by(legacy, "pk_1") == "renamed"
    assert Keyring([("new", K2)]).sealed_by(legacy, "pk_1") is None
    with pytest.raises(MasterKeyError, match="does not open with any master key"):
        Keyring([("new", K2)]).open(legacy, "pk_1")


def test_malformed_ciphertexts_and_keyrings() -> None:
    for blob in (b"", b"\x01short", b"\x03" + bytes(40), b"\x02\x05ab"):
        with pytest.raises(MasterKeyError, match="unknown format"):
            ciphertext_key_id(blob)
    with pytest.raises(MasterKeyError, match="empty"):
        Keyring([])
    with pytest.raises(MasterKeyError, match="twice"):
        Keyring([("a", K1), ("a", K2)])
    with pytest.raises(MasterKeyError, match="32 bytes"):
        Keyring([("a", b"short")])
    with pytest.raises(MasterKeyError, match="1-32 characters"):
        Keyring([("has space", K1)])
    assert len(new_key_id()) == 15 and new_key_id() != new_key_id()


def test_keyring_file_format_round_trips_and_errors_name_the_line() -> None:
    text = format_keyring([("one", K1), ("two", K2)])
    assert text.startswith("#")
    assert parse_keyring("\n# note\n" + text + "\n") == [("one", K1), ("two", K2)]
    cases = {
        "one": ":1: expected",
        "bad! " + base64.b64encode(K1).decode(): ":1: master key id",
        "one not-base64!": ":1: master key 'one' is not valid base64",
        "one " + base64.b64encode(b"short").decode(): ":1: master key 'one' must be 32 bytes",
        "# only a comment": "no master keys",
    }
    for bad, message in cases.items():
        with pytest.raises(MasterKeyError, match=message) as info:
            parse_keyring(bad)
        assert base64.b64encode(K1).decode() not in str(info.value)


def test_write_keyring_file_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "master.keyring"
    write_keyring_file(path, [("one", K1)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    write_keyring_file(path, [("one", K1), ("two", K2)])
    assert read_keyring_file(path) == [("one", K1), ("two", K2)]
    assert path.stat().st_ino != inode  # replaced, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["master.keyring"]  # no temp file left
    with pytest.raises(MasterKeyError):
        write_keyring_file(path, [("one", K1), ("one", K2)])
    assert read_keyring_file(path) == [("one", K1), ("two", K2)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keyring_file_reloads_when_the_file_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "master.keyring"
    write_keyring_file(path, [("one", K1)])
    clock = Clock()
    keys = KeyringFile(path, check_interval=1.0, clock=clock)
    blob = keys.seal("secret-value", "pk_1")
    assert ciphertext_key_id(blob) == "one"

    write_keyring_file(path, [("one", K1), ("two", K2)])
    assert keys.current().primary_id == "one"  # not checked again yet
    clock.now = 1.0
    with caplog.at_level(logging.INFO):
        assert keys.current().primary_id == "two"
    assert keys.reloads == 1
    assert ciphertext_key_id(keys.seal("secret-value", "pk_1")) == "two"
    assert keys.open(blob, "pk_1") == "secret-value"
    assert base64.b64encode(K2).decode() not in caplog.text

    # A file that does not parse is ignored; the ring in memory stays.
    path.write_text("garbage\n")
    clock.now = 2.0
    with caplog.at_level(logging.WARNING):
        assert keys.current().ids == ("one", "two")
    assert "not reloaded" in caplog.text
    # So is a file that disappears.
    path.unlink()
    clock.now = 3.0
    assert keys.current().ids == ("one", "two")
    write_keyring_file(path, [("two", K2)])  # "one" retired
    clock.now = 4.0
    assert keys.current().ids == ("two",)
    with pytest.raises(UnknownMasterKey):
        keys.open(blob, "pk_1")


def test_an_unknown_key_id_rereads_the_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "master.keyring"
    write_keyring_file(path, [("one", K1)])
    keys = KeyringFile(path, check_interval=3600.0)
    other_replica = Keyring([("one", K1), ("two", K2)])
    blob = other_replica.seal("secret-value", "pk_1")
    write_keyring_file(path, [("one", K1), ("two", K2)])
    assert keys.open(blob, "pk_1") == "secret-value"
    with pytest.raises(UnknownMasterKey):
        keys.open(Keyring([("three", K3)]).seal("x", "pk_1"), "pk_1")


def test_the_single_key_is_the_ring_until_the_file_appears(tmp_path: Path) -> None:
    path = tmp_path / "master.keyring"
    with pytest.raises(MasterKeyError, match="does not exist"):
        KeyringFile(path)
    clock = Clock()
    keys = KeyringFile(path, fallback=K1, clock=clock)
    assert keys.current().ids == (legacy_key_id(K1),)
    legacy = SecretBox(K1).seal("legacy-secret", "pk_1")
    assert keys.open(legacy, "pk_1") == "legacy-secret"
    write_keyring_file(path, [(legacy_key_id(K1), K1), ("new", K2)])
    clock.now = 5.0
    assert keys.current().primary_id == "new"
    assert keys.open(legacy, "pk_1") == "legacy-secret"


def test_a_keyring_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "master.keyring"
    write_keyring_file(path, [("one", K1)])
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        KeyringFile(path)
    assert "accessible to other users" in caplog.text
    path.write_text("not a keyring")
    with pytest.raises(MasterKeyError):
        KeyringFile(path)
