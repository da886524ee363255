"""Secrets at rest: AES-256-GCM under a master key, and what may be shown.

The master key comes from ``KEYPLANE_MASTER_KEY`` (base64 of 32 bytes) or a
key file holding the same; the embedded default creates the file with mode
0600 on first run. Nothing here logs or formats a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MASTER_KEY_ENV",
    "MasterKeyError",
    "SecretBox",
    "fingerprint",
    "last4",
    "load_master_key",
]

MASTER_KEY_ENV = "KEYPLANE_MASTER_KEY"
_NONCE_BYTES = 12
_FORMAT_V1 = b"\x01"


class MasterKeyError(Exception):
    """The master key is missing, malformed, or does not open a ciphertext."""


def _decode_master_key(text: str, origin: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MasterKeyError(f"master key from {origin} is not valid base64") from exc
    if len(raw) != 32:
        raise MasterKeyError(f"master key from {origin} must be 32 bytes, got {len(raw)}")
    return raw


def load_master_key(key_file: Path | None, *, create: bool = False) -> bytes:
    """Return the 32-byte master key from the environment or ``key_file``.

    With ``create`` and no key anywhere, a new random key is written to
    ``key_file`` with mode 0600.
    """
    env_value = os.environ.get(MASTER_KEY_ENV)
    if env_value:
        return _decode_master_key(env_value, MASTER_KEY_ENV)
    if key_file is None:
        raise MasterKeyError(f"no master key: set {MASTER_KEY_ENV} or give a key file")
    if key_file.exists():
        return _decode_master_key(key_file.read_text(), str(key_file))
    if not create:
        raise MasterKeyError(f"no master key: set {MASTER_KEY_ENV} or create {key_file}")
    key = AESGCM.generate_key(bit_length=256)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
    return key


class SecretBox:
    """Seals provider key secrets. The associated data binds a ciphertext to
    its key id, so a ciphertext copied onto another row does not open."""

    __slots__ = ("_aead", "_key")

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise MasterKeyError("master key must be 32 bytes")
        self._key = master_key  # for keyplane.keyring.as_master_keys; never shown
        self._aead = AESGCM(master_key)

    def __repr__(self) -> str:
        return "SecretBox(***)"

    def seal(self, secret: str, associated_data: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), associated_data.encode())
        return _FORMAT_V1 + nonce + sealed

    def open(self, blob: bytes, associated_data: str) -> str:
        if not blob.startswith(_FORMAT_V1) or len(blob) < 1 + _NONCE_BYTES + 16:
            raise MasterKeyError("ciphertext has an unknown format")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            plain = self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], associated_data.encode())
        except InvalidTag as exc:
            raise MasterKeyError("ciphertext does not open with this master key") from exc
        return plain.decode()


def fingerprint(secret: str) -> str:
    """First 16 hex characters of SHA-256: identifies a secret without revealing it."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def last4(secret: str) -> str:
    return secret[-4:] if len(secret) >= 8 else ""
