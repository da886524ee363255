"""The real Postgres the tests use: where it is, and a private schema per test.

In CI (CI=true) an unreachable Postgres fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

__all__ = ["PG_DSN", "admin_connection", "fresh_schema", "schema_url"]

PG_DSN = os.environ.get("KEYPLANE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"Postgres at {PG_DSN} is unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@asynccontextmanager
async def fresh_schema(prefix: str) -> AsyncIterator[str]:
    """A schema name of its own (``prefix`` + random), dropped with everything in it at the end."""
    admin = await admin_connection()
    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    try:
        yield schema
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def schema_url(schema: str) -> str:
    """The store URL of ``schema`` on the test Postgres."""
    return f"{PG_DSN}?schema={schema}"
