"""The sidecar's persisted last-known-good snapshot: format, encryption and file I/O.

A sidecar restarted while the control plane is away serves from this file
(static stability). It holds provider secrets, so it is sealed with AES-256-GCM
under a key derived (HKDF-SHA256, a fresh random salt per write) from the
sidecar token or from a key file, and written atomically (temporary file,
fsync, rename, fsync of the directory) with mode 0600.

Layout (all integers big-endian)::

    magic      8 bytes  b"KPSNAP\\r\\n"
    format     u16      1
    key_source u8       1 = sidecar token, 2 = key file
    reserved   u8       0
    version    u64      the snapshot's version (as the control plane numbered it)
    synced_at  f64      epoch seconds when it was last known in sync
    salt       16 bytes HKDF salt
    nonce      12 bytes AES-GCM nonce
    ciphertext          AES-GCM(serialised WatchResponse with a snapshot), AAD = the header above

Everything in the header is authenticated, so a file whose version or time
was edited does not open. Any file that does not open (not ours, a newer
format, truncated, tampered, sealed under another token or key file) raises
``SnapshotFileError`` with a reason that never includes key material.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from keyplane.v1 import sidecar_service_pb2

__all__ = [
    "FORMAT_VERSION",
    "KeySource",
    "PersistedSnapshot",
    "SnapshotFileError",
    "SnapshotKey",
    "open_snapshot",
    "read_snapshot_file",
    "seal_snapshot",
    "write_snapshot_file",
]

MAGIC = b"KPSNAP\r\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHBBQd16s12s")
_INFO = b"keyplane sidecar snapshot v1"
# A snapshot is at most one watch message (64 MiB); refuse to read anything much larger.
_MAX_FILE_BYTES = 80 * 1024 * 1024


class SnapshotFileError(Exception):
    """The file cannot be used; the message says why (never with key material)."""


class KeySource(IntEnum):
    SIDECAR_TOKEN = 1
    KEY_FILE = 2


@dataclass(frozen=True, slots=True)
class SnapshotKey:
    """The secret the file key is derived from, and where it came from."""

    secret: bytes
    source: KeySource

    def __repr__(self) -> str:  # never show the secret
        return f"SnapshotKey(source={self.source.name})"

    @classmethod
    def from_token(cls, token: str) -> SnapshotKey:
        if not token:
            raise ValueError("an empty sidecar token cannot seal the snapshot file")
        return cls(token.encode(), KeySource.SIDECAR_TOKEN)

    @classmethod
    def from_file(cls, path: Path) -> SnapshotKey:
        secret = path.read_bytes().strip()
        if len(secret) < 16:
            raise ValueError(f"snapshot key file {path} holds fewer than 16 bytes")
        return cls(secret, KeySource.KEY_FILE)

    def derive(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(self.secret)


@dataclass(frozen=True, slots=True)
class PersistedSnapshot:
    version: int
    synced_at: float  # epoch seconds
    response: sidecar_service_pb2.WatchResponse


def seal_snapshot(payload: bytes, version: int, synced_at: float, key: SnapshotKey) -> bytes:
    """The file's bytes for ``payload`` (a serialised snapshot WatchResponse)."""
    salt = os.urandom(16)
    nonce = os.urandom(12)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, int(key.source), 0, version, synced_at, salt, nonce)
    return header + AESGCM(key.derive(salt)).encrypt(nonce, payload, header)


def open_snapshot(data: bytes, key: SnapshotKey) -> PersistedSnapshot:
    """The snapshot in ``data``, or ``SnapshotFileError``."""
    if len(data) < _HEADER.size + 16:
        raise SnapshotFileError("too short to be a snapshot file")
    header = data[: _HEADER.size]
    magic, fmt, source, _reserved, version, synced_at, salt, nonce = _HEADER.unpack(header)
    if magic != MAGIC:
        raise SnapshotFileError("not a keyplane snapshot file")
    if fmt != FORMAT_VERSION:
        raise SnapshotFileError(f"format {fmt} is not supported (this sidecar reads format {FORMAT_VERSION})")
    if source != int(key.source):
        wanted = KeySource(source).name if source in KeySource._value2member_map_ else str(source)
        raise SnapshotFileError(f"sealed under a key from {wanted}, this sidecar uses one from {key.source.name}")
    try:
        payload = AESGCM(key.derive(salt)).decrypt(nonce, data[_HEADER.size :], header)
    except InvalidTag:
        raise SnapshotFileError("does not open: sealed under another sidecar token or key file, or altered") from None
    response = sidecar_service_pb2.WatchResponse()
    try:
        response.ParseFromString(payload)
    except DecodeError:
        raise SnapshotFileError("its contents do not decode") from None
    if response.WhichOneof("payload") != "snapshot" or response.version != version:
        raise SnapshotFileError("its contents are not the snapshot its header names")
    return PersistedSnapshot(version=version, synced_at=synced_at, response=response)


def write_snapshot_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file or the new one, whole.

    Blocking (run it in a thread): temporary file in the same directory (mode
    0600 from creation), fsync, rename over ``path``, fsync of the directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # an older temporary file may have had another mode
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot_file(path: Path, key: SnapshotKey) -> PersistedSnapshot | None:
    """The snapshot at ``path``; None if there is no file; ``SnapshotFileError`` if it is unusable."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > _MAX_FILE_BYTES:
        raise SnapshotFileError(f"{size} bytes is larger than any snapshot")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotFileError(f"cannot be read ({exc.strerror})") from None
    return open_snapshot(data, key)
