"""The admin service over a real gRPC socket and a real SQLite store."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from keyplane.crypto import fingerprint
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, SECRET, Harness

OPENAI = rpb.PROVIDER_OPENAI


def _target(**kwargs: Any) -> rpb.RouteTarget:
    kwargs.setdefault("provider", OPENAI)
    kwargs.setdefault("upstream_model", "gpt-4o")
    return rpb.RouteTarget(**kwargs)


async def test_tenants_crud(harness: Harness) -> None:
    admin = harness.admin
    created = await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    assert created.tenant.name == "acme"
    assert created.tenant.create_time.seconds > 0
    await harness.tenant("globex")

    got = await admin.GetTenant(apb.GetTenantRequest(name="acme"), metadata=ADMIN_MD)
    assert got.tenant == created.tenant
    listed = await admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD)
    assert sorted(t.name for t in listed.tenants) == ["acme", "globex"]

    await harness.key()
    await admin.DeleteTenant(apb.DeleteTenantRequest(name="acme"), metadata=ADMIN_MD)
    listed = await admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD)
    assert [t.name for t in listed.tenants] == ["globex"]
    with pytest.raises(aio.AioRpcError) as info:
        await admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "acme" in (info.value.details() or "")


async def test_provider_key_crud_never_returns_the_secret(harness: Harness, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    admin = harness.admin
    await harness.tenant()
    create = await admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme",
            provider=OPENAI,
            label="main",
            secret=SECRET,
            weight=0,
            allowed_models=["gpt-4o", "gpt-4o"],
        ),
        metadata=ADMIN_MD,
    )
    key = create.key
    assert key.id.startswith("pk_") and len(key.id) == 23
    assert key.tenant == "acme" and key.provider == OPENAI and key.label == "main"
    assert key.status == rpb.KEY_STATUS_ACTIVE
    assert key.weight == 1
    assert list(key.allowed_models) == ["gpt-4o"]
    assert key.base_url == ""
    assert key.fingerprint == fingerprint(SECRET)
    assert key.last4 == SECRET[-4:]

    got = await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert got.key == key
    listed = await admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.keys) == [key]

    updated = await admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key.id,
            key=rpb.ProviderKey(
                label="renamed",
                status=rpb.KEY_STATUS_DISABLED,
                weight=7,
                allowed_models=["gpt-4o-mini"],
                base_url="https://proxy.example.com/v1/",
            ),
            update_mask=FieldMask(paths=["label", "status", "weight", "allowed_models", "base_url"]),
        ),
        metadata=ADMIN_MD,
    )
    u = updated.key
    assert (u.label, u.status, u.weight, list(u.allowed_models), u.base_url) == (
        "renamed",
        rpb.KEY_STATUS_DISABLED,
        7,
        ["gpt-4o-mini"],
        "https://proxy.example.com/v1",
    )
    assert u.fingerprint == key.fingerprint
    assert u.create_time == key.create_time

    # Only the masked field changes.
    only_weight = await admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key.id,
            key=rpb.ProviderKey(weight=9, label="ignored"),
            update_mask=FieldMask(paths=["weight"]),
        ),
        metadata=ADMIN_MD,
    )
    assert only_weight.key.weight == 9 and only_weight.key.label == "renamed"

    rotated_secret = "sk-rotated-ANOTHERSECRET-987654321"
    rotated = await admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=rotated_secret), metadata=ADMIN_MD
    )
    assert rotated.key.fingerprint == fingerprint(rotated_secret)
    assert rotated.key.last4 == rotated_secret[-4:]

    responses = [create, got, listed, updated, only_weight, rotated]
    for response in responses:
        wire = response.SerializeToString()
        assert SECRET.encode() not in wire
        assert rotated_secret.encode() not in wire
    assert SECRET not in caplog.text and rotated_secret not in caplog.text

    await admin.DeleteProviderKey(apb.DeleteProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    listed = await admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.keys) == []


async def test_base_url_required_for_compatible_and_vllm_without_secret(harness: Harness) -> None:
    await harness.tenant()
    compat = await harness.key(
        label="compat", provider=rpb.PROVIDER_OPENAI_COMPATIBLE, base_url="http://127.0.0.1:8000/v1"
    )
    assert compat.base_url == "http://127.0.0.1:8000/v1"
    vllm = await harness.key(label="vllm", provider=rpb.PROVIDER_VLLM, secret="")
    assert vllm.last4 == ""


async def test_routes_crud(harness: Harness) -> None:
    admin = harness.admin
    await harness.tenant()
    created = await admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[
                _target(priority=0, weight=0),
                _target(
                    provider=rpb.PROVIDER_VLLM,
                    upstream_model="llama-3-70b",
                    priority=1,
                    node_urls=["http://10.0.0.1:8000", "http://10.0.0.2:8000/"],
                ),
            ],
        ),
        metadata=ADMIN_MD,
    )
    route = created.route
    assert route.id.startswith("rt_") and route.public_model == "chat"
    assert [t.weight for t in route.targets] == [1, 1]
    assert list(route.targets[1].node_urls) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    azure = await admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="azure-chat",
            targets=[
                _target(provider=rpb.PROVIDER_AZURE_OPENAI, api_version="2024-10-21", deployment="gpt4o-prod"),
                _target(provider=rpb.PROVIDER_AZURE_OPENAI, upstream_model="gpt-4o-mini"),
            ],
        ),
        metadata=ADMIN_MD,
    )
    stored = (await admin.GetRoute(apb.GetRouteRequest(tenant="acme", id=azure.route.id), metadata=ADMIN_MD)).route
    assert [(t.api_version, t.deployment) for t in stored.targets] == [("2024-10-21", "gpt4o-prod"), ("", "")]
    await admin.DeleteRoute(apb.DeleteRouteRequest(tenant="acme", id=azure.route.id), metadata=ADMIN_MD)

    got = await admin.GetRoute(apb.GetRouteRequest(tenant="acme", id=route.id), metadata=ADMIN_MD)
    assert got.route == route
    updated = await admin.UpdateRoute(
        apb.UpdateRouteRequest(
            tenant="acme", id=route.id, targets=[_target(provider=rpb.PROVIDER_ANTHROPIC, upstream_model="claude")]
        ),
        metadata=ADMIN_MD,
    )
    assert [t.upstream_model for t in updated.route.targets] == ["claude"]
    assert updated.route.public_model == "chat"
    listed = await admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.routes) == [updated.route]
    await admin.DeleteRoute(apb.DeleteRouteRequest(tenant="acme", id=route.id), metadata=ADMIN_MD)
    listed = await admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.routes) == []


async def test_client_keys(harness: Harness, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    admin = harness.admin
    await harness.tenant()
    created = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="web app"), metadata=ADMIN_MD)
    token = created.token
    assert token.startswith("kp-") and len(token) == 46
    ck = created.client_key
    assert ck.id.startswith("ck_") and ck.label == "web app" and ck.prefix == token[:10]
    stored = await harness.plane.store.get_client_key("acme", ck.id)
    assert stored.token_sha256 == hashlib.sha256(token.encode()).digest()
    assert token not in caplog.text

    listed = await admin.ListClientKeys(apb.ListClientKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.client_keys) == [ck]
    assert token.encode() not in listed.SerializeToString()
    await admin.DeleteClientKey(apb.DeleteClientKeyRequest(tenant="acme", id=ck.id), metadata=ADMIN_MD)
    listed = await admin.ListClientKeys(apb.ListClientKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(listed.client_keys) == []


# errors ----------------------------------------------------------------------
_BAD_WRITES: list[tuple[str, str, Any, grpc.StatusCode, str]] = [
    (
        "CreateTenant",
        "bad name",
        apb.CreateTenantRequest(name="Acme Corp"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid tenant name",
    ),
    ("CreateTenant", "duplicate", apb.CreateTenantRequest(name="acme"), grpc.StatusCode.ALREADY_EXISTS, "acme"),
    ("DeleteTenant", "unknown", apb.DeleteTenantRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (
        "CreateProviderKey",
        "no provider",
        apb.CreateProviderKeyRequest(tenant="acme", label="x", secret=SECRET),
        grpc.StatusCode.INVALID_ARGUMENT,
        "provider is required; one of: openai, anthropic",
    ),
    (
        "CreateProviderKey",
        "unknown provider number",
        apb.CreateProviderKeyRequest(tenant="acme", label="x", secret=SECRET, provider=42),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "provider is required",
    ),
    (
        "CreateProviderKey",
        "secret with newline",
        apb.CreateProviderKeyRequest(tenant="acme", label="x", secret=SECRET + "\n", provider=OPENAI),
        grpc.StatusCode.INVALID_ARGUMENT,
        "secret must not contain whitespace",
    ),
    (
        "CreateProviderKey",
        "compatible without base_url",
        apb.CreateProviderKeyRequest(tenant="acme", label="x", secret=SECRET, provider=rpb.PROVIDER_OPENAI_COMPATIBLE),
        grpc.StatusCode.INVALID_ARGUMENT,
        "base_url is required for provider openai_compatible",
    ),
    (
        "CreateProviderKey",
        "base_url with credentials",
        apb.CreateProviderKeyRequest(
            tenant="acme", label="x", secret=SECRET, provider=OPENAI, base_url="https://u:hunter2@h.example"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must not contain credentials",
    ),
    (
        "CreateProviderKey",
        "weight too big",
        apb.CreateProviderKeyRequest(tenant="acme", label="x", secret=SECRET, provider=OPENAI, weight=1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "weight must be between 1 and 1000",
    ),
    (
        "CreateProviderKey",
        "duplicate label",
        apb.CreateProviderKeyRequest(tenant="acme", label="main", secret=SECRET, provider=OPENAI),
        grpc.StatusCode.ALREADY_EXISTS,
        "main",
    ),
    (
        "CreateProviderKey",
        "unknown tenant",
        apb.CreateProviderKeyRequest(tenant="nope", label="x", secret=SECRET, provider=OPENAI),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    (
        "UpdateProviderKey",
        "unknown mask path",
        apb.UpdateProviderKeyRequest(tenant="acme", id="{key}", update_mask=FieldMask(paths=["provider"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask: cannot update 'provider'",
    ),
    (
        "UpdateProviderKey",
        "secret via mask",
        apb.UpdateProviderKeyRequest(tenant="acme", id="{key}", update_mask=FieldMask(paths=["secret"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rotate the secret with new_secret",
    ),
    (
        "UpdateProviderKey",
        "unspecified status",
        apb.UpdateProviderKeyRequest(tenant="acme", id="{key}", update_mask=FieldMask(paths=["status"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "key.status is required; one of: active, disabled, revoked",
    ),
    (
        "UpdateProviderKey",
        "nothing to update",
        apb.UpdateProviderKeyRequest(tenant="acme", id="{key}"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "nothing to update",
    ),
    (
        "UpdateProviderKey",
        "bad new secret",
        apb.UpdateProviderKeyRequest(tenant="acme", id="{key}", new_secret="has space"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "new_secret must not contain whitespace",
    ),
    (
        "UpdateProviderKey",
        "unknown key",
        apb.UpdateProviderKeyRequest(tenant="acme", id="pk_missing", update_mask=FieldMask(paths=["weight"])),
        grpc.StatusCode.NOT_FOUND,
        "pk_missing",
    ),
    (
        "DeleteProviderKey",
        "unknown key",
        apb.DeleteProviderKeyRequest(tenant="acme", id="pk_x"),
        grpc.StatusCode.NOT_FOUND,
        "pk_x",
    ),
    (
        "DeleteProviderKey",
        "no id",
        apb.DeleteProviderKeyRequest(tenant="acme"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "id is required",
    ),
    (
        "CreateRoute",
        "no targets",
        apb.CreateRouteRequest(tenant="acme", public_model="chat"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one target",
    ),
    (
        "CreateRoute",
        "whitespace in public model",
        apb.CreateRouteRequest(tenant="acme", public_model="my model", targets=[_target()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "public_model must not contain whitespace",
    ),
    (
        "CreateRoute",
        "vllm without nodes",
        apb.CreateRouteRequest(
            tenant="acme", public_model="chat", targets=[_target(), _target(provider=rpb.PROVIDER_VLLM)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[1].node_urls needs at least one node URL",
    ),
    (
        "CreateRoute",
        "nodes on openai",
        apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target(node_urls=["http://a"])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].node_urls is only for provider vllm",
    ),
    (
        "CreateRoute",
        "messages on openai",
        apb.CreateRouteRequest(
            tenant="acme", public_model="chat", targets=[_target(endpoints=[rpb.ENDPOINT_MESSAGES])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].endpoints: messages is only for provider anthropic",
    ),
    (
        "CreateRoute",
        "api_version on openai",
        apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target(api_version="2024-10-21")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].api_version is only for provider azure_openai",
    ),
    (
        "CreateRoute",
        "malformed azure api_version",
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[_target(provider=rpb.PROVIDER_AZURE_OPENAI, api_version="2024-10-21&x=1")],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].api_version must look like 2024-10-21",
    ),
    (
        "CreateRoute",
        "azure deployment without api_version",
        apb.CreateRouteRequest(
            tenant="acme", public_model="chat", targets=[_target(provider=rpb.PROVIDER_AZURE_OPENAI, deployment="d")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].deployment needs an api_version",
    ),
    (
        "CreateRoute",
        "azure deployment with a slash",
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[_target(provider=rpb.PROVIDER_AZURE_OPENAI, api_version="2024-10-21", deployment="a/../b")],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].deployment must be 1-64 letters",
    ),
    (
        "CreateRoute",
        "target without model",
        apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[_target(upstream_model="")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "targets[0].upstream_model is required",
    ),
    (
        "CreateRoute",
        "duplicate public model",
        apb.CreateRouteRequest(tenant="acme", public_model="existing", targets=[_target()]),
        grpc.StatusCode.ALREADY_EXISTS,
        "existing",
    ),
    (
        "UpdateRoute",
        "unknown route",
        apb.UpdateRouteRequest(tenant="acme", id="rt_missing", targets=[_target()]),
        grpc.StatusCode.NOT_FOUND,
        "rt_missing",
    ),
    (
        "CreateClientKey",
        "empty label",
        apb.CreateClientKeyRequest(tenant="acme"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "label is required",
    ),
    (
        "CreateClientKey",
        "unknown tenant",
        apb.CreateClientKeyRequest(tenant="nope", label="x"),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    (
        "DeleteClientKey",
        "unknown",
        apb.DeleteClientKeyRequest(tenant="acme", id="ck_x"),
        grpc.StatusCode.NOT_FOUND,
        "ck_x",
    ),
]


async def test_bad_writes_are_refused_and_write_nothing(harness: Harness, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    admin = harness.admin
    await harness.tenant()
    key = await harness.key()
    await admin.CreateRoute(
        apb.CreateRouteRequest(tenant="acme", public_model="existing", targets=[_target()]), metadata=ADMIN_MD
    )

    async def state() -> tuple[Any, ...]:
        tenants = await admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD)
        keys = await admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
        routes = await admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)
        cks = await admin.ListClientKeys(apb.ListClientKeysRequest(tenant="acme"), metadata=ADMIN_MD)
        return tenants, keys, routes, cks, await harness.latest_version(), harness.plane.hub.version

    before = await state()
    failures = []
    for method, case, request, code, message in _BAD_WRITES:
        if getattr(request, "id", None) == "{key}":
            request.id = key.id
        with pytest.raises(aio.AioRpcError) as info:
            await getattr(admin, method)(request, metadata=ADMIN_MD)
        got = (info.value.code(), info.value.details() or "")
        if got[0] is not code or message not in got[1]:
            failures.append(f"{method} / {case}: expected {code.name} with {message!r}, got {got}")
        assert SECRET not in got[1] and "hunter2" not in got[1]
    assert not failures, "\n".join(failures)
    assert await state() == before
    assert SECRET not in caplog.text and "hunter2" not in caplog.text


async def test_reads_of_missing_objects(harness: Harness) -> None:
    admin = harness.admin
    await harness.tenant()
    cases: list[tuple[str, Any]] = [
        ("GetTenant", apb.GetTenantRequest(name="nope")),
        ("GetProviderKey", apb.GetProviderKeyRequest(tenant="acme", id="pk_nope")),
        ("GetRoute", apb.GetRouteRequest(tenant="acme", id="rt_nope")),
        ("ListRoutes", apb.ListRoutesRequest(tenant="nope")),
        ("ListClientKeys", apb.ListClientKeysRequest(tenant="nope")),
    ]
    for method, request in cases:
        with pytest.raises(aio.AioRpcError) as info:
            await getattr(admin, method)(request, metadata=ADMIN_MD)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND, method
    with pytest.raises(aio.AioRpcError) as info:
        await admin.GetTenant(apb.GetTenantRequest(name=""), metadata=ADMIN_MD)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "name is required"


async def test_store_down_gives_unavailable(harness: Harness) -> None:
    await harness.tenant()
    await harness.plane.store.close()
    with pytest.raises(aio.AioRpcError) as info:
        await harness.admin.CreateTenant(apb.CreateTenantRequest(name="globex"), metadata=ADMIN_MD)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
