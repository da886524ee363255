"""Etags and update preconditions in the admin API, over a real socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from keyplane.crypto import fingerprint
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, SECRET, Harness, rpc_error

ROTATED = "sk-rotated-NEWSECRET-0123456789abcdef"


def _weight(key_id: str, weight: int, **kwargs: Any) -> apb.UpdateProviderKeyRequest:
    kwargs.setdefault("key", rpb.ProviderKey(weight=weight))
    return apb.UpdateProviderKeyRequest(tenant="acme", id=key_id, update_mask=FieldMask(paths=["weight"]), **kwargs)


def _target(model: str) -> rpb.RouteTarget:
    return rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=model)


async def test_every_resource_carries_an_etag(harness: Harness) -> None:
    admin = harness.admin
    tenant = (await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)).tenant
    key = await harness.key()
    route = (
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target("gpt-4o")]),
            metadata=ADMIN_MD,
        )
    ).route
    client_key = (
        await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    ).client_key
    for resource in (tenant, key, route, client_key):
        assert resource.etag
    # Get and List return the same etag as Create.
    assert (await admin.GetTenant(apb.GetTenantRequest(name="acme"), metadata=ADMIN_MD)).tenant.etag == tenant.etag
    listed_keys = await admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert [k.etag for k in listed_keys.keys] == [key.etag]
    got_route = await admin.GetRoute(apb.GetRouteRequest(tenant="acme", id=route.id), metadata=ADMIN_MD)
    assert got_route.route.etag == route.etag
    listed_cks = await admin.ListClientKeys(apb.ListClientKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert [c.etag for c in listed_cks.client_keys] == [client_key.etag]

    # Every update returns a new etag, which Get then shows.
    updated = (await admin.UpdateProviderKey(_weight(key.id, 5), metadata=ADMIN_MD)).key
    rotated = (
        await admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED), metadata=ADMIN_MD
        )
    ).key
    assert len({key.etag, updated.etag, rotated.etag}) == 3
    got = (await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)).key
    assert got.etag == rotated.etag


async def test_a_stale_etag_is_aborted(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.tenant()
    key = await harness.key()
    admin = harness.admin
    fresh = (await admin.UpdateProviderKey(_weight(key.id, 5, etag=key.etag), metadata=ADMIN_MD)).key
    assert fresh.weight == 5

    # The etag read before that update is stale now: nothing changes.
    for stale in (
        _weight(key.id, 9, etag=key.etag),
        apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED, etag=key.etag),
        # AIP-154: the resource's own etag is a precondition too.
        _weight(key.id, 9, key=rpb.ProviderKey(weight=9, etag=key.etag)),
    ):
        with pytest.raises(aio.AioRpcError) as info:
            await admin.UpdateProviderKey(stale, metadata=ADMIN_MD)
        code, details = rpc_error(info)
        assert code is grpc.StatusCode.ABORTED
        assert f"provider key {key.id!r} in tenant 'acme' was changed since it was read" in details
        assert "read it again and retry" in details
        assert SECRET not in details and ROTATED not in details
    got = (await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)).key
    assert got == fresh
    assert SECRET not in caplog.text and ROTATED not in caplog.text

    # Re-read, retry with the current etag: it goes through.
    rotated = (
        await admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED, etag=got.etag),
            metadata=ADMIN_MD,
        )
    ).key
    assert (rotated.fingerprint, rotated.weight) == (fingerprint(ROTATED), 5)


async def test_bad_etags_are_invalid_arguments(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    other = (await harness.admin.UpdateProviderKey(_weight(key.id, 2), metadata=ADMIN_MD)).key
    cases = [
        (_weight(key.id, 3, etag='W/"abc"'), "etag: not an etag this API returned"),
        (_weight(key.id, 3, etag="r0"), "etag: not an etag this API returned"),
        (_weight(key.id, 3, key=rpb.ProviderKey(weight=3, etag="rx")), "key.etag: not an etag"),
        (_weight(key.id, 3, etag=key.etag, key=rpb.ProviderKey(weight=3, etag=other.etag)), "etag and key.etag differ"),
    ]
    for request, message in cases:
        with pytest.raises(aio.AioRpcError) as info:
            await harness.admin.UpdateProviderKey(request, metadata=ADMIN_MD)
        code, details = rpc_error(info)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert message in details


async def test_concurrent_updates_with_one_etag_let_exactly_one_through(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()

    async def attempt(weight: int) -> int | None:
        try:
            response = await harness.admin.UpdateProviderKey(_weight(key.id, weight, etag=key.etag), metadata=ADMIN_MD)
        except aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.ABORTED
            return None
        return response.key.weight

    results = await asyncio.gather(*(attempt(w) for w in range(10, 40)))
    winners = [w for w in results if w is not None]
    assert len(winners) == 1
    got = (
        await harness.admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    ).key
    assert got.weight == winners[0]


async def test_update_route_with_a_mask_and_an_etag(harness: Harness) -> None:
    await harness.tenant()
    admin = harness.admin
    route = (
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target("gpt-4o")]),
            metadata=ADMIN_MD,
        )
    ).route

    renamed = (
        await admin.UpdateRoute(
            apb.UpdateRouteRequest(
                tenant="acme",
                id=route.id,
                route=rpb.Route(public_model="chat-v2", targets=[_target("ignored")]),
                update_mask=FieldMask(paths=["public_model"]),
                etag=route.etag,
            ),
            metadata=ADMIN_MD,
        )
    ).route
    assert renamed.public_model == "chat-v2"
    assert [t.upstream_model for t in renamed.targets] == ["gpt-4o"]  # not in the mask: kept
    assert renamed.etag != route.etag

    retargeted = (
        await admin.UpdateRoute(
            apb.UpdateRouteRequest(
                tenant="acme",
                id=route.id,
                route=rpb.Route(targets=[_target("gpt-4o-mini")], etag=renamed.etag),
                update_mask=FieldMask(paths=["targets"]),
            ),
            metadata=ADMIN_MD,
        )
    ).route
    assert (retargeted.public_model, [t.upstream_model for t in retargeted.targets]) == ("chat-v2", ["gpt-4o-mini"])

    # No mask: replaces the targets as before; a stale etag is ABORTED.
    with pytest.raises(aio.AioRpcError) as info:
        await admin.UpdateRoute(
            apb.UpdateRouteRequest(tenant="acme", id=route.id, targets=[_target("o1")], etag=renamed.etag),
            metadata=ADMIN_MD,
        )
    code, details = rpc_error(info)
    assert code is grpc.StatusCode.ABORTED and f"route {route.id!r}" in details
    plain = (
        await admin.UpdateRoute(
            apb.UpdateRouteRequest(tenant="acme", id=route.id, targets=[_target("o1")]), metadata=ADMIN_MD
        )
    ).route
    assert (plain.public_model, [t.upstream_model for t in plain.targets]) == ("chat-v2", ["o1"])


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (
            {"update_mask": FieldMask(paths=["id"])},
            "update_mask: cannot update 'id'; updatable fields: targets, public_model",
        ),
        (
            {
                "update_mask": FieldMask(paths=["targets"]),
                "targets": [_target("x")],
                "route": rpb.Route(targets=[_target("y")]),
            },
            "targets: with an update_mask, send the new targets in route.targets",
        ),
        (
            {"update_mask": FieldMask(paths=["targets"]), "route": rpb.Route()},
            "targets: a route needs at least one target",
        ),
        ({"update_mask": FieldMask(paths=["public_model"]), "route": rpb.Route()}, "route.public_model is required"),
        ({}, "targets: a route needs at least one target"),
    ],
)
async def test_update_route_rejects_bad_masks(harness: Harness, request_fields: dict[str, Any], message: str) -> None:
    await harness.tenant()
    route = (
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target("gpt-4o")]),
            metadata=ADMIN_MD,
        )
    ).route
    with pytest.raises(aio.AioRpcError) as info:
        await harness.admin.UpdateRoute(
            apb.UpdateRouteRequest(tenant="acme", id=route.id, **request_fields), metadata=ADMIN_MD
        )
    code, details = rpc_error(info)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
