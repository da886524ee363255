"""The audit log through the admin API on a real control plane (SQLite, and
Postgres where it matters): one event per write with who, what and the
result, failed attempts too, never a secret, and a write whose audit row
cannot be written fails and changes nothing."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from control_plane.auth import Authenticator
from control_plane.server import ControlPlane
from keyplane import convert
from keyplane.crypto import fingerprint
from keyplane.tls import ClientTls, ServerTls, channel_credentials, channel_options
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import (
    ADMIN_MD,
    ADMIN_TOKEN,
    SECRET,
    SIDECAR_ALL_MD,
    Harness,
    HarnessFactory,
    make_config,
    rpc_error,
)
from tests.control_plane.test_health import credential, get_health, report
from tests.fakes.tls import make_pki

PG_DSN = os.environ.get("KEYPLANE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ROTATED = "sk-rotated-AUDIT-SECRET-0123456789abcdef"
CALLER = "admin-token:bootstrap"
TARGET = rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")


class Database:
    """Raw SQL on the control plane's database, beside the store."""

    def __init__(self, sqlite_path: Path | None = None, schema: str | None = None) -> None:
        self.sqlite_path = sqlite_path
        self.schema = schema

    async def execute(self, *statements: str) -> None:
        if self.sqlite_path is not None:
            conn = sqlite3.connect(self.sqlite_path)
            try:
                with conn:
                    for statement in statements:
                        conn.execute(statement)
            finally:
                conn.close()
            return
        pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{self.schema}"'})
        try:
            for statement in statements:
                await pg.execute(statement)
        finally:
            await pg.close()

    async def rows(self, table: str) -> list[tuple[Any, ...]]:
        if self.sqlite_path is not None:
            conn = sqlite3.connect(self.sqlite_path)
            try:
                return list(conn.execute(f"SELECT * FROM {table}").fetchall())
            finally:
                conn.close()
        pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{self.schema}"'})
        try:
            return [tuple(r) for r in await pg.fetch(f"SELECT * FROM {table}")]
        finally:
            await pg.close()

    async def refuse_audit_rows(self, condition: str) -> None:
        """Make the audit table refuse rows matching ``condition`` (on NEW)."""
        if self.sqlite_path is not None:
            await self.execute(
                f"CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events WHEN {condition} "
                "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
            )
            return
        await self.execute(
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {condition} THEN RAISE EXCEPTION 'audit refused'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
        )


@pytest.fixture(params=["sqlite", "postgres"])
async def plane(
    request: pytest.FixtureRequest, make_harness: HarnessFactory, tmp_path: Path
) -> AsyncIterator[tuple[Harness, Database]]:
    if request.param == "sqlite":
        yield await make_harness(), Database(sqlite_path=tmp_path / "keyplane.db")
        return
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"Postgres at {PG_DSN} is unreachable: {type(exc).__name__}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"kp_audit_{uuid.uuid4().hex[:16]}"
    try:
        yield await make_harness(store_url=f"{PG_DSN}?schema={schema}"), Database(schema=schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def events(harness: Harness, **filters: Any) -> list[rpb.AuditEvent]:
    response = await harness.admin.ListAuditEvents(apb.ListAuditEventsRequest(**filters), metadata=ADMIN_MD)
    return list(response.events)


Summary = tuple[str, str, str, str, str, tuple[str, ...], str, str]


def summary(event: rpb.AuditEvent) -> Summary:
    return (
        event.caller,
        event.method,
        event.tenant,
        event.resource_kind,
        event.resource_id,
        tuple(event.fields),
        event.fingerprint,
        event.result,
    )


async def test_every_admin_write_records_one_event_and_no_secret(plane: tuple[Harness, Database]) -> None:
    harness, database = plane
    admin = harness.admin
    before = datetime.now(UTC) - timedelta(seconds=1)
    seen: list[Summary] = []

    async def expect(method: str, kind: str, resource: str, fields: tuple[str, ...] = (), fp: str = "") -> None:
        seen.append((CALLER, method, "acme", kind, resource, fields, fp, "ok"))
        got = await events(harness)
        assert [summary(e) for e in reversed(got)] == seen, method

    await harness.tenant()
    await expect("CreateTenant", "tenant", "acme", ("name",))
    key = await harness.key()
    create_fields = ("provider", "label", "secret", "base_url", "weight", "allowed_models")
    await expect("CreateProviderKey", "provider_key", key.id, create_fields, fingerprint(SECRET))
    update = apb.UpdateProviderKeyRequest(
        tenant="acme",
        id=key.id,
        key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED, weight=4),
        update_mask=FieldMask(paths=["status", "weight"]),
    )
    key = (await admin.UpdateProviderKey(update, metadata=ADMIN_MD)).key
    await expect("UpdateProviderKey", "provider_key", key.id, ("status", "weight"))
    rotate = apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED, etag=key.etag)
    await admin.UpdateProviderKey(rotate, metadata=ADMIN_MD)
    await expect("UpdateProviderKey", "provider_key", key.id, ("secret",), fingerprint(ROTATED))
    await admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key.id), metadata=ADMIN_MD)
    await expect("ResetKeyHealth", "provider_key", key.id, ("health",))
    route = (
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[TARGET]), metadata=ADMIN_MD
        )
    ).route
    await expect("CreateRoute", "route", route.id, ("public_model", "targets"))
    rename = apb.UpdateRouteRequest(
        tenant="acme",
        id=route.id,
        route=rpb.Route(public_model="chat-2"),
        update_mask=FieldMask(paths=["public_model"]),
    )
    await admin.UpdateRoute(rename, metadata=ADMIN_MD)
    await expect("UpdateRoute", "route", route.id, ("public_model",))
    await admin.UpdateRoute(apb.UpdateRouteRequest(tenant="acme", id=route.id, targets=[TARGET]), metadata=ADMIN_MD)
    await expect("UpdateRoute", "route", route.id, ("targets",))
    issued = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    ck = issued.client_key
    await expect("CreateClientKey", "client_key", ck.id, ("label", "token"), fingerprint(issued.token))
    # Reads are not recorded.
    await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    await admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)
    await admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=ADMIN_MD)
    await admin.DeleteClientKey(apb.DeleteClientKeyRequest(tenant="acme", id=ck.id), metadata=ADMIN_MD)
    await expect("DeleteClientKey", "client_key", ck.id)
    await admin.DeleteRoute(apb.DeleteRouteRequest(tenant="acme", id=route.id), metadata=ADMIN_MD)
    await expect("DeleteRoute", "route", route.id)
    await admin.DeleteProviderKey(apb.DeleteProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    await expect("DeleteProviderKey", "provider_key", key.id)
    await admin.DeleteTenant(apb.DeleteTenantRequest(name="acme"), metadata=ADMIN_MD)
    await expect("DeleteTenant", "tenant", "acme")

    listed = await events(harness)
    assert [e.id for e in listed] == sorted((e.id for e in listed), reverse=True)
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert all(before <= convert.datetime_from_timestamp(e.time) <= after for e in listed)
    raw = repr(await database.rows("audit_events"))
    assert len(await database.rows("audit_events")) == len(seen)
    for secret in (SECRET, ROTATED, issued.token, ADMIN_TOKEN):
        assert secret not in raw


async def test_failed_writes_are_recorded_with_their_status(plane: tuple[Harness, Database]) -> None:
    harness, _ = plane
    admin = harness.admin
    await harness.tenant()
    key = await harness.key()
    await admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme", id=key.id, key=rpb.ProviderKey(weight=2), update_mask=FieldMask(paths=["weight"])
        ),
        metadata=ADMIN_MD,
    )
    failures: list[tuple[Any, Any, grpc.StatusCode]] = [
        (
            admin.UpdateProviderKey,
            apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED, etag=key.etag),
            grpc.StatusCode.ABORTED,
        ),
        (admin.CreateTenant, apb.CreateTenantRequest(name="acme"), grpc.StatusCode.ALREADY_EXISTS),
        (admin.DeleteRoute, apb.DeleteRouteRequest(tenant="acme", id="rt_missing"), grpc.StatusCode.NOT_FOUND),
        (
            admin.CreateRoute,
            apb.CreateRouteRequest(tenant="acme", public_model="chat"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for rpc, request, code in failures:
        with pytest.raises(aio.AioRpcError) as info:
            await rpc(request, metadata=ADMIN_MD)
        assert rpc_error(info)[0] == code
    got = [summary(e) for e in (await events(harness))[:4]]
    assert got == [
        (CALLER, "CreateRoute", "acme", "route", "", ("public_model", "targets"), "", "INVALID_ARGUMENT"),
        (CALLER, "DeleteRoute", "acme", "route", "rt_missing", (), "", "NOT_FOUND"),
        (CALLER, "CreateTenant", "acme", "tenant", "acme", ("name",), "", "ALREADY_EXISTS"),
        (CALLER, "UpdateProviderKey", "acme", "provider_key", key.id, ("secret",), fingerprint(ROTATED), "ABORTED"),
    ]
    # The stale rotation changed nothing.
    got_key = await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert got_key.key.fingerprint == fingerprint(SECRET)
    # An unauthenticated call never reaches a handler: nothing to record.
    count = len(await events(harness))
    with pytest.raises(aio.AioRpcError) as info:
        await admin.CreateTenant(apb.CreateTenantRequest(name="intruder"), metadata=SIDECAR_ALL_MD)
    assert rpc_error(info)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert len(await events(harness)) == count


async def test_a_write_whose_audit_row_is_refused_fails_and_changes_nothing(
    plane: tuple[Harness, Database], caplog: pytest.LogCaptureFixture
) -> None:
    harness, database = plane
    admin = harness.admin
    await harness.tenant()
    key = await harness.key()
    await database.refuse_audit_rows("NEW.method IN ('UpdateProviderKey', 'CreateRoute', 'ResetKeyHealth')")
    version = await harness.latest_version()
    changes_before = len(await database.rows("changes"))
    events_before = await events(harness)

    attempts: list[tuple[Any, Any]] = [
        (admin.UpdateProviderKey, apb.UpdateProviderKeyRequest(tenant="acme", id=key.id, new_secret=ROTATED)),
        (admin.CreateRoute, apb.CreateRouteRequest(tenant="acme", public_model="chat", targets=[TARGET])),
        (admin.ResetKeyHealth, apb.ResetKeyHealthRequest(tenant="acme", key_id=key.id)),
    ]
    for rpc, request in attempts:
        with pytest.raises(aio.AioRpcError) as info:
            await rpc(request, metadata=ADMIN_MD)
        code, details = rpc_error(info)
        assert code == grpc.StatusCode.INTERNAL
        assert ROTATED not in details
    assert await harness.latest_version() == version
    assert len(await database.rows("changes")) == changes_before
    assert await database.rows("routes") == []
    got = await admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert (got.key.fingerprint, got.key.etag) == (fingerprint(SECRET), key.etag)
    # The failed attempts could not be recorded either (same refusal): logged.
    assert await events(harness) == events_before
    assert "could not record the failed UpdateProviderKey call (INTERNAL)" in caplog.text
    assert ROTATED not in caplog.text
    # Other writes still go through, with their events.
    await harness.tenant("beta")
    assert (await events(harness))[0].method == "CreateTenant"


async def test_paging_and_filters(harness: Harness) -> None:
    admin = harness.admin
    await harness.tenant("acme")
    await harness.tenant("beta")
    acme_keys = [(await harness.key("acme", label=f"k{i}")).id for i in range(5)]
    beta_key = (await harness.key("beta", label="b")).id
    everything = await events(harness, page_size=1000)
    assert len(everything) == 8

    pages: list[rpb.AuditEvent] = []
    token = ""
    while True:
        response = await admin.ListAuditEvents(
            apb.ListAuditEventsRequest(page_size=3, page_token=token), metadata=ADMIN_MD
        )
        assert len(response.events) <= 3
        pages += response.events
        token = response.next_page_token
        if not token:
            break
    assert pages == everything

    assert [e.resource_id for e in await events(harness, tenant="beta")] == [beta_key, "beta"]
    assert [e.resource_id for e in await events(harness, tenant="acme", resource_kind="provider_key")] == list(
        reversed(acme_keys)
    )
    assert [e.method for e in await events(harness, resource_id=acme_keys[2])] == ["CreateProviderKey"]
    assert [e.resource_id for e in await events(harness, resource_kind="tenant")] == ["beta", "acme"]
    # Time window: start inclusive, end exclusive.
    third = everything[-3]
    start, end = third.time.ToNanoseconds(), everything[0].time.ToNanoseconds()
    window = await events(harness, start_time=third.time, end_time=everything[0].time)
    assert window == [e for e in everything if start <= e.time.ToNanoseconds() < end]
    assert third in window and everything[0] not in window
    future = convert.timestamp_from_datetime(datetime.now(UTC) + timedelta(hours=1))
    assert await events(harness, start_time=future) == []

    first = await admin.ListAuditEvents(apb.ListAuditEventsRequest(page_size=2), metadata=ADMIN_MD)
    bad: list[tuple[apb.ListAuditEventsRequest, str]] = [
        (apb.ListAuditEventsRequest(page_size=-1), "page_size"),
        (apb.ListAuditEventsRequest(page_token="not-a-token"), "page_token"),
        (apb.ListAuditEventsRequest(page_token=first.next_page_token, tenant="beta"), "filters changed"),
        (apb.ListAuditEventsRequest(tenant="Not A Tenant"), "tenant"),
        (apb.ListAuditEventsRequest(resource_kind="Provider Key"), "resource_kind"),
        (apb.ListAuditEventsRequest(start_time=future, end_time=third.time), "end_time"),
    ]
    for request, field in bad:
        with pytest.raises(aio.AioRpcError) as info:
            await admin.ListAuditEvents(request, metadata=ADMIN_MD)
        code, details = rpc_error(info)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details
    # A page size above the maximum is the maximum; 0 is the default.
    assert len(await events(harness, page_size=5000)) == 8
    with pytest.raises(aio.AioRpcError) as info:
        await admin.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=SIDECAR_ALL_MD)
    assert rpc_error(info)[0] == grpc.StatusCode.UNAUTHENTICATED


async def test_the_caller_names_the_client_certificate_over_mtls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", "a")
    cert, key = pki.server()
    plane = ControlPlane(make_config(tmp_path, tls=ServerTls(cert, key, client_ca_file=pki.ca_file)))
    await plane.start()
    try:
        tls = ClientTls(pki.ca_file, *pki.client("ops-admin"))
        async with aio.secure_channel(plane.address, channel_credentials(tls), options=channel_options(tls)) as ch:
            admin = admin_service_pb2_grpc.AdminServiceStub(ch)
            await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD, timeout=5)
            listed = await admin.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=ADMIN_MD, timeout=5)
    finally:
        await plane.stop(grace=0)
    caller = listed.events[0].caller
    assert caller.startswith(f"{CALLER} cert:") and "CN=ops-admin" in caller
    assert ADMIN_TOKEN not in caller


def test_the_admin_identity_never_holds_the_token() -> None:
    auth = Authenticator(ADMIN_TOKEN, {"sc-token": ("*",)})
    assert auth.admin_identity(ADMIN_TOKEN) == CALLER
    assert auth.admin_identity("sc-token") is None and auth.admin_identity(None) is None
    assert auth.admin_identity(ADMIN_TOKEN + "x") is None


async def test_learnt_health_is_not_an_admin_write(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    count = len(await events(harness))
    version = await harness.latest_version()
    assert await report(harness, [credential(key.id)]) == 1
    await harness.plane.aggregator.flush()
    assert [h.key_id for h in (await get_health(harness)).key_health] == [key.id]
    assert await harness.latest_version() > version  # the finding was written to the store
    assert len(await events(harness)) == count


async def test_a_write_failing_for_an_unavailable_store_is_only_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.plane.store.close()
    with pytest.raises(aio.AioRpcError) as info:
        await harness.tenant()
    assert rpc_error(info)[0] == grpc.StatusCode.UNAVAILABLE
    assert "could not record the failed CreateTenant call (UNAVAILABLE): the store is unavailable" in caplog.text
