"""Token revocation reaches every replica without a restart: two control
planes on one Postgres database, a token revoked through one is refused by
the other within a second (change log + LISTEN/NOTIFY), and the streams it
opened there end.

Fails when Postgres is unreachable under CI=true; skips otherwise.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from grpc import aio

from control_plane.revocation import REVOKED_DETAILS
from keyplane.v1 import admin_service_pb2 as apb
from tests.control_plane.conftest import ADMIN_MD, Harness, HarnessFactory, next_message
from tests.control_plane.test_replicas_postgres import pg_url  # noqa: F401  (fixture)
from tests.control_plane.test_tokens import bearer, create_admin_token, create_sidecar_token, stream_end


async def replicas(make_harness: HarnessFactory, pg_url: str) -> tuple[Harness, Harness]:  # noqa: F811
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key)
    two = await make_harness(store_url=pg_url, master_key=master_key)
    await one.tenant()
    return one, two


async def until_accepted(harness: Harness, token: str, within: float = 1.0) -> None:
    """A new token is accepted by ``harness`` once its NOTIFY arrived."""
    async with asyncio.timeout(within):
        while True:
            try:
                await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(token))
                return
            except aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                await asyncio.sleep(0.01)


async def test_a_sidecar_token_revoked_through_one_replica_is_refused_by_the_other(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    one, two = await replicas(make_harness, pg_url)
    created = await create_sidecar_token(one, "acme")
    await two.plane.hub.catch_up()  # the setup writes, in case NOTIFY is still on its way
    assert two.plane.hub.tokens.is_valid(created.sidecar_token.id)
    watch = two.watch(("acme",), metadata=bearer(created.token))
    assert (await next_message(watch)).HasField("snapshot")

    started = time.monotonic()
    await one.admin.RevokeSidecarToken(apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id), metadata=ADMIN_MD)
    # The open stream on replica two ends ...
    assert await stream_end(watch, within=1.0) == (grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
    assert time.monotonic() - started < 1.0
    # ... and replica two refuses new calls, no restart involved.
    with pytest.raises(aio.AioRpcError) as exc_info:
        await next_message(two.watch(("acme",), metadata=bearer(created.token)))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_an_admin_token_revoked_through_one_replica_is_refused_by_the_other(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    one, two = await replicas(make_harness, pg_url)
    created = await create_admin_token(one)
    await until_accepted(two, created.token)

    started = time.monotonic()
    await one.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id=created.admin_token.id), metadata=ADMIN_MD)
    refused = False
    async with asyncio.timeout(1.0):
        while not refused:
            try:
                await two.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(created.token))
                await asyncio.sleep(0.01)
            except aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                refused = True
    assert time.monotonic() - started < 1.0
    # Revoked through replica two's own API view as well.
    listed = await two.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=ADMIN_MD)
    assert [t.HasField("revoke_time") for t in listed.admin_tokens] == [True]
