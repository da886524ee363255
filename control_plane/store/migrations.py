"""Versioned schema migrations, shared bookkeeping for every store.

Each store keeps an ordered tuple of :class:`Migration` (its own SQL dialect)
and a ``schema_migrations(version, applied_at)`` table. ``migrate()`` applies,
in one transaction, the migrations whose version is not in that table yet, so
running it twice is a no-op. Migrations are append-only: never edit a shipped
one, add the next version instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Migration", "pending"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def pending(migrations: Sequence[Migration], applied: Iterable[int]) -> list[Migration]:
    """The migrations not yet applied, in version order.

    Raises ``ValueError`` if the list is not strictly increasing from 1 or if
    the database holds a version this code does not know (it is newer than us).
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1..n in order, got {versions}")
    done = set(applied)
    unknown = sorted(done - set(versions))
    if unknown:
        raise ValueError(f"database schema has migrations {unknown} unknown to this keyplane version; upgrade keyplane")
    return [m for m in migrations if m.version not in done]
