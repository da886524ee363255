"""Configuration caps over the real admin API, and watch messages that stay
under the sidecar's receive limit (the same constant the sidecar uses)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from control_plane import limits
from control_plane.limits import TenantUsage
from keyplane.domain import Provider, Route, RouteTarget
from keyplane.errors import InvalidArgument
from keyplane.limits import MAX_DELTA_MESSAGE_BYTES, MAX_TENANT_SNAPSHOT_BYTES, MAX_WATCH_MESSAGE_BYTES
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from keyplane.v1 import sidecar_service_pb2_grpc
from sidecar.channel import _MAX_MESSAGE_BYTES
from tests.control_plane.conftest import (
    ADMIN_MD,
    SECRET,
    SIDECAR_ALL_MD,
    Harness,
    HarnessFactory,
    next_message,
    rpc_error,
)


def test_the_sidecar_receive_limit_is_the_shared_constant() -> None:
    assert _MAX_MESSAGE_BYTES == MAX_WATCH_MESSAGE_BYTES
    assert MAX_TENANT_SNAPSHOT_BYTES * 2 < MAX_WATCH_MESSAGE_BYTES
    assert MAX_DELTA_MESSAGE_BYTES + limits.MAX_ROUTE_BYTES < MAX_WATCH_MESSAGE_BYTES


@pytest.mark.parametrize(
    ("usage", "kind", "ok"),
    [
        (TenantUsage(keys=limits.MAX_KEYS_PER_TENANT - 1), "keys", True),
        (TenantUsage(keys=limits.MAX_KEYS_PER_TENANT), "keys", False),
        (TenantUsage(routes=limits.MAX_ROUTES_PER_TENANT), "routes", False),
        (TenantUsage(routes=limits.MAX_ROUTES_PER_TENANT - 1), "routes", True),
        (TenantUsage(client_keys=limits.MAX_CLIENT_KEYS_PER_TENANT), "client_keys", False),
        (TenantUsage(keys=limits.MAX_KEYS_PER_TENANT), "client_keys", True),
    ],
)
def test_room_per_tenant(usage: TenantUsage, kind: str, ok: bool) -> None:
    if ok:
        limits.check_room(usage, kind, "acme")
    else:
        with pytest.raises(InvalidArgument, match=r"already has \d+ .*, the most a tenant may have"):
            limits.check_room(usage, kind, "acme")


def test_snapshot_growth_counts_what_an_update_replaces() -> None:
    near = TenantUsage(snapshot_bytes=MAX_TENANT_SNAPSHOT_BYTES - 100)
    limits.check_snapshot_growth(near, "acme", adding=100)
    limits.check_snapshot_growth(near, "acme", adding=5000, removing=4900)
    with pytest.raises(InvalidArgument, match=r"the most a tenant may hold is 16\.0 MiB"):
        limits.check_snapshot_growth(near, "acme", adding=101)


def _targets(count: int, node_urls: int = 0) -> list[rpb.RouteTarget]:
    if node_urls:
        return [
            rpb.RouteTarget(
                provider=rpb.PROVIDER_VLLM,
                upstream_model="llama",
                node_urls=[f"http://10.0.{i % 250}.{n % 250}:8000/v1/{'p' * 1500}" for n in range(node_urls)],
            )
            for i in range(count)
        ]
    return [rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=f"m{i}") for i in range(count)]


async def test_a_route_of_100000_targets_is_refused_naming_the_limit(harness: Harness) -> None:
    await harness.tenant()
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="big", targets=_targets(100_000)), metadata=ADMIN_MD
        )
    assert rpc_error(caught) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets: a route has at most 64 targets (got 100000)",
    )
    route = await harness.admin.CreateRoute(
        apb.CreateRouteRequest(tenant="acme", public_model="ok", targets=_targets(64)), metadata=ADMIN_MD
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.UpdateRoute(
            apb.UpdateRouteRequest(tenant="acme", id=route.route.id, targets=_targets(65)), metadata=ADMIN_MD
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="nodes", targets=_targets(1, node_urls=65)),
            metadata=ADMIN_MD,
        )
    assert rpc_error(caught) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].node_urls: a target has at most 64 node URLs (got 65)",
    )
    # 64 x 32 node URLs of 1.5 KB each pass the counts but not the size of one route.
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="heavy", targets=_targets(64, node_urls=32)),
            metadata=ADMIN_MD,
        )
    code, details = rpc_error(caught)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "a route may take at most 262144 bytes" in details
    listed = await harness.admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert [r.public_model for r in listed.routes] == ["ok"]


async def test_allowed_models_per_key_are_capped_on_create_and_update(harness: Harness) -> None:
    await harness.tenant()
    models = [f"model-{i}" for i in range(257)]
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.key(allowed_models=models)
    assert rpc_error(caught) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "allowed_models: a key allows at most 256 models (got 257)",
    )
    key = await harness.key(allowed_models=models[:256])
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(
                tenant="acme",
                id=key.id,
                key=rpb.ProviderKey(allowed_models=models),
                update_mask=FieldMask(paths=["allowed_models"]),
            ),
            metadata=ADMIN_MD,
        )
    assert rpc_error(caught)[1] == "key.allowed_models: a key allows at most 256 models (got 257)"


async def test_client_keys_per_tenant_are_capped(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real cap is 10,000; the check is the same code with a smaller number.
    monkeypatch.setattr(limits, "MAX_CLIENT_KEYS_PER_TENANT", 3)
    monkeypatch.setitem(limits._ROOM, "client_keys", ("client keys", 3))
    await harness.tenant()
    for i in range(3):
        await harness.admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label=f"a{i}"), metadata=ADMIN_MD)
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="a3"), metadata=ADMIN_MD)
    assert rpc_error(caught) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tenant 'acme' already has 3 client keys, the most a tenant may have",
    )


async def test_a_tenant_cannot_grow_past_the_snapshot_cap(harness: Harness) -> None:
    await harness.tenant()
    # Routes of ~250 KB each (64 targets x 2 node URLs of ~1.5 KB), and as
    # much again for their nodes (each node URL is also a Node in the snapshot).
    created = 0
    with pytest.raises(aio.AioRpcError) as caught:
        for i in range(100):
            await harness.admin.CreateRoute(
                apb.CreateRouteRequest(tenant="acme", public_model=f"r{i}", targets=_targets(64, node_urls=2)),
                metadata=ADMIN_MD,
            )
            created += 1
    code, details = rpc_error(caught)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "the most a tenant may hold is 16.0 MiB" in details
    assert 25 < created < 60
    usage = harness.plane.hub.cache.usage("acme")
    assert usage.routes == created
    assert usage.snapshot_bytes <= MAX_TENANT_SNAPSHOT_BYTES
    # A sidecar with the real receive limit gets the whole tenant in one message.
    async with aio.insecure_channel(
        harness.plane.address, options=[("grpc.max_receive_message_length", MAX_WATCH_MESSAGE_BYTES)]
    ) as channel:
        stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
        call = stub.Watch(spb.WatchRequest(tenants=["acme"], sidecar_id="big"), metadata=SIDECAR_ALL_MD)
        first = await asyncio.wait_for(call.read(), 30)
        assert isinstance(first, spb.WatchResponse)
        assert len(first.snapshot.tenants[0].routes) == created
        call.cancel()


def _big_route(tenant: str, route_id: str, size: int) -> Route:
    url = "http://10.1.2.3:8000/v1/" + "x" * 1900
    count = size // 2000
    now = datetime.now(UTC)
    return Route(
        id=route_id,
        tenant=tenant,
        public_model=route_id,
        targets=(RouteTarget(Provider.VLLM, "llama", node_urls=tuple(f"{url}{i}" for i in range(count))),),
        created_at=now,
        updated_at=now,
    )


async def test_a_watch_too_big_for_one_message_is_refused_and_the_plane_serves_on(
    make_harness: HarnessFactory,
) -> None:
    # Written to the store directly (as an older keyplane without caps could
    # have): five tenants of 14 MB each, 70 MB in all.
    first = await make_harness()
    for n in range(5):
        await first.tenant(f"t{n}")
        await first.plane.store.create_route(_big_route(f"t{n}", f"rt_big{n}", 14 * 1024 * 1024))
    await first.plane.hub.catch_up()
    async with aio.insecure_channel(
        first.plane.address, options=[("grpc.max_receive_message_length", MAX_WATCH_MESSAGE_BYTES)]
    ) as channel:
        stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
        every = stub.Watch(spb.WatchRequest(sidecar_id="all"), metadata=SIDECAR_ALL_MD)
        with pytest.raises(aio.AioRpcError) as caught:
            await asyncio.wait_for(every.read(), 30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch fewer tenants" in (caught.value.details() or "")
        # Two tenants fit.
        some = stub.Watch(spb.WatchRequest(tenants=["t0", "t1"], sidecar_id="two"), metadata=SIDECAR_ALL_MD)
        message = await asyncio.wait_for(some.read(), 30)
        assert isinstance(message, spb.WatchResponse)
        assert [t.tenant for t in message.snapshot.tenants] == ["t0", "t1"]
        some.cancel()


async def test_a_large_backlog_is_split_into_deltas_under_the_limit(harness: Harness) -> None:
    await harness.tenant()
    async with aio.insecure_channel(
        harness.plane.address, options=[("grpc.max_receive_message_length", MAX_WATCH_MESSAGE_BYTES)]
    ) as channel:
        stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
        call = stub.Watch(spb.WatchRequest(tenants=["acme"], sidecar_id="split"), metadata=SIDECAR_ALL_MD)
        await next_message(call)
        # Three 7 MB routes land at once (written directly, then published together).
        for n in range(3):
            await harness.plane.store.create_route(_big_route("acme", f"rt_split{n}", 7 * 1024 * 1024))
        await harness.plane.hub.catch_up()
        final = harness.plane.hub.version
        seen: list[str] = []
        versions: list[int] = []
        while len(seen) < 3:
            message = await next_message(call, within=30)
            assert message.WhichOneof("payload") == "delta"
            assert message.ByteSize() <= MAX_DELTA_MESSAGE_BYTES + 1024
            seen += [c.route_put.id for c in message.delta.changes]
            versions.append(message.version)
        call.cancel()
    assert seen == ["rt_split0", "rt_split1", "rt_split2"]
    assert len(versions) >= 2
    assert versions == sorted(versions)
    assert versions[-1] == final


async def test_only_active_keys_carry_their_secret_to_sidecars(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    call = harness.watch(("acme",), metadata=SIDECAR_ALL_MD)
    snapshot = await next_message(call)
    assert snapshot.snapshot.tenants[0].keys[0].secret == SECRET

    async def set_status(status: rpb.KeyStatus.ValueType) -> spb.SidecarProviderKey:
        await harness.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(
                tenant="acme", id=key.id, key=rpb.ProviderKey(status=status), update_mask=FieldMask(paths=["status"])
            ),
            metadata=ADMIN_MD,
        )
        while True:
            message = await next_message(call)
            puts = [c.key_put for c in message.delta.changes if c.WhichOneof("change") == "key_put"]
            if puts:
                return puts[-1]

    disabled = await set_status(rpb.KEY_STATUS_DISABLED)
    assert (disabled.id, disabled.status, disabled.secret) == (key.id, rpb.KEY_STATUS_DISABLED, "")
    # A sidecar connecting now does not get the secret either.
    fresh = harness.watch(("acme",), sidecar_id="fresh")
    fresh_key = (await next_message(fresh)).snapshot.tenants[0].keys[0]
    assert (fresh_key.status, fresh_key.secret) == (rpb.KEY_STATUS_DISABLED, "")
    revoked = await set_status(rpb.KEY_STATUS_REVOKED)
    assert revoked.secret == ""
    enabled = await set_status(rpb.KEY_STATUS_ACTIVE)
    assert (enabled.status, enabled.secret) == (rpb.KEY_STATUS_ACTIVE, SECRET)
