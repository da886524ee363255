"""Token checks (pure) and the interceptor on a real server."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from grpc import aio

from control_plane.auth import Authenticator, PermissionDenied, SidecarScope, bearer_token
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import (
    ADMIN_MD,
    ADMIN_TOKEN,
    SIDECAR_ACME,
    SIDECAR_ACME_MD,
    SIDECAR_ALL,
    SIDECAR_ALL_MD,
    Harness,
)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", b"Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer"),), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: Any, expected: str | None) -> None:
    assert bearer_token(metadata) == expected


def test_authenticator() -> None:
    auth = Authenticator("adm", {"all": ("*",), "two": ("a", "b")})
    assert auth.is_admin("adm")
    assert not auth.is_admin("adm2") and not auth.is_admin(None) and not auth.is_admin("")
    assert auth.sidecar_scope("all") == SidecarScope(None)
    assert auth.sidecar_scope("two") == SidecarScope(frozenset({"a", "b"}))
    assert auth.sidecar_scope("adm") is None and auth.sidecar_scope(None) is None
    with pytest.raises(ValueError, match="admin token"):
        Authenticator("", {})
    with pytest.raises(ValueError, match="at least one tenant"):
        Authenticator("adm", {"t": ()})


def test_scope_resolution() -> None:
    two = SidecarScope(frozenset({"a", "b"}))
    assert two.resolve([]) == frozenset({"a", "b"})
    assert two.resolve(["a"]) == frozenset({"a"})
    with pytest.raises(PermissionDenied, match="may not watch tenant\\(s\\): c, d"):
        two.resolve(["a", "d", "c"])
    every = SidecarScope(None)
    assert every.resolve([]) is None
    assert every.resolve(["z"]) == frozenset({"z"})


_WRONG = [
    ("missing", ()),
    ("wrong", (("authorization", "Bearer not-the-token"),)),
    ("not bearer", (("authorization", f"Basic {ADMIN_TOKEN}"),)),
]


@pytest.mark.parametrize(("case", "metadata"), [*_WRONG, ("sidecar token", SIDECAR_ALL_MD)])
async def test_admin_needs_the_admin_token(
    harness: Harness, caplog: pytest.LogCaptureFixture, case: str, metadata: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(aio.AioRpcError) as info:
        await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=metadata)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "missing or invalid admin token"
    with pytest.raises(aio.AioRpcError) as info:
        await harness.admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=metadata)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert await harness.latest_version() == 0
    for token in (ADMIN_TOKEN, SIDECAR_ALL, "not-the-token"):
        assert token not in caplog.text


@pytest.mark.parametrize(("case", "metadata"), [*_WRONG, ("admin token", ADMIN_MD)])
async def test_watch_needs_a_sidecar_token(harness: Harness, case: str, metadata: Any) -> None:
    call = harness.sidecar.Watch(spb.WatchRequest(), metadata=metadata)
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == "missing or invalid sidecar token"


async def test_valid_tokens_pass(harness: Harness) -> None:
    await harness.tenant("acme")
    for metadata in (SIDECAR_ALL_MD, SIDECAR_ACME_MD):
        call = harness.watch(("acme",), metadata=metadata)
        message = await call.read()
        assert isinstance(message, spb.WatchResponse)
        assert message.snapshot.tenants[0].tenant == "acme"
    assert SIDECAR_ACME not in str(harness.plane.config)
