"""Two control-plane replicas on one Postgres: a write through one reaches
the watch streams of the other (change log + LISTEN/NOTIFY).

Fails when Postgres is unreachable under CI=true; skips otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from keyplane.health import KeyScope
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import ADMIN_MD, Harness, HarnessFactory, next_message
from tests.control_plane.test_health import credential, outcome, report, watching
from tests.pg import fresh_schema, schema_url


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_schema("kp_cp") as schema:
        yield schema_url(schema)


async def two_replicas(make_harness: HarnessFactory, pg_url: str) -> tuple[Harness, Harness, rpb.ProviderKey]:
    """Two control-plane replicas on one Postgres (same master key); tenant acme and one
    key written through the first."""
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key)
    two = await make_harness(store_url=pg_url, master_key=master_key)
    await one.tenant()
    return one, two, await one.key()


async def test_a_write_through_one_replica_reaches_the_other(
    make_harness: HarnessFactory, pg_url: str, tmp_path: Path
) -> None:
    one, two, key = await two_replicas(make_harness, pg_url)

    version = await one.latest_version()
    call = two.watch()
    seen: list[str] = []
    async with asyncio.timeout(2.0):  # replica two hears of the writes through NOTIFY
        held = 0
        while held < version:
            message = await next_message(call, within=2.0)
            held = message.version
            if message.WhichOneof("payload") == "snapshot":
                seen = [k.id for t in message.snapshot.tenants for k in t.keys]
            else:
                seen += [c.key_put.id for c in message.delta.changes if c.HasField("key_put")]
    assert held == version
    assert seen == [key.id]

    await one.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key.id,
            key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED),
            update_mask=FieldMask(paths=["status"]),
        ),
        metadata=ADMIN_MD,
    )
    delta = await next_message(call, within=1.0)
    [change] = delta.delta.changes
    assert change.key_put.id == key.id
    assert change.key_put.status == rpb.KEY_STATUS_DISABLED
    assert change.key_put.secret == ""  # only an active key carries its secret
    assert change.version > version


async def test_health_learnt_by_one_replica_reaches_the_other(make_harness: HarnessFactory, pg_url: str) -> None:
    one, two, key = await two_replicas(make_harness, pg_url)
    watcher = await watching(two)
    await two.plane.hub.catch_up()  # the setup writes, in case NOTIFY is still on its way

    # A sidecar of replica one reports a dead key; a sidecar of replica two hears of it.
    assert await report(one, [credential(key.id)]) == 1
    seen: list[rpb.KeyHealth] = []
    async with asyncio.timeout(2.0):
        while not seen:
            message = await next_message(watcher, within=2.0)
            seen = [c.key_health for c in message.delta.changes if c.HasField("key_health")]
    assert [(h.key_id, h.model, h.state) for h in seen] == [(key.id, "", rpb.HEALTH_STATE_UNHEALTHY)]
    # Replica two's books adopted it too.
    assert [c.scope for c in two.plane.aggregator.verdicts("acme")] == [KeyScope(key.id, "")]

    # A reset through replica two clears replica one's books: the same failure is news again.
    await two.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key.id), metadata=ADMIN_MD)
    async with asyncio.timeout(2.0):
        while one.plane.aggregator.verdicts("acme"):
            await one.plane.hub.catch_up()
    version = await one.latest_version()
    assert await report(one, [credential(key.id)]) == 1
    assert await one.latest_version() > version


async def test_a_reset_with_nothing_stored_reaches_the_sidecars_and_books_of_the_other(
    make_harness: HarnessFactory, pg_url: str
) -> None:
    one, two, key = await two_replicas(make_harness, pg_url)
    watcher = await watching(one)
    await one.plane.hub.catch_up()  # the setup writes, in case NOTIFY is still on its way

    # Replica one has counted two upstream errors (one short of a cooldown): nothing is stored.
    error = outcome(key.id, spb.OUTCOME_CLASS_UPSTREAM_ERROR, status=503)
    assert await report(one, [error, error]) == 2
    version = await one.latest_version()

    # A reset through replica two reaches replica one's sidecars ...
    await two.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key.id), metadata=ADMIN_MD)
    seen: list[rpb.KeyHealth] = []
    async with asyncio.timeout(2.0):
        while not seen:
            message = await next_message(watcher, within=2.0)
            seen = [c.key_health for c in message.delta.changes if c.HasField("key_health")]
    assert [(h.key_id, h.model, h.state) for h in seen] == [(key.id, "", rpb.HEALTH_STATE_HEALTHY)]
    assert message.version > version
    # ... and replica one's books forgot the whole key: the next error starts a fresh count.
    version = await one.latest_version()
    assert await report(one, [error]) == 1
    assert await one.latest_version() == version
    assert one.plane.aggregator.verdicts("acme") == []
