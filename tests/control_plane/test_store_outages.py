"""A control plane on Postgres answers admin calls with UNAVAILABLE, never
INTERNAL or a hang, when its database stalls or a backend is killed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2
from tests.control_plane.conftest import ADMIN_MD, SECRET, HarnessFactory, rpc_error
from tests.pg import PG_DSN, fresh_schema
from tests.store.test_postgres_outages import blocked_pid, locked


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    async with fresh_schema("kp_cp") as schema:
        yield schema


async def test_a_stalled_database_answers_unavailable_within_the_store_timeout(
    make_harness: HarnessFactory, pg_schema: str
) -> None:
    harness = await make_harness(store_url=f"{PG_DSN}?schema={pg_schema}", store_timeout=0.5)
    await harness.tenant()
    async with locked(pg_schema, "tenants"):
        for call in (
            lambda: harness.admin.CreateTenant(apb.CreateTenantRequest(name="beta"), metadata=ADMIN_MD),
            lambda: harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD),
        ):
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as info:
                await call()
            code, details = rpc_error(info)
            assert code is grpc.StatusCode.UNAVAILABLE, details
            assert "no answer within 0.5 s" in details
            assert 0.4 < time.monotonic() - started < 2.5
    await harness.admin.CreateTenant(apb.CreateTenantRequest(name="beta"), metadata=ADMIN_MD)


async def test_a_killed_backend_answers_unavailable(make_harness: HarnessFactory, pg_schema: str) -> None:
    harness = await make_harness(store_url=f"{PG_DSN}?schema={pg_schema}")
    await harness.tenant()
    admin = await asyncpg.connect(PG_DSN, timeout=3)
    try:
        async with locked(pg_schema, "provider_keys") as locker:
            write = asyncio.ensure_future(
                harness.admin.CreateProviderKey(
                    apb.CreateProviderKeyRequest(
                        tenant="acme", label="main", secret=SECRET, provider=resources_pb2.PROVIDER_OPENAI
                    ),
                    metadata=ADMIN_MD,
                )
            )
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", await blocked_pid(admin, locker))
            with pytest.raises(aio.AioRpcError) as info:
                await write
        code, details = rpc_error(info)
        assert code is grpc.StatusCode.UNAVAILABLE, details
        assert SECRET not in details
    finally:
        await admin.close()
    created = await harness.key()  # the next write gets a fresh connection
    assert created.label == "main"
