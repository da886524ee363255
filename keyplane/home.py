"""The embedded default's data directory and the credentials kept in it.

``KEYPLANE_HOME`` (default ``~/.keyplane``) holds the SQLite database, the
master key, the admin token and the sidecar token, each file mode 0600 in a
directory of mode 0700, so ``keyplane up`` needs no configuration and the
admin CLI finds its token. A data directory or file that others can read is
tightened, with a warning.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HOME_ENV",
    "Home",
    "ensure_private_dir",
    "ensure_private_file",
    "read_token_file",
    "write_secret_file",
]

HOME_ENV = "KEYPLANE_HOME"

log = logging.getLogger(__name__)


def _tighten(path: Path, private: int) -> None:
    """chmod ``path`` to ``private`` if group or others have any access."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        path.chmod(private)
    except OSError as exc:
        log.warning("%s is accessible to other users (mode %04o) and could not be tightened: %s", path, mode, exc)
        return
    log.warning("%s was accessible to other users (mode %04o); tightened it to %04o", path, mode, private)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) with mode 0700, or tighten an
    existing directory that group or others can access to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _tighten(path, 0o700)


def ensure_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing (never wider, even
    briefly), or tighten an existing one that group or others can access."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    _tighten(path, 0o600)


def write_secret_file(path: Path, content: str) -> None:
    """Create ``path`` with mode 0600 (never wider, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content + "\n")


def read_token_file(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


@dataclass(frozen=True, slots=True)
class Home:
    root: Path

    @classmethod
    def default(cls) -> Home:
        value = os.environ.get(HOME_ENV)
        return cls(Path(value) if value else Path.home() / ".keyplane")

    @property
    def database(self) -> Path:
        return self.root / "keyplane.db"

    @property
    def master_key_file(self) -> Path:
        return self.root / "master.key"

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin.token"

    @property
    def sidecar_token_file(self) -> Path:
        return self.root / "sidecar.token"

    def ensure_token(self, path: Path, prefix: str) -> str:
        """Return the token in ``path``, creating a random one on first use."""
        if path.exists():
            return read_token_file(path)
        token = prefix + secrets.token_urlsafe(32)
        write_secret_file(path, token)
        return token
