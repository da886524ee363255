"""A real control plane on 127.0.0.1:0 over a real SQLite file, and clients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, resources_pb2, sidecar_service_pb2, sidecar_service_pb2_grpc

ADMIN_TOKEN = "adm-4f1c9e2b7d6a5c3e"
SIDECAR_ALL = "sc-all-9b8a7c6d5e4f"
SIDECAR_ACME = "sc-acme-1a2b3c4d5e6f"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SIDECAR_ALL_MD = (("authorization", f"Bearer {SIDECAR_ALL}"),)
SIDECAR_ACME_MD = (("authorization", f"Bearer {SIDECAR_ACME}"),)
SECRET = "sk-test-SUPERSECRET-0123456789abcdefXYZ9"

WatchCall = aio.UnaryStreamCall[sidecar_service_pb2.WatchRequest, sidecar_service_pb2.WatchResponse]


@dataclass
class Harness:
    plane: ControlPlane
    channel: aio.Channel
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    sidecar: sidecar_service_pb2_grpc.SidecarServiceAsyncStub
    calls: list[WatchCall] = field(default_factory=list)

    async def latest_version(self) -> int:
        return await self.plane.store.latest_version()

    def watch(
        self,
        tenants: tuple[str, ...] = (),
        resume_version: int = 0,
        *,
        metadata: tuple[tuple[str, str], ...] = SIDECAR_ALL_MD,
        sidecar_id: str = "sc-test",
    ) -> WatchCall:
        call = self.sidecar.Watch(
            sidecar_service_pb2.WatchRequest(
                tenants=list(tenants), resume_version=resume_version, sidecar_id=sidecar_id
            ),
            metadata=metadata,
        )
        self.calls.append(call)
        return call

    async def tenant(self, name: str = "acme") -> None:
        await self.admin.CreateTenant(apb.CreateTenantRequest(name=name), metadata=ADMIN_MD)

    async def key(
        self, tenant: str = "acme", label: str = "main", secret: str = SECRET, **kwargs: Any
    ) -> resources_pb2.ProviderKey:
        kwargs.setdefault("provider", resources_pb2.PROVIDER_OPENAI)
        response = await self.admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(tenant=tenant, label=label, secret=secret, **kwargs),
            metadata=ADMIN_MD,
        )
        return response.key


EOF: object = aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


async def next_message(call: WatchCall, within: float = 1.0) -> sidecar_service_pb2.WatchResponse:
    message = await asyncio.wait_for(call.read(), within)
    assert message is not EOF, "the watch stream ended"
    assert isinstance(message, sidecar_service_pb2.WatchResponse)
    return message


def make_config(tmp_path: Path, **overrides: Any) -> ControlPlaneConfig:
    values: dict[str, Any] = {
        "store_url": f"sqlite:///{tmp_path / 'keyplane.db'}",
        "admin_token": ADMIN_TOKEN,
        "sidecar_tokens": {SIDECAR_ALL: ("*",), SIDECAR_ACME: ("acme",)},
        "master_key": os.urandom(32),
        "listen": "127.0.0.1:0",
        "poll_interval": None,
        "shutdown_grace": 0.2,
    }
    values.update(overrides)
    return ControlPlaneConfig(**values)


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    started: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        plane = ControlPlane(make_config(tmp_path, **overrides))
        await plane.start()
        channel = aio.insecure_channel(plane.address)
        harness = Harness(
            plane=plane,
            channel=channel,
            admin=admin_service_pb2_grpc.AdminServiceStub(channel),
            sidecar=sidecar_service_pb2_grpc.SidecarServiceStub(channel),
        )
        started.append(harness)
        return harness

    yield make
    for harness in started:
        for call in harness.calls:
            call.cancel()
        await harness.channel.close(grace=None)
        await harness.plane.stop(grace=0.2)


@pytest.fixture
async def harness(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


def rpc_error(exc_info: pytest.ExceptionInfo[aio.AioRpcError]) -> tuple[grpc.StatusCode, str]:
    return exc_info.value.code(), exc_info.value.details() or ""
