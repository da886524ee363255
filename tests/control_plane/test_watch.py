"""The sidecar Watch stream over a real gRPC socket."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from keyplane.going_away import is_going_away
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import (
    ADMIN_MD,
    SECRET,
    SIDECAR_ACME_MD,
    Harness,
    HarnessFactory,
    next_message,
)


async def _disable(harness: Harness, key_id: str) -> None:
    await harness.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key_id,
            key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED),
            update_mask=FieldMask(paths=["status"]),
        ),
        metadata=ADMIN_MD,
    )


async def test_snapshot_then_deltas(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.tenant("acme")
    await harness.tenant("empty")
    key = await harness.key()
    route = await harness.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")],
        ),
        metadata=ADMIN_MD,
    )
    ck = await harness.admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    version = await harness.latest_version()

    call = harness.watch()
    first = await next_message(call)
    assert first.WhichOneof("payload") == "snapshot"
    assert first.version == version
    tenants = {t.tenant: t for t in first.snapshot.tenants}
    assert set(tenants) == {"acme", "empty"}  # a tenant without objects is listed too
    acme = tenants["acme"]
    assert [(k.id, k.secret, k.status) for k in acme.keys] == [(key.id, SECRET, rpb.KEY_STATUS_ACTIVE)]
    assert [r.id for r in acme.routes] == [route.route.id]
    assert [c.token_sha256 for c in acme.client_keys] == [hashlib.sha256(ck.token.encode()).digest()]

    # Disable: the change is published before the admin call returns.
    await _disable(harness, key.id)
    delta = await next_message(call, within=1.0)
    assert delta.WhichOneof("payload") == "delta"
    [change] = delta.delta.changes
    assert change.WhichOneof("change") == "key_put"
    assert change.tenant == "acme"
    assert change.key_put.status == rpb.KEY_STATUS_DISABLED
    assert change.key_put.secret == ""  # a disabled key travels without its secret
    assert delta.version == change.version == await harness.latest_version()

    await harness.admin.DeleteProviderKey(apb.DeleteProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    delta = await next_message(call)
    [change] = delta.delta.changes
    assert change.WhichOneof("change") == "key_deleted" and change.key_deleted == key.id

    await harness.admin.DeleteTenant(apb.DeleteTenantRequest(name="acme"), metadata=ADMIN_MD)
    delta = await next_message(call)
    [change] = delta.delta.changes
    assert change.tenant == "acme" and change.tenant_deleted

    infos = harness.plane.hub.cache.connected()
    assert [(i.sidecar_id, i.tenants, i.version) for i in infos] == [("sc-test", None, delta.version)]
    assert infos[0].peer.startswith("ipv4:127.0.0.1:")
    assert SECRET not in caplog.text


async def test_watch_is_served_from_memory_when_the_store_is_gone(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    version = await harness.latest_version()
    await harness.plane.store.close()
    message = await next_message(harness.watch())
    assert message.version == version
    assert [(k.id, k.secret) for k in message.snapshot.tenants[0].keys] == [(key.id, SECRET)]
    with pytest.raises(aio.AioRpcError) as info:
        await harness.key(label="another")
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_resume_with_held_version_gets_only_missed_changes(harness: Harness) -> None:
    await harness.tenant("acme")
    await harness.tenant("globex")
    key = await harness.key()
    held = await harness.latest_version()

    other = await harness.key(tenant="globex", label="g")
    await _disable(harness, key.id)
    route = await harness.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")],
        ),
        metadata=ADMIN_MD,
    )

    call = harness.watch(("acme",), resume_version=held, metadata=SIDECAR_ACME_MD)
    first = await next_message(call)
    assert first.WhichOneof("payload") == "delta"
    assert first.version == await harness.latest_version()
    kinds = [(c.WhichOneof("change"), c.tenant) for c in first.delta.changes]
    assert kinds == [("key_put", "acme"), ("route_put", "acme")]
    assert first.delta.changes[0].key_put.status == rpb.KEY_STATUS_DISABLED
    assert first.delta.changes[1].route_put.id == route.route.id
    assert other.id not in str(first)

    # Holding the current version: an empty delta says "you are up to date".
    up_to_date = harness.watch(("acme",), resume_version=first.version, metadata=SIDECAR_ACME_MD)
    message = await next_message(up_to_date)
    assert message.WhichOneof("payload") == "delta"
    assert message.version == first.version and list(message.delta.changes) == []


async def test_resume_older_than_the_ring_gets_a_snapshot(make_harness: HarnessFactory) -> None:
    harness = await make_harness(log_size=3)
    await harness.tenant()
    held = await harness.latest_version()
    for n in range(5):
        await harness.key(label=f"k{n}", secret=f"{SECRET}{n}")
    call = harness.watch(resume_version=held)
    first = await next_message(call)
    assert first.WhichOneof("payload") == "snapshot"
    assert first.version == await harness.latest_version()
    assert len(first.snapshot.tenants[0].keys) == 5

    # Still inside the ring: a delta.
    recent = harness.watch(resume_version=first.version - 2)
    message = await next_message(recent)
    assert message.WhichOneof("payload") == "delta"
    assert [c.version for c in message.delta.changes] == [first.version - 1, first.version]

    # A version from the future (another database?) also gets a snapshot.
    future = harness.watch(resume_version=first.version + 100)
    assert (await next_message(future)).WhichOneof("payload") == "snapshot"


async def test_scope_and_unknown_tenants(harness: Harness) -> None:
    await harness.tenant("acme")
    await harness.tenant("globex")

    denied = harness.watch(("globex",), metadata=SIDECAR_ACME_MD)
    with pytest.raises(aio.AioRpcError) as info:
        await denied.read()
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "globex" in (info.value.details() or "")

    unknown = harness.watch(("nope",))
    with pytest.raises(aio.AioRpcError) as info:
        await unknown.read()
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "nope" in (info.value.details() or "")

    bad = harness.watch(("Not A Slug",))
    with pytest.raises(aio.AioRpcError) as info:
        await bad.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # An empty request means every tenant the token may see.
    scoped = harness.watch((), metadata=SIDECAR_ACME_MD)
    first = await next_message(scoped)
    assert [t.tenant for t in first.snapshot.tenants] == ["acme"]
    await harness.key(tenant="globex", label="g")
    await harness.key(tenant="acme", label="a")
    delta = await next_message(scoped)
    assert [c.tenant for c in delta.delta.changes] == ["acme"]


async def test_slow_subscriber_does_not_block_others(make_harness: HarnessFactory) -> None:
    harness = await make_harness(max_pending=5)
    await harness.tenant()
    key = await harness.key(secret="s" * 4096)
    slow = harness.watch(sidecar_id="slow")  # never read until the end
    fast = harness.watch(sidecar_id="fast")
    assert (await next_message(fast)).WhichOneof("payload") == "snapshot"

    for weight in range(1, 101):
        await harness.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(
                tenant="acme",
                id=key.id,
                key=rpb.ProviderKey(weight=weight),
                update_mask=FieldMask(paths=["weight"]),
            ),
            metadata=ADMIN_MD,
        )
        message = await next_message(fast, within=1.0)
        assert message.delta.changes[-1].key_put.weight == weight

    # The slow one catches up to the final state, whatever the coalescing did.
    final = await harness.latest_version()
    weight = 0
    while True:
        message = await next_message(slow, within=2.0)
        if message.WhichOneof("payload") == "snapshot":
            weight = message.snapshot.tenants[0].keys[0].weight
        elif message.delta.changes:
            weight = message.delta.changes[-1].key_put.weight
        if message.version == final:
            break
    assert weight == 100


async def test_stop_ends_watch_streams(make_harness: HarnessFactory) -> None:
    harness = await make_harness()
    await harness.tenant()
    call = harness.watch()
    await next_message(call)
    stop = asyncio.create_task(harness.plane.stop(grace=5.0))
    # The stream ends with "reconnect elsewhere" (keyplane.going_away), not a plain end.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(call.read(), 2.0)
    await asyncio.wait_for(stop, 2.0)
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    assert is_going_away(ended.value.trailing_metadata())
    assert "shutting down" in (ended.value.details() or "")
