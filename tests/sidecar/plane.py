"""A real control plane for the sidecar's tests (watch, reports, one channel)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2_grpc

ADMIN_TOKEN = "adm-e2e-5d4c3b2a1f0e"
SIDECAR_TOKEN = "sc-e2e-acme-0f1e2d3c4b5a"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


class Plane:
    """A real control plane on a fixed port (so it can be restarted under the sidecar)."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.config = ControlPlaneConfig(
            store_url=f"sqlite:///{tmp_path / 'keyplane.db'}",
            admin_token=ADMIN_TOKEN,
            master_key=os.urandom(32),
            sidecar_tokens={SIDECAR_TOKEN: ("acme",)},
            listen=f"127.0.0.1:{port}",
            poll_interval=None,
            shutdown_grace=0.2,
        )
        self.address = f"127.0.0.1:{port}"
        self.plane: ControlPlane | None = None
        self.channel: aio.Channel | None = None
        self.admin: admin_service_pb2_grpc.AdminServiceAsyncStub | None = None

    async def start(self) -> admin_service_pb2_grpc.AdminServiceAsyncStub:
        self.plane = ControlPlane(self.config)
        await self.plane.start()
        self.channel = aio.insecure_channel(self.address)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        return self.admin

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None
        if self.plane is not None:
            await self.plane.stop(grace=0.2)
            self.plane = None


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
