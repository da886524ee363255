"""The embedded default's data directory and the credentials kept in it.

``KEYPLANE_HOME`` (default ``~/.keyplane``) holds the SQLite database, the
master key, the admin token and the sidecar token, each file mode 0600, so
``keyplane up`` needs no configuration and the admin CLI finds its token.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HOME_ENV", "Home", "read_token_file", "write_secret_file"]

HOME_ENV = "KEYPLANE_HOME"


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
