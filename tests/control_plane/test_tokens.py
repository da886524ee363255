"""API tokens through the admin API, over real gRPC on a real SQLite file:
created tokens authenticate (sidecar ones within their scope), revoked ones
do not (open streams end), bootstrap tokens keep working and cannot be
revoked, and no token value is ever shown again or stored."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc import aio

from control_plane.auth import Authenticator
from control_plane.revocation import REVOKED_DETAILS
from control_plane.token_registry import TokenRegistry
from keyplane.domain import AccessToken, TokenKind
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import (
    ADMIN_MD,
    ADMIN_TOKEN,
    EOF,
    SIDECAR_ACME_MD,
    SIDECAR_ALL_MD,
    Harness,
    HarnessFactory,
    next_message,
    rpc_error,
)
from tests.control_plane.test_health import credential, open_report, report

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def create_sidecar_token(
    harness: Harness, *tenants: str, all_tenants: bool = False, label: str = "fleet"
) -> apb.CreateSidecarTokenResponse:
    request = apb.CreateSidecarTokenRequest(label=label, tenants=list(tenants), all_tenants=all_tenants)
    response: apb.CreateSidecarTokenResponse = await harness.admin.CreateSidecarToken(request, metadata=ADMIN_MD)
    return response


async def create_admin_token(harness: Harness, label: str = "ops") -> apb.CreateAdminTokenResponse:
    response: apb.CreateAdminTokenResponse = await harness.admin.CreateAdminToken(
        apb.CreateAdminTokenRequest(label=label), metadata=ADMIN_MD
    )
    return response


async def stream_end(
    call: aio.UnaryStreamCall[spb.WatchRequest, spb.WatchResponse], within: float
) -> tuple[grpc.StatusCode, str]:
    """Read until the stream ends (it must, within ``within`` seconds); its status."""
    async with asyncio.timeout(within):
        try:
            while await call.read() is not EOF:
                pass
        except aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return await call.code(), await call.details()


async def test_admin_tokens_create_list_revoke(harness: Harness) -> None:
    created = await create_admin_token(harness, "ci-deploy")
    token, resource = created.token, created.admin_token
    assert token.startswith("kpa-") and len(token) == 4 + 43
    assert resource.id.startswith("at_") and resource.label == "ci-deploy"
    assert resource.prefix == token[:10] and resource.etag and not resource.HasField("revoke_time")

    # The new token is an admin: it can call admin RPCs, including the token ones.
    listed = await harness.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=bearer(token))
    assert [t.id for t in listed.admin_tokens] == [resource.id]
    assert token not in str(listed)  # the prefix only
    await harness.admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=bearer(token))

    revoked = await harness.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id=resource.id), metadata=ADMIN_MD)
    assert revoked.admin_token.HasField("revoke_time") and revoked.admin_token.etag != resource.etag
    # Refused at once (the RPC answered after this replica's registry learnt of it).
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(token))
    assert rpc_error(exc_info) == (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin token")
    # Still listed, as revoked; revoking again changes nothing.
    listed = await harness.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=ADMIN_MD)
    assert list(listed.admin_tokens) == [revoked.admin_token]
    again = await harness.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id=resource.id), metadata=ADMIN_MD)
    assert again.admin_token == revoked.admin_token


async def test_a_token_can_revoke_itself_and_the_bootstrap_token_stays(harness: Harness) -> None:
    created = await create_admin_token(harness)
    me = bearer(created.token)
    await harness.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id=created.admin_token.id), metadata=me)
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=me)
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    await harness.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=ADMIN_MD)


async def test_bootstrap_tokens_cannot_be_revoked_through_the_api(harness: Harness) -> None:
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id="bootstrap"), metadata=ADMIN_MD)
    code, details = rpc_error(exc_info)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("id: the bootstrap admin token") and "cannot be revoked through the API" in details
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.RevokeSidecarToken(apb.RevokeSidecarTokenRequest(id="bootstrap"), metadata=ADMIN_MD)
    code, details = rpc_error(exc_info)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "bootstrap sidecar tokens" in details
    # Not listed either: only managed tokens are.
    listed = await harness.admin.ListSidecarTokens(apb.ListSidecarTokensRequest(), metadata=ADMIN_MD)
    assert list(listed.sidecar_tokens) == []
    # And they keep working.
    await harness.tenant()
    assert (await next_message(harness.watch(("acme",), metadata=SIDECAR_ACME_MD))).HasField("snapshot")
    await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD)


async def test_unknown_ids_and_stale_etags(harness: Harness) -> None:
    created = await create_sidecar_token(harness, all_tenants=True)
    cases = [
        (apb.RevokeSidecarTokenRequest(id="st_nope"), grpc.StatusCode.NOT_FOUND, "sidecar token 'st_nope' not found"),
        # An admin token id is no sidecar token.
        (apb.RevokeSidecarTokenRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT, "id is required"),
        (
            apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id, etag="r9"),
            grpc.StatusCode.ABORTED,
            "was changed since it was read",
        ),
        (
            apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id, etag="bogus"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "etag: not an etag",
        ),
    ]
    for request, code, text in cases:
        with pytest.raises(aio.AioRpcError) as exc_info:
            await harness.admin.RevokeSidecarToken(request, metadata=ADMIN_MD)
        assert exc_info.value.code() is code
        assert text in (exc_info.value.details() or "")
    admin = await create_admin_token(harness)
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.RevokeSidecarToken(
            apb.RevokeSidecarTokenRequest(id=admin.admin_token.id), metadata=ADMIN_MD
        )
    assert exc_info.value.code() is grpc.StatusCode.NOT_FOUND
    ok = await harness.admin.RevokeSidecarToken(
        apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id, etag=created.sidecar_token.etag), metadata=ADMIN_MD
    )
    assert ok.sidecar_token.HasField("revoke_time")


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (apb.CreateSidecarTokenRequest(label="x"), "tenants: a sidecar token needs at least one tenant"),
        (apb.CreateSidecarTokenRequest(label="x", tenants=["acme"], all_tenants=True), "not both"),
        (apb.CreateSidecarTokenRequest(label="x", tenants=["Not A Tenant"]), "tenants"),
        (apb.CreateSidecarTokenRequest(label="", all_tenants=True), "label"),
        (apb.CreateSidecarTokenRequest(label="x", tenants=[f"t{i}" for i in range(1001)]), "at most 1000"),
    ],
)
async def test_create_sidecar_token_validation(
    harness: Harness, request_: apb.CreateSidecarTokenRequest, text: str
) -> None:
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.CreateSidecarToken(request_, metadata=ADMIN_MD)
    assert exc_info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert text in (exc_info.value.details() or "")
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.CreateAdminToken(apb.CreateAdminTokenRequest(label=""), metadata=ADMIN_MD)
    assert exc_info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_sidecar_token_scope_is_honoured(harness: Harness) -> None:
    await harness.tenant("acme")
    await harness.tenant("globex")
    scoped = await create_sidecar_token(harness, "acme", label="acme-fleet")
    assert scoped.token.startswith("kps-") and scoped.sidecar_token.id.startswith("st_")
    assert list(scoped.sidecar_token.tenants) == ["acme"] and not scoped.sidecar_token.all_tenants
    every = await create_sidecar_token(harness, all_tenants=True, label="everything")
    assert every.sidecar_token.all_tenants and list(every.sidecar_token.tenants) == []

    first = await next_message(harness.watch((), metadata=bearer(scoped.token)))
    assert [t.tenant for t in first.snapshot.tenants] == ["acme"]
    with pytest.raises(aio.AioRpcError) as exc_info:
        await next_message(harness.watch(("globex",), metadata=bearer(scoped.token)))
    assert rpc_error(exc_info) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "this sidecar token may not watch tenant(s): globex",
    )
    first = await next_message(harness.watch((), metadata=bearer(every.token)))
    assert [t.tenant for t in first.snapshot.tenants] == ["acme", "globex"]
    # A sidecar token is no admin token, nor the other way round.
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(every.token))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    admin = await create_admin_token(harness)
    with pytest.raises(aio.AioRpcError) as exc_info:
        await next_message(harness.watch((), metadata=bearer(admin.token)))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_revoking_a_sidecar_token_ends_its_streams_and_refuses_new_ones(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    doomed = await create_sidecar_token(harness, "acme")
    other = await create_sidecar_token(harness, "acme", label="other")
    watch = harness.watch(("acme",), metadata=bearer(doomed.token))
    assert (await next_message(watch)).HasField("snapshot")
    survivor = harness.watch(("acme",), metadata=bearer(other.token))
    assert (await next_message(survivor)).HasField("snapshot")
    bootstrap = harness.watch(("acme",), metadata=SIDECAR_ALL_MD)
    assert (await next_message(bootstrap)).HasField("snapshot")
    reporter = open_report(harness, bearer(doomed.token))
    await reporter.write(spb.ReportOutcomesRequest(outcomes=[credential(key.id)], sidecar_id="sc-1"))
    await next_message(watch)  # the report was folded: its health change arrived

    started = time.monotonic()
    await harness.admin.RevokeSidecarToken(apb.RevokeSidecarTokenRequest(id=doomed.sidecar_token.id), metadata=ADMIN_MD)
    assert await stream_end(watch, within=1.0) == (grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
    with pytest.raises(aio.AioRpcError) as exc_info:
        await asyncio.wait_for(reporter, 1.0)
    assert rpc_error(exc_info) == (grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
    assert time.monotonic() - started < 1.0

    with pytest.raises(aio.AioRpcError) as exc_info:
        await next_message(harness.watch(("acme",), metadata=bearer(doomed.token)))
    assert rpc_error(exc_info) == (grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")

    # The other streams carry on: a change still reaches them.
    await harness.admin.CreateTenant(apb.CreateTenantRequest(name="globex"), metadata=ADMIN_MD)
    await harness.key(label="second", secret="sk-second-secret-0123456789abcdef")
    assert (await next_message(survivor)).HasField("delta")
    assert (await next_message(bootstrap)).HasField("delta")


async def test_tokens_survive_a_restart(make_harness: HarnessFactory, tmp_path: Path) -> None:
    first = await make_harness()
    kept = await create_sidecar_token(first, all_tenants=True)
    gone = await create_admin_token(first)
    await first.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id=gone.admin_token.id), metadata=ADMIN_MD)
    admin = await create_admin_token(first, "kept")
    await first.plane.stop(grace=0)

    second = await make_harness()  # same SQLite file, other bootstrap tokens would work the same
    assert (await next_message(second.watch(metadata=bearer(kept.token)))).HasField("snapshot")
    await second.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(admin.token))
    with pytest.raises(aio.AioRpcError) as exc_info:
        await second.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(gone.token))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_no_token_value_in_responses_logs_or_the_database(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = await create_admin_token(harness)
    sidecar = await create_sidecar_token(harness, all_tenants=True)
    listed = [
        await harness.admin.ListAdminTokens(apb.ListAdminTokensRequest(), metadata=ADMIN_MD),
        await harness.admin.ListSidecarTokens(apb.ListSidecarTokensRequest(), metadata=ADMIN_MD),
        await harness.admin.RevokeSidecarToken(
            apb.RevokeSidecarTokenRequest(id=sidecar.sidecar_token.id), metadata=ADMIN_MD
        ),
    ]
    await harness.plane.stop(grace=0)  # flushes the SQLite WAL into the file
    data = b"".join(await asyncio.to_thread(lambda: [p.read_bytes() for p in tmp_path.glob("keyplane.db*")]))
    for token in (admin.token, sidecar.token):
        assert all(
            token not in str(message) and token.encode() not in message.SerializeToString() for message in listed
        )
        assert token not in caplog.text
        assert token.encode() not in data
        assert token[10:].encode() not in data  # not even the part after the shown prefix
        assert hashlib.sha256(token.encode()).digest() in data  # what is stored instead
    assert ADMIN_TOKEN not in caplog.text


def test_admin_identity_names_the_token() -> None:
    registry = TokenRegistry()
    auth = Authenticator("boot-admin-token", {"boot-sidecar": ("*",)}, registry)
    registry.apply(
        AccessToken(
            id="at_abc",
            kind=TokenKind.ADMIN,
            label="ops",
            prefix="kpa-manage",
            token_sha256=hashlib.sha256(b"kpa-managed").digest(),
            tenants=None,
            created_at=datetime.now(UTC),
        )
    )
    assert auth.admin_identity("boot-admin-token") == "admin-token:bootstrap"
    assert auth.admin_identity("kpa-managed") == "admin-token:at_abc"
    assert auth.admin_identity("kpa-other") is None
    assert auth.admin_identity(None) is None
    assert auth.admin_identity("boot-sidecar") is None
    assert auth.is_admin("kpa-managed") and not auth.is_admin("boot-sidecar")
    registry.remove("at_abc")
    assert auth.admin_identity("kpa-managed") is None
    assert Authenticator("boot-admin-token", {}).admin_identity("boot-admin-token") == "admin-token:bootstrap"


async def test_streams_of_a_valid_managed_token_behave_as_before(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    created = await create_sidecar_token(harness, "acme")
    # A whole report stream: the reply counts what was accepted.
    assert await report(harness, [credential(key.id)], metadata=bearer(created.token)) == 1
    # A watch the sidecar cancels frees its subscription.
    watch = harness.watch(("acme",), metadata=bearer(created.token), sidecar_id="sc-leaving")
    assert (await next_message(watch)).HasField("snapshot")
    assert [s.sidecar_id for s in harness.plane.hub.cache.connected()] == ["sc-leaving"]
    watch.cancel()
    for _ in range(100):
        if not harness.plane.hub.cache.connected():
            break
        await asyncio.sleep(0.01)
    assert harness.plane.hub.cache.connected() == []
    # Revoking it afterwards touches nothing else.
    await harness.admin.RevokeSidecarToken(
        apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id), metadata=ADMIN_MD
    )
    assert harness.plane.hub.tokens.is_valid(created.sidecar_token.id) is False


async def test_token_changes_never_reach_the_sidecars(harness: Harness) -> None:
    await harness.tenant()
    watch = harness.watch(metadata=SIDECAR_ALL_MD)
    assert (await next_message(watch)).HasField("snapshot")
    created = await create_sidecar_token(harness, all_tenants=True)
    await create_admin_token(harness)
    await harness.admin.RevokeSidecarToken(
        apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id), metadata=ADMIN_MD
    )
    # The hub moved past the three token changes without publishing them.
    assert harness.plane.hub.version == await harness.latest_version()
    key = await harness.key()
    delta = await next_message(watch)
    assert [c.WhichOneof("change") for c in delta.delta.changes] == ["key_put"]
    assert delta.delta.changes[0].key_put.id == key.id and delta.version == await harness.latest_version()


async def test_token_writes_are_audited_without_the_token(harness: Harness) -> None:
    created = await create_sidecar_token(harness, "acme")
    admin = await create_admin_token(harness)
    await harness.admin.RevokeSidecarToken(
        apb.RevokeSidecarTokenRequest(id=created.sidecar_token.id), metadata=bearer(admin.token)
    )
    with pytest.raises(aio.AioRpcError):
        await harness.admin.RevokeAdminToken(apb.RevokeAdminTokenRequest(id="bootstrap"), metadata=ADMIN_MD)
    events = (await harness.admin.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=ADMIN_MD)).events
    seen = [(e.method, e.resource_kind, e.resource_id, e.caller, list(e.fields), e.result) for e in reversed(events)]
    assert seen == [
        (
            "CreateSidecarToken",
            "sidecar_token",
            created.sidecar_token.id,
            "admin-token:bootstrap",
            ["label", "tenants"],
            "ok",
        ),
        ("CreateAdminToken", "admin_token", admin.admin_token.id, "admin-token:bootstrap", ["label"], "ok"),
        (
            "RevokeSidecarToken",
            "sidecar_token",
            created.sidecar_token.id,
            f"admin-token:{admin.admin_token.id}",
            ["revoke_time"],
            "ok",
        ),
        ("RevokeAdminToken", "admin_token", "", "admin-token:bootstrap", [], "INVALID_ARGUMENT"),
    ]
    for token in (created.token, admin.token):
        assert token not in str(events)
