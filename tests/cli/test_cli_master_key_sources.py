"""Where ``keyplane control-plane`` and ``keyplane up`` take their master
keys from: the keyring file when it exists, else the single key."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from keyplane.crypto import MASTER_KEY_ENV, MasterKeyError
from keyplane.home import Home
from keyplane.keyring_file import KEYRING_ENV, write_keyring_file
from keyplane_cli import build_parser
from keyplane_cli.master_key import keyring_path, master_key_sources

KEY = os.urandom(32)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MASTER_KEY_ENV, raising=False)
    monkeypatch.delenv(KEYRING_ENV, raising=False)


def test_control_plane_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = tmp_path / "master.keyring"
    with pytest.raises(MasterKeyError, match="no master key"):
        master_key_sources(None, None)
    assert master_key_sources(None, keyring) == (b"", keyring)  # the keyring file alone
    key_file = tmp_path / "master.key"
    key_file.write_text(base64.b64encode(KEY).decode())
    assert master_key_sources(key_file, keyring) == (KEY, keyring)  # both: the single key until the file exists
    assert master_key_sources(key_file, None) == (KEY, None)
    monkeypatch.setenv(KEYRING_ENV, str(keyring))
    monkeypatch.setenv(MASTER_KEY_ENV, base64.b64encode(KEY).decode())
    assert master_key_sources(None, None) == (KEY, keyring)
    assert keyring_path(None) == keyring
    assert keyring_path(tmp_path / "x") == tmp_path / "x"


def test_up_sources(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    key, keyring = master_key_sources(None, None, home=home, create=True)
    assert keyring == home.root / "master.keyring"
    assert len(key) == 32 and stat.S_IMODE(home.master_key_file.stat().st_mode) == 0o600
    assert master_key_sources(None, None, home=home, create=True) == (key, keyring)
    # Once the keyring file exists, master.key is only a fallback and never created again.
    write_keyring_file(keyring, [("k1", KEY)])
    home.master_key_file.unlink()
    assert master_key_sources(None, None, home=home, create=True) == (b"", keyring)
    assert not home.master_key_file.exists()


def test_master_key_commands_parse() -> None:
    handlers: dict[str, object] = {}
    parser = build_parser(handlers)  # type: ignore[arg-type]
    args = parser.parse_args(["master-key", "rotate", "--keyring-file", "k", "--id", "x", "--batch-size", "7"])
    assert (args.group, args.action, args.keyring_file, args.id, args.batch_size) == (
        "master-key",
        "rotate",
        Path("k"),
        "x",
        7,
    )
    assert parser.parse_args(["master-key", "retire", "abc"]).key_id == "abc"
    assert parser.parse_args(["master-key", "rewrap", "--key-id", "k2"]).key_id == "k2"
    args = parser.parse_args(["control-plane", "--store", "sqlite://", "--master-keyring-file", "/r/k"])
    assert args.master_keyring_file == Path("/r/k")
    assert "master-key" in handlers
