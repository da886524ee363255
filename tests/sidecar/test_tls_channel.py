"""A sidecar on mTLS to the real control plane: its watch and its outcome
reports get through on one channel, and a client certificate rotated on disk is
used when the sidecar reconnects."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.tls import ClientTls, ServerTls, channel_credentials
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, resources_pb2
from sidecar.channel import ChannelSource
from sidecar.server import Sidecar
from tests.fakes.tls import Pki, make_pki

from .conftest import sidecar_config
from .plane import ADMIN_MD, ADMIN_TOKEN, SIDECAR_TOKEN, eventually
from .test_reporter import outcome, reporter_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TlsPlane:
    """A real control plane with mTLS on a fixed port, restartable with another client CA."""

    def __init__(self, tmp_path: Path, server: tuple[Path, Path]) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.address = f"127.0.0.1:{_free_port()}"
        self.master_key = os.urandom(32)
        self.plane: ControlPlane | None = None

    async def start(self, client_ca: Path) -> ControlPlane:
        config = ControlPlaneConfig(
            store_url=f"sqlite:///{self.tmp_path / 'keyplane.db'}",
            admin_token=ADMIN_TOKEN,
            master_key=self.master_key,
            sidecar_tokens={SIDECAR_TOKEN: ("acme",)},
            listen=self.address,
            poll_interval=None,
            shutdown_grace=0.2,
            tls=ServerTls(*self.server, client_ca_file=client_ca),
        )
        self.plane = ControlPlane(config)
        await self.plane.start()
        return self.plane

    async def stop(self) -> None:
        if self.plane is not None:
            await self.plane.stop(grace=0.2)
            self.plane = None


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "a")


async def test_sidecar_watches_and_reports_over_mtls_and_picks_up_a_rotated_client_certificate(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    other = make_pki(tmp_path / "pki", "b")
    server_cert, server_key = pki.server()
    # The sidecar's files, where a secret manager would put them.
    live = tmp_path / "sidecar-tls"
    live.mkdir()
    ca_file, cert_file, key_file = live / "ca.crt", live / "tls.crt", live / "tls.key"
    shutil.copyfile(pki.ca_file, ca_file)
    for source, target in zip(pki.client("sidecar-a"), (cert_file, key_file), strict=True):
        shutil.copyfile(source, target)

    tls_plane = TlsPlane(tmp_path, (server_cert, server_key))
    await tls_plane.start(pki.ca_file)
    try:
        key_id = await _create_tenant_and_key(tls_plane.address, pki)
        config = reporter_config(
            tls_plane.address,
            control_plane_tls=ClientTls(ca_file=ca_file, cert_file=cert_file, key_file=key_file),
            watch_backoff_cap=0.5,
        )
        async with Sidecar(config) as sc:
            assert await sc.wait_ready(10)
            assert sc.reporter is not None and sc.channel is not None
            sc.reporter.enqueue(outcome(key_id, 0))

            async def reported() -> bool:
                return sc.reporter is not None and sc.reporter.stats.sent >= 1

            await eventually(reported, within=10)

            # The fleet's client certificates move to CA b; the control plane restarts trusting only CA b.
            for source, target in zip(other.client("sidecar-a2"), (cert_file, key_file), strict=True):
                tmp = target.with_name(target.name + ".new")
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            await tls_plane.stop()
            await tls_plane.start(other.ca_file)
            connected_before = sc.watch.streams_opened if sc.watch is not None else 0

            async def watching_again() -> bool:
                return sc.watch is not None and sc.watch.streams_opened > connected_before

            await eventually(watching_again, within=15)
            assert sc.channel.reopened == 1
            assert sc.state.is_ready
            sc.reporter.enqueue(outcome(key_id, 1))

            async def reported_again() -> bool:
                return sc.reporter is not None and sc.reporter.stats.sent >= 2

            await eventually(reported_again, within=15)
    finally:
        await tls_plane.stop()
    assert "control-plane TLS files changed: new streams use a new channel with them" in caplog.text


async def _create_tenant_and_key(address: str, pki: Pki) -> str:
    cert, key = pki.client("admin")
    credentials = channel_credentials(ClientTls(pki.ca_file, cert, key))
    async with aio.secure_channel(address, credentials) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD, timeout=5)
        created = await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme", provider=resources_pb2.PROVIDER_OPENAI, label="main", secret="sk-tls-channel-0001"
            ),
            metadata=ADMIN_MD,
            timeout=5,
        )
        return created.key.id


async def test_plaintext_to_a_remote_control_plane_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.channel")
    for target in ("127.0.0.1:50051", "10.9.8.7:50051"):
        source = ChannelSource(sidecar_config(control_plane_target=target))
        await source.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "sidecar.channel"]
    assert len(warnings) == 1
    assert "10.9.8.7:50051 in plaintext" in warnings[0]
