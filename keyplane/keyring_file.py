"""The master keyring on disk: read, re-read when it changes, and rewritten
atomically with mode 0600.

``KeyringFile`` is what the control plane seals and opens with. It checks
the file at most every ``check_interval`` seconds (and at once when a
ciphertext names a key it does not hold), so a key added on disk (every
replica mounting the same secret) is used without a restart. While the file
does not exist, the single legacy master key (``KEYPLANE_MASTER_KEY`` or a
key file) is a one-key ring; once the file exists it is the whole ring. A
file that does not parse is ignored (the ring in memory stays) with a
warning; so is a file that disappears after it was read.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from keyplane.crypto import MasterKeyError
from keyplane.keyring import Keyring, UnknownMasterKey, format_keyring, parse_keyring

__all__ = ["KEYRING_ENV", "KeyringFile", "read_keyring_file", "write_keyring_file"]

KEYRING_ENV = "KEYPLANE_MASTER_KEYRING"

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_keyring_file(path: Path) -> list[tuple[str, bytes]]:
    """The entries of a keyring file, oldest first (MasterKeyError if malformed)."""
    return parse_keyring(path.read_text(), str(path))


def write_keyring_file(path: Path, entries: Sequence[tuple[str, bytes]]) -> None:
    """Replace ``path`` atomically with ``entries`` (mode 0600, never wider):
    a reader sees the old file or the new one, never a partial one."""
    Keyring(entries)  # validates ids, sizes and duplicates
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(format_keyring(entries))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KeyringFile:
    """A keyring read from ``path`` and re-read when the file changes.

    ``fallback`` is the single legacy master key, the ring while ``path``
    does not exist. MasterKeyError at construction when there is neither, or
    when the file exists and does not parse.
    """

    def __init__(
        self,
        path: Path,
        *,
        fallback: bytes | None = None,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._loaded: _Stamp | None = None  # the file behind the ring in memory
        self._rejected: _Stamp | None = None  # a version of the file that did not parse
        self._mode_warned = False
        self.reloads = 0
        try:
            st = path.stat()
        except FileNotFoundError:
            if fallback is None:
                raise MasterKeyError(f"no master key: {path} does not exist and no single master key is set") from None
            self._ring = Keyring.single(fallback)
        else:
            self._ring = Keyring(read_keyring_file(path))
            self._loaded = _stamp(st)
            self._check_mode(st)
        self._checked_at = clock()

    def __repr__(self) -> str:
        return f"KeyringFile({str(self.path)!r}, ids={list(self._ring.ids)!r})"

    def current(self) -> Keyring:
        """The ring, re-read first if the file changed (checked at most
        every ``check_interval`` seconds)."""
        if self._clock() - self._checked_at >= self._check_interval:
            self.reload()
        return self._ring

    def reload(self) -> bool:
        """Re-read the file now if it changed; True when the ring changed."""
        self._checked_at = self._clock()
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._loaded is not None:
                log.warning("master keyring %s disappeared; keeping the keys in memory", self.path)
                self._loaded = None
            return False
        except OSError as exc:
            log.warning("cannot stat master keyring %s: %s", self.path, type(exc).__name__)
            return False
        stamp = _stamp(st)
        if stamp == self._loaded or stamp == self._rejected:
            return False
        try:
            ring = Keyring(read_keyring_file(self.path))
        except (MasterKeyError, OSError, UnicodeDecodeError) as exc:
            self._rejected = stamp
            log.warning("master keyring %s not reloaded, keeping the keys in memory: %s", self.path, exc)
            return False
        self._check_mode(st)
        self._loaded = stamp
        if ring.ids == self._ring.ids:
            self._ring = ring  # same ids; the keys may differ only if someone rewrote them
            return False
        previous = self._ring.ids
        self._ring = ring
        self.reloads += 1
        log.info(
            "master keyring reloaded from %s: keys %s (were %s), primary %s",
            self.path,
            ", ".join(ring.ids),
            ", ".join(previous),
            ring.primary_id,
        )
        return True

    def _check_mode(self, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 and not self._mode_warned:
            self._mode_warned = True
            log.warning("master keyring %s is accessible to other users (mode %04o); make it 0600", self.path, mode)

    def seal(self, secret: str, associated_data: str) -> bytes:
        return self.current().seal(secret, associated_data)

    def open(self, blob: bytes, associated_data: str) -> str:
        try:
            return self.current().open(blob, associated_data)
        except UnknownMasterKey:
            # Another replica may already seal with a key added to the file a moment ago.
            if not self.reload():
                raise
        return self._ring.open(blob, associated_data)
