"""Open a store from a URL (the ``--store`` option of the CLI).

- ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (SQLAlchemy
  style: the path is whatever follows ``sqlite:///``), ``sqlite:///:memory:``
- ``postgresql://user@host:port/db?schema=name`` (also ``postgres://``); the
  ``schema`` query parameter is taken out of the DSN and becomes the schema
  holding keyplane's tables (default ``keyplane``).

``command_timeout`` (seconds) bounds every Postgres statement and wait for a
pooled connection (``PostgresStore``'s default when None); SQLite ignores it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from control_plane.store.base import Store
from control_plane.store.postgres import PostgresStore
from control_plane.store.sqlite import SqliteStore

__all__ = ["open_store"]

_SQLITE_PREFIX = "sqlite:///"


def open_store(url: str, *, command_timeout: float | None = None) -> Store:
    """A store for ``url`` (not yet connected; call ``migrate()`` next)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if url in ("sqlite://", "sqlite:///:memory:"):
            return SqliteStore(":memory:")
        if not url.startswith(_SQLITE_PREFIX) or len(url) == len(_SQLITE_PREFIX):
            raise ValueError("sqlite store URL must look like sqlite:///path/to/file.db or sqlite:///:memory:")
        return SqliteStore(url[len(_SQLITE_PREFIX) :])
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for name, value in query if name == "schema"]
        rest = [(name, value) for name, value in query if name != "schema"]
        dsn = urlunsplit(parts._replace(query=urlencode(rest)))
        options: dict[str, Any] = {}
        if schemas:
            options["schema"] = schemas[-1]
        if command_timeout is not None:
            options["command_timeout"] = command_timeout
        return PostgresStore(dsn, **options)
    # Only the scheme goes into the message: the rest may hold a password.
    raise ValueError(
        f"unsupported store URL scheme {scheme!r}: use sqlite:///path.db, sqlite:///:memory: "
        "or postgresql://user@host:port/database[?schema=name]"
    )
