"""A keyring of master keys with ids: seal with the newest, open with the one
a ciphertext names.

Ciphertext formats (``secret_ciphertext`` in the store):

- v1 (legacy, one master key): ``0x01 | nonce(12) | AES-GCM(secret)``, with
  the provider key id as associated data. It names no master key; it opens
  with the key whose id is ``legacy_key_id`` of its bytes, else with any
  key of the ring that opens it.
- v2: ``0x02 | len(id) | id | nonce(12) | AES-GCM(secret)``, with the header
  (``0x02 | len(id) | id``) followed by the provider key id as associated
  data, so neither the master key id nor the row can be swapped.

Keyring file: one ``<id> <base64 32-byte key>`` per line, oldest first, the
last one is the primary (new secrets are sealed with it); blank lines and
``#`` comments are skipped. Key ids are 1-32 characters of ``A-Za-z0-9._-``.

Nothing here logs or formats key material; key ids are not secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyplane.crypto import MasterKeyError, SecretBox

__all__ = [
    "Keyring",
    "MasterKeys",
    "UnknownMasterKey",
    "as_master_keys",
    "ciphertext_key_id",
    "format_keyring",
    "legacy_key_id",
    "new_key_id",
    "parse_keyring",
    "validate_key_id",
]

_V1 = 0x01
_V2 = 0x02
_NONCE = 12
_TAG = 16
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


class UnknownMasterKey(MasterKeyError):
    """The ciphertext names a master key id that is not in the keyring."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"ciphertext is sealed with master key {key_id!r}, which is not in the keyring")
        self.key_id = key_id


def validate_key_id(key_id: str) -> str:
    if not _KEY_ID.fullmatch(key_id):
        raise MasterKeyError(f"master key id {key_id!r} must be 1-32 characters of A-Za-z0-9._-")
    return key_id


def legacy_key_id(key: bytes) -> str:
    """The stable id of a single (pre-keyring) master key: a hash of it,
    which reveals nothing about the key."""
    return "legacy-" + hashlib.sha256(b"keyplane master key id\0" + key).hexdigest()[:12]


def new_key_id(now: datetime | None = None) -> str:
    """A fresh id: the UTC date and 6 random hex digits, e.g. ``20250614-a1b2c3``."""
    when = now or datetime.now(UTC)
    return f"{when:%Y%m%d}-{secrets.token_hex(3)}"


def ciphertext_key_id(blob: bytes) -> str | None:
    """The master key id a v2 ciphertext names; None for a v1 (legacy) one.
    MasterKeyError for anything else."""
    if len(blob) >= 1 + _NONCE + _TAG and blob[0] == _V1:
        return None
    if len(blob) >= 2 and blob[0] == _V2:
        size = blob[1]
        if len(blob) >= 2 + size + _NONCE + _TAG:
            try:
                return blob[2 : 2 + size].decode("ascii")
            except UnicodeDecodeError:
                pass
    raise MasterKeyError("ciphertext has an unknown format")


class MasterKeys(Protocol):
    """What seals and opens provider secrets: a ``Keyring`` or a file-backed
    source of one (``keyplane.keyring_file.KeyringFile``)."""

    def current(self) -> Keyring:
        """The keyring as it is now."""

    def seal(self, secret: str, associated_data: str) -> bytes: ...

    def open(self, blob: bytes, associated_data: str) -> str: ...


class Keyring:
    """Master keys by id, oldest first; the last is the primary."""

    __slots__ = ("_aeads", "_boxes", "_ids", "_legacy_order")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise MasterKeyError("the keyring is empty")
        seen: set[str] = set()
        for key_id, key in keys:
            validate_key_id(key_id)
            if key_id in seen:
                raise MasterKeyError(f"master key id {key_id!r} appears twice in the keyring")
            if len(key) != 32:
                raise MasterKeyError(f"master key {key_id!r} must be 32 bytes, got {len(key)}")
            seen.add(key_id)
        self._ids = tuple(key_id for key_id, _ in keys)
        self._aeads = {key_id: AESGCM(key) for key_id, key in keys}
        self._boxes = {key_id: SecretBox(key) for key_id, key in keys}
        # v1 ciphertexts: the key that is its own legacy id first, then newest first.
        own = [key_id for key_id, key in keys if key_id == legacy_key_id(key)]
        self._legacy_order = tuple(own + [k for k in reversed(self._ids) if k not in own])

    @classmethod
    def single(cls, key: bytes) -> Keyring:
        """A one-key ring from a legacy single master key."""
        return cls([(legacy_key_id(key), key)])

    def __repr__(self) -> str:
        return f"Keyring(ids={list(self._ids)!r}, primary={self.primary_id!r})"

    @property
    def primary_id(self) -> str:
        return self._ids[-1]

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._aeads

    def current(self) -> Keyring:
        return self

    def seal(self, secret: str, associated_data: str) -> bytes:
        """Seal with the primary key (v2)."""
        key_id = self.primary_id
        header = bytes((_V2, len(key_id))) + key_id.encode("ascii")
        nonce = os.urandom(_NONCE)
        return header + nonce + self._aeads[key_id].encrypt(nonce, secret.encode(), header + associated_data.encode())

    def open(self, blob: bytes, associated_data: str) -> str:
        """Open with the key the ciphertext names (UnknownMasterKey when the
        ring lacks it; MasterKeyError when it does not open)."""
        key_id = ciphertext_key_id(blob)
        if key_id is None:
            return self._open_legacy(blob, associated_data)[1]
        aead = self._aeads.get(key_id)
        if aead is None:
            raise UnknownMasterKey(key_id)
        start = 2 + len(key_id)
        nonce = blob[start : start + _NONCE]
        try:
            plain = aead.decrypt(nonce, blob[start + _NONCE :], blob[:start] + associated_data.encode())
        except InvalidTag as exc:
            raise MasterKeyError(f"ciphertext does not open with master key {key_id!r}") from exc
        return plain.decode()

    def sealed_by(self, blob: bytes, associated_data: str) -> str | None:
        """The id of the master key that seals ``blob``: the id a v2
        ciphertext names, or the key of the ring that opens a v1 one (None
        when none does). MasterKeyError for an unknown format."""
        key_id = ciphertext_key_id(blob)
        if key_id is not None:
            return key_id
        try:
            return self._open_legacy(blob, associated_data)[0]
        except MasterKeyError:
            return None

    def _open_legacy(self, blob: bytes, associated_data: str) -> tuple[str, str]:
        for key_id in self._legacy_order:
            try:
                return key_id, self._boxes[key_id].open(blob, associated_data)
            except MasterKeyError:
                continue
        raise MasterKeyError("legacy ciphertext does not open with any master key in the keyring")


def parse_keyring(text: str, origin: str = "keyring") -> list[tuple[str, bytes]]:
    """The ``(id, key)`` entries of a keyring file, oldest first."""
    entries: list[tuple[str, bytes]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise MasterKeyError(f"{origin}:{number}: expected '<key id> <base64 key>'")
        key_id, encoded = parts
        try:
            validate_key_id(key_id)
        except MasterKeyError as exc:
            raise MasterKeyError(f"{origin}:{number}: {exc}") from None
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(f"{origin}:{number}: master key {key_id!r} is not valid base64") from None
        if len(key) != 32:
            raise MasterKeyError(f"{origin}:{number}: master key {key_id!r} must be 32 bytes, got {len(key)}")
        entries.append((key_id, key))
    if not entries:
        raise MasterKeyError(f"{origin}: no master keys")
    Keyring(entries)  # duplicate ids
    return entries


def format_keyring(entries: Iterable[tuple[str, bytes]]) -> str:
    lines = [
        "# keyplane master keyring: '<key id> <base64 key>' per line, oldest first; the last one seals new secrets.",
        *(f"{key_id} {base64.b64encode(key).decode()}" for key_id, key in entries),
    ]
    return "\n".join(lines) + "\n"


def as_master_keys(keys: SecretBox | MasterKeys) -> MasterKeys:
    """A single-key ``SecretBox`` as a one-key ring (its legacy id); anything else as is."""
    if isinstance(keys, SecretBox):
        return Keyring.single(keys._key)
    return keys
