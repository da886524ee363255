"""A sidecar holds one connection to the control plane: the real control plane
sees its Watch stream and its ReportOutcomes stream come from one peer address,
before and after the control plane restarts under it, and over TLS (where two
channels would each open a connection of their own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

import pytest

from keyplane.tls import ClientTls
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, resources_pb2
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.tls import self_signed_certificate

from .plane import ADMIN_MD, Plane, eventually
from .test_reporter import accepted, outcome, reporter_config

SIDECAR_ID = "sc-one-connection"


async def _setup(plane: Plane) -> tuple[admin_service_pb2_grpc.AdminServiceAsyncStub, str]:
    """Start the control plane with tenant acme and one key; returns (admin stub, key id)."""
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    key = await admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme", provider=resources_pb2.PROVIDER_OPENAI, label="main", secret="sk-shared-channel-0001"
        ),
        metadata=ADMIN_MD,
    )
    return admin, key.key.id


def _config(target: str, **overrides: object) -> SidecarConfig:
    return reporter_config(target, **{"sidecar_id": SIDECAR_ID, **overrides})


async def _watch_peers(admin: admin_service_pb2_grpc.AdminServiceAsyncStub) -> list[str]:
    """The peer addresses of this sidecar's watch streams, as the control plane lists them."""
    listed = await admin.ListSidecars(apb.ListSidecarsRequest(), metadata=ADMIN_MD)
    return [s.peer for s in listed.sidecars if s.sidecar_id == SIDECAR_ID]


def _report_peers(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The peer addresses of this sidecar's outcome streams, as the control plane logged them."""
    return [
        str(r.args[1])
        for r in caplog.records
        if r.name == "control_plane.sidecar_service"
        and r.msg == "sidecar %r (%s) reporting outcomes"
        and isinstance(r.args, tuple)
        and r.args[0] == SIDECAR_ID
    ]


async def _report_one(sc: Sidecar, plane: Plane, key_id: str, n: int = 0) -> None:
    assert sc.reporter is not None
    sc.reporter.enqueue(outcome(key_id, n))

    async def reported() -> bool:
        return accepted(plane) >= 1

    await eventually(reported, within=10)


async def test_watch_and_reports_share_one_connection(plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="control_plane.sidecar_service")
    admin, key_id = await _setup(plane)
    async with Sidecar(_config(plane.address)) as sc:
        assert sc.watch is not None and sc.reporter is not None
        assert await sc.wait_ready(10)
        await _report_one(sc, plane, key_id)
        [watch_peer] = await _watch_peers(admin)
        assert watch_peer.startswith("ipv4:127.0.0.1:")
        assert _report_peers(caplog) == [watch_peer]

        # The control plane restarts: both streams come back, again over one connection.
        await plane.stop()
        admin = await plane.start()
        caplog.clear()

        async def watching_again() -> bool:
            return len(await _watch_peers(admin)) == 1

        await eventually(watching_again, within=10)
        await _report_one(sc, plane, key_id, 1)
        [watch_peer] = await _watch_peers(admin)
        assert _report_peers(caplog) == [watch_peer]
        assert sc.watch.streams_opened >= 2
        assert sc.reporter.stats.streams >= 2
        assert sc.reporter.stats.dropped_total == 0
    # Stopped cleanly: the flush went over the shared channel before it closed.
    assert sc.reporter.stats.sent == 2


# --- over TLS ------------------------------------------------------------------------------


class TlsTerminator:
    """A TLS-terminating TCP proxy in front of the control plane (as an ingress
    would be): every TLS connection it accepts becomes one plain connection to
    the control plane, so the control plane sees one peer per sidecar connection."""

    def __init__(self, backend: str, cert_file: Path, key_file: Path) -> None:
        self._backend_host, port = backend.rsplit(":", 1)
        self._backend_port = int(port)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert_file, key_file)
        self._context.set_alpn_protocols(["h2"])
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            backend_reader, backend_writer = await asyncio.open_connection(self._backend_host, self._backend_port)
        except OSError:
            writer.close()
            return
        self._writers.add(backend_writer)
        pipes = [
            asyncio.create_task(self._pipe(reader, backend_writer)),
            asyncio.create_task(self._pipe(backend_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()


async def test_over_tls_too_the_sidecar_opens_one_connection(
    plane: Plane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="control_plane.sidecar_service")
    admin, key_id = await _setup(plane)
    cert_file, key_file = self_signed_certificate(tmp_path)
    terminator = TlsTerminator(plane.address, cert_file, key_file)
    await terminator.start()
    try:
        config = _config(f"127.0.0.1:{terminator.port}", control_plane_tls=ClientTls(ca_file=cert_file))
        async with Sidecar(config) as sc:
            assert await sc.wait_ready(10)
            await _report_one(sc, plane, key_id)
            [watch_peer] = await _watch_peers(admin)
            assert _report_peers(caplog) == [watch_peer]
            assert terminator.accepted == 1
    finally:
        await terminator.close()
