"""TLS and mTLS on the control plane's gRPC port, over real sockets: who gets
through, who does not, and certificates rotated on disk while it runs."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from control_plane.auth import client_certificate_subject
from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.tls import ClientTls, ServerTls, TlsError, channel_credentials, channel_options, server_credentials
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, sidecar_service_pb2, sidecar_service_pb2_grpc
from tests.fakes.tls import Pki, make_pki, served_certificate

from .conftest import ADMIN_MD, ADMIN_TOKEN, SIDECAR_ALL, SIDECAR_ALL_MD


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "a")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "b")


def _config(tmp_path: Path, tls: ServerTls | None, **overrides: Any) -> ControlPlaneConfig:
    values: dict[str, Any] = {
        "store_url": f"sqlite:///{tmp_path / 'keyplane.db'}",
        "admin_token": ADMIN_TOKEN,
        "master_key": os.urandom(32),
        "sidecar_tokens": {SIDECAR_ALL: ("*",)},
        "listen": "127.0.0.1:0",
        "poll_interval": None,
        "shutdown_grace": 0.2,
        "tls": tls,
    }
    values.update(overrides)
    return ControlPlaneConfig(**values)


@pytest.fixture
async def mtls_plane(tmp_path: Path, pki: Pki) -> AsyncIterator[ControlPlane]:
    cert, key = pki.server()
    plane = ControlPlane(_config(tmp_path, ServerTls(cert, key, client_ca_file=pki.ca_file)))
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop(grace=0)


def _channel(address: str, tls: ClientTls | None) -> aio.Channel:
    if tls is None:
        return aio.insecure_channel(address)
    return aio.secure_channel(address, channel_credentials(tls), options=channel_options(tls))


async def _list_tenants(address: str, tls: ClientTls | None) -> list[str]:
    async with _channel(address, tls) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        listed = await admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD, timeout=5)
        return [t.name for t in listed.tenants]


async def _refused(address: str, tls: ClientTls | None) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as caught:
        await _list_tenants(address, tls)
    return caught.value.code()


async def test_admin_and_watch_get_through_over_mtls(mtls_plane: ControlPlane, pki: Pki) -> None:
    cert, key = pki.client("admin-1")
    tls = ClientTls(ca_file=pki.ca_file, cert_file=cert, key_file=key)
    async with _channel(mtls_plane.address, tls) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD, timeout=5)
        sidecar = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
        call = sidecar.Watch(sidecar_service_pb2.WatchRequest(sidecar_id="sc-tls"), metadata=SIDECAR_ALL_MD)
        first = await asyncio.wait_for(call.read(), 5)
        assert isinstance(first, sidecar_service_pb2.WatchResponse)
        assert [t.tenant for t in first.snapshot.tenants] == ["acme"]
        call.cancel()
    assert await _list_tenants(mtls_plane.address, tls) == ["acme"]


async def test_the_bearer_token_is_still_required_over_mtls(mtls_plane: ControlPlane, pki: Pki) -> None:
    cert, key = pki.client()
    async with _channel(mtls_plane.address, ClientTls(pki.ca_file, cert, key)) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(aio.AioRpcError) as caught:
            await admin.ListTenants(apb.ListTenantsRequest(), metadata=SIDECAR_ALL_MD, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_plaintext_client_is_refused(mtls_plane: ControlPlane) -> None:
    assert await _refused(mtls_plane.address, None) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_without_a_client_certificate_is_refused(mtls_plane: ControlPlane, pki: Pki) -> None:
    assert await _refused(mtls_plane.address, ClientTls(ca_file=pki.ca_file)) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(
    mtls_plane: ControlPlane, pki: Pki, other_pki: Pki
) -> None:
    cert, key = other_pki.client("intruder")
    tls = ClientTls(ca_file=pki.ca_file, cert_file=cert, key_file=key)
    assert await _refused(mtls_plane.address, tls) == grpc.StatusCode.UNAVAILABLE


async def test_a_server_from_another_ca_is_refused(mtls_plane: ControlPlane, pki: Pki, other_pki: Pki) -> None:
    cert, key = pki.client()
    tls = ClientTls(ca_file=other_pki.ca_file, cert_file=cert, key_file=key)
    assert await _refused(mtls_plane.address, tls) == grpc.StatusCode.UNAVAILABLE


async def test_the_server_name_is_checked_and_can_be_overridden(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.server(("keyplane.internal",))  # not valid for 127.0.0.1
    plane = ControlPlane(_config(tmp_path, ServerTls(cert, key)))
    await plane.start()
    try:
        assert await _refused(plane.address, ClientTls(ca_file=pki.ca_file)) == grpc.StatusCode.UNAVAILABLE
        wrong = ClientTls(ca_file=pki.ca_file, server_name="other.internal")
        assert await _refused(plane.address, wrong) == grpc.StatusCode.UNAVAILABLE
        # TLS without mTLS: no client certificate needed, the name override fixes the check.
        right = ClientTls(ca_file=pki.ca_file, server_name="keyplane.internal")
        assert await _list_tenants(plane.address, right) == []
    finally:
        await plane.stop(grace=0)


def _replace(source: Path, target: Path) -> None:
    """Swap a file in atomically, as a secret manager or cert-manager would."""
    tmp = target.with_name(target.name + ".new")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


async def test_a_certificate_rotated_on_disk_is_served_to_new_connections(
    tmp_path: Path, pki: Pki, other_pki: Pki
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert_a, key_a = pki.server(label="server-old", serial=1001)
    cert_file, key_file, ca_file = live / "tls.crt", live / "tls.key", live / "client-ca.crt"
    for source, target in ((cert_a, cert_file), (key_a, key_file), (pki.ca_file, ca_file)):
        shutil.copyfile(source, target)
    plane = ControlPlane(_config(tmp_path, ServerTls(cert_file, key_file, client_ca_file=ca_file)))
    await plane.start()
    client_a = pki.client("sidecar-a")
    old_ca_client = ClientTls(pki.ca_file, *client_a)
    try:
        served = await asyncio.to_thread(served_certificate, plane.address, pki, client_a)
        assert served.serial_number == 1001
        async with _channel(plane.address, old_ca_client) as kept:  # a connection that stays open
            kept_admin = admin_service_pb2_grpc.AdminServiceStub(kept)
            await kept_admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD, timeout=5)

            # Rotate to a server certificate from CA b. Half-way (the new certificate,
            # the old key) the server keeps its old pair instead of failing handshakes.
            cert_b, key_b = other_pki.server(label="server-new", serial=2002)
            _replace(cert_b, cert_file)
            served = await asyncio.to_thread(served_certificate, plane.address, pki, client_a)
            assert served.serial_number == 1001
            assert plane.tls_reloads == 0
            _replace(key_b, key_file)
            served = await asyncio.to_thread(served_certificate, plane.address, other_pki, client_a)
            assert served.serial_number == 2002
            assert plane.tls_reloads == 1

            # New connections: a client trusting only the old CA is refused, one trusting the new CA gets through.
            assert await _refused(plane.address, old_ca_client) == grpc.StatusCode.UNAVAILABLE
            assert await _list_tenants(plane.address, ClientTls(other_pki.ca_file, *client_a)) == []
            # The open connection keeps working.
            await kept_admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD, timeout=5)

        # The client CA rotates too: clients of CA a are refused, clients of CA b admitted.
        _replace(other_pki.ca_file, ca_file)
        client_b = other_pki.client("sidecar-b")
        assert await _list_tenants(plane.address, ClientTls(other_pki.ca_file, *client_b)) == []
        assert await _refused(plane.address, ClientTls(other_pki.ca_file, *client_a)) == grpc.StatusCode.UNAVAILABLE
        assert plane.tls_reloads == 2
    finally:
        await plane.stop(grace=0)


async def test_unusable_tls_files_stop_the_start_with_a_clear_error(tmp_path: Path, pki: Pki, other_pki: Pki) -> None:
    cert, _ = pki.server()
    _, other_key = other_pki.server()
    with pytest.raises(TlsError, match="does not belong to the certificate"):
        server_credentials(ServerTls(cert, other_key))
    with pytest.raises(TlsError, match="cannot read the TLS key"):
        server_credentials(ServerTls(cert, tmp_path / "missing.key"))
    plane = ControlPlane(_config(tmp_path, ServerTls(cert, other_key)))
    with pytest.raises(TlsError):
        await plane.start()


# --- the caller's certificate, for handlers -------------------------------------------------


def _echo_subject_server(
    tls: ServerTls,
) -> tuple[aio.Server, int]:
    async def subject(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        return (client_certificate_subject(context) or "<none>").encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Subject": grpc.unary_unary_rpc_method_handler(subject)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    credentials, _ = server_credentials(tls)
    return server, server.add_secure_port("127.0.0.1:0", credentials)


async def _subject(port: int, tls: ClientTls) -> str:
    async with _channel(f"127.0.0.1:{port}", tls) as channel:
        call: Callable[..., Awaitable[bytes]] = channel.unary_unary(
            "/test.Echo/Subject", request_serializer=None, response_deserializer=None
        )
        return (await call(b"", timeout=5)).decode()


async def test_handlers_can_read_the_client_certificate_subject(pki: Pki) -> None:
    cert, key = pki.server()
    client = pki.client("sidecar-eu-1")
    mtls_server, mtls_port = _echo_subject_server(ServerTls(cert, key, client_ca_file=pki.ca_file))
    tls_server, tls_port = _echo_subject_server(ServerTls(cert, key))
    await mtls_server.start()
    await tls_server.start()
    try:
        subject = await _subject(mtls_port, ClientTls(pki.ca_file, *client))
        assert "CN=sidecar-eu-1" in subject
        assert "O=keyplane" in subject
        assert await _subject(tls_port, ClientTls(pki.ca_file)) == "<none>"
    finally:
        await mtls_server.stop(0)
        await tls_server.stop(0)
