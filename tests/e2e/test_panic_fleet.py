"""A panic probe's success ends the cooldown for the whole fleet: a real control
plane (SQLite, gRPC socket), two real sidecars (HTTP sockets, Watch and
ReportOutcomes) and the real fake upstream."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.health.machine import HealthPolicy
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.upstream import SERVER_ERROR, FakeUpstream

from .test_health_failover import eventually

ADMIN_TOKEN = "adm-panic-e2e-3b2a1f0e9d8c"
SIDECAR_TOKEN = "sc-panic-e2e-acme-9d8c7b6a5f4e"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
TENANT = "acme"
SECRET = "sk-openai-only-key-0001"
MODEL = "gpt-4o-mini"
# Three errors cool the only key down for 30 s: far longer than the test runs.
POLICY = HealthPolicy(error_threshold=3, base_cooldown=30.0)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, admin_service_pb2_grpc.AdminServiceAsyncStub]]:
    config = ControlPlaneConfig(
        store_url=f"sqlite:///{tmp_path / 'keyplane.db'}",
        admin_token=ADMIN_TOKEN,
        master_key=os.urandom(32),
        sidecar_tokens={SIDECAR_TOKEN: (TENANT,)},
        listen="127.0.0.1:0",
        poll_interval=None,
        shutdown_grace=0.2,
        health_policy=POLICY,
    )
    plane = ControlPlane(config)
    await plane.start()
    channel = aio.insecure_channel(plane.address)
    try:
        yield plane, admin_service_pb2_grpc.AdminServiceStub(channel)
    finally:
        await channel.close(None)
        await plane.stop(grace=0.2)


async def test_a_probe_success_on_one_sidecar_ends_the_cooldown_on_every_sidecar(
    fleet: tuple[ControlPlane, admin_service_pb2_grpc.AdminServiceAsyncStub],
) -> None:
    plane, admin = fleet
    async with FakeUpstream() as upstream:
        await admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
        key = await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant=TENANT, provider=rpb.PROVIDER_OPENAI, label="only", secret=SECRET, base_url=upstream.base_url
            ),
            metadata=ADMIN_MD,
        )
        key_id = key.key.id
        await admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant=TENANT,
                public_model="chat",
                targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=MODEL)],
            ),
            metadata=ADMIN_MD,
        )
        token = (
            await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant=TENANT, label="app"), metadata=ADMIN_MD)
        ).token
        sidecars: list[Sidecar] = []
        clients: list[httpx.AsyncClient] = []
        try:
            for n in range(2):
                sidecar = Sidecar(
                    SidecarConfig(
                        control_plane_target=plane.address,
                        sidecar_token=SIDECAR_TOKEN,
                        tenants=(TENANT,),
                        port=0,
                        sidecar_id=f"panic-{n + 1}",
                        request_timeout=15.0,
                        shutdown_grace=1.0,
                        health_policy=POLICY,
                        report_interval=0.01,
                    )
                )
                await sidecar.start()
                sidecars.append(sidecar)
                assert await sidecar.wait_ready(10.0)
                clients.append(
                    httpx.AsyncClient(base_url=sidecar.url, timeout=20.0, headers={"authorization": f"Bearer {token}"})
                )

            async def chat(n: int) -> httpx.Response:
                return await clients[n].post(
                    "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
                )

            def usable(n: int) -> bool:
                return sidecars[n].state.health(TENANT).key_usable(key_id, MODEL, time.time())

            async def cooling_at_the_control_plane() -> bool:
                health = await admin.GetHealth(apb.GetHealthRequest(tenant=TENANT), metadata=ADMIN_MD)
                return any(h.key_id == key_id and h.state == rpb.HEALTH_STATE_COOLDOWN for h in health.key_health)

            # A blip seen by the first sidecar: the control plane cools the key down, and
            # the second sidecar learns it without sending anything.
            upstream.program(SECRET, SERVER_ERROR, times=3)
            for _ in range(3):
                assert (await chat(0)).status_code == 500
            await eventually(cooling_at_the_control_plane, what="cooldown at the control plane")

            async def second_knows() -> bool:
                return not usable(1)

            await eventually(second_knows, what="second sidecar knows the cooldown")
            assert len(upstream.chat_requests()) == 3

            # The provider is back: the first sidecar's next request is a probe, and succeeds.
            loop = asyncio.get_running_loop()
            probed = loop.time()
            r = await chat(0)
            assert r.status_code == 200, r.text

            async def everyone_recovered() -> bool:
                return usable(0) and usable(1) and not await cooling_at_the_control_plane()

            took = await eventually(everyone_recovered, within=3.0, what="the cooldown ended fleet-wide")
            # The second sidecar serves with the key as usual: no probe, nothing excluded.
            r = await chat(1)
            assert r.status_code == 200, r.text
            assert r.headers["x-keyplane-attempts"] == "1"
            assert "x-keyplane-excluded" not in r.headers
            assert len(upstream.chat_requests()) == 5
            print(
                f"\nprobe success on sidecar 1 ended the 30 s cooldown on the control plane and sidecar 2 "
                f"{took * 1000:.0f} ms later ({(loop.time() - probed) * 1000:.0f} ms after the probe was sent)"
            )
        finally:
            for client in clients:
                await client.aclose()
            for sidecar in sidecars:
                await sidecar.stop()
