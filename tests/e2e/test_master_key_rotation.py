"""Master-key rotation under sidecar traffic, end to end: a real control
plane (in-process, SQLite or Postgres, real gRPC socket), a real sidecar
(real HTTP socket) and a real fake upstream. Chat completions stream through
the sidecar without pause while a new master key lands in the keyring file
and every secret is rewrapped: no request fails, and the sidecar's snapshot
(version and keys) does not change. After the old key is retired, a control
plane restarted with only the new key serves every secret again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.domain import Provider
from keyplane.keyring import ciphertext_key_id, legacy_key_id
from keyplane.keyring_file import write_keyring_file
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream
from tests.pg import fresh_schema, schema_url

ADMIN_TOKEN = "adm-mk-e2e-5d4c3b2a1f0e"
SIDECAR_TOKEN = "sc-mk-e2e-acme-0a1b2c3d4e5f"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
TENANT = "acme"
K0, K1 = os.urandom(32), os.urandom(32)
SECRETS = [f"sk-mk-e2e-{n}-UPSTREAM-SECRET" for n in range(4)]


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keyplane.db'}"
        return
    async with fresh_schema("kp_mke2e") as schema:
        yield schema_url(schema)


def _config(store_url: str, keyring: Path, master_key: bytes, listen: str) -> ControlPlaneConfig:
    return ControlPlaneConfig(
        store_url=store_url,
        admin_token=ADMIN_TOKEN,
        master_key=master_key,
        master_keyring_file=keyring,
        master_keyring_check_interval=0.05,
        sidecar_tokens={SIDECAR_TOKEN: (TENANT,)},
        listen=listen,
        poll_interval=None,
        shutdown_grace=0.2,
    )


async def _sidecar(target: str, n: int) -> Sidecar:
    sidecar = Sidecar(
        SidecarConfig(
            control_plane_target=target,
            sidecar_token=SIDECAR_TOKEN,
            tenants=(TENANT,),
            port=0,
            sidecar_id=f"mk-sidecar-{n}",
            upstream_connect_timeout=2.0,
            request_timeout=15.0,
            shutdown_grace=1.0,
            watch_backoff_base=0.05,
            watch_backoff_cap=0.2,
            report_interval=0.05,
        )
    )
    await sidecar.start()
    assert await sidecar.wait_ready(10.0)
    return sidecar


def _held(sidecar: Sidecar) -> dict[str, str]:
    return {k.id: k.secret for k in sidecar.state.keys(TENANT, Provider.OPENAI)}


async def _traffic(client: httpx.AsyncClient, stop: asyncio.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        response = await client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        )
        statuses.append(response.status_code)


async def _steady_traffic(sidecar: Sidecar, token: str, work: asyncio.Future[Any]) -> list[int]:
    """Requests from 4 concurrent clients until ``work`` is done (and a little after)."""
    stop = asyncio.Event()
    statuses: list[int] = []
    async with httpx.AsyncClient(
        base_url=sidecar.url, timeout=20.0, headers={"authorization": f"Bearer {token}"}
    ) as client:
        workers = [asyncio.create_task(_traffic(client, stop, statuses)) for _ in range(4)]
        await asyncio.sleep(0.2)
        try:
            await work
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    return statuses


async def test_rotation_under_traffic_has_no_failed_request_and_no_sidecar_change(
    store_url: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "master.keyring"  # absent: the single legacy key K0 seals everything
    plane = ControlPlane(_config(store_url, keyring, K0, "127.0.0.1:0"))
    await plane.start()
    channel = aio.insecure_channel(plane.address)
    admin = admin_service_pb2_grpc.AdminServiceStub(channel)
    sidecars: list[Sidecar] = []
    try:
        async with FakeUpstream() as upstream:
            await admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
            for n, secret in enumerate(SECRETS):
                await admin.CreateProviderKey(
                    apb.CreateProviderKeyRequest(
                        tenant=TENANT,
                        provider=rpb.PROVIDER_OPENAI,
                        label=f"k{n}",
                        secret=secret,
                        base_url=upstream.base_url,
                    ),
                    metadata=ADMIN_MD,
                )
            await admin.CreateRoute(
                apb.CreateRouteRequest(
                    tenant=TENANT,
                    public_model="chat",
                    targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o-mini")],
                ),
                metadata=ADMIN_MD,
            )
            token = (
                await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant=TENANT, label="app"), metadata=ADMIN_MD)
            ).token
            sidecars.append(await _sidecar(plane.address, 1))
            sidecar = sidecars[0]
            version, held = sidecar.state.version, _held(sidecar)
            assert sorted(held.values()) == sorted(SECRETS)
            store_version = await plane.store.latest_version()

            async def rotate() -> apb.RewrapSecretsResponse:
                write_keyring_file(keyring, [(legacy_key_id(K0), K0), ("k1", K1)])
                for _ in range(250):  # the control plane re-reads the file
                    status = await admin.GetMasterKeyStatus(apb.GetMasterKeyStatusRequest(), metadata=ADMIN_MD)
                    if status.primary_key_id == "k1":
                        break
                    await asyncio.sleep(0.02)
                total = apb.RewrapSecretsResponse()
                page = ""
                while True:  # one secret per transaction: the rewrap spans the traffic
                    resp = await admin.RewrapSecrets(
                        apb.RewrapSecretsRequest(primary_key_id="k1", batch_size=1, page_token=page),
                        metadata=ADMIN_MD,
                    )
                    total.rewrapped += resp.rewrapped
                    total.examined += resp.examined
                    await asyncio.sleep(0.05)
                    page = resp.next_page_token
                    if not page:
                        return total

            rotation = asyncio.ensure_future(rotate())
            statuses = await _steady_traffic(sidecar, token, rotation)
            assert (rotation.result().examined, rotation.result().rewrapped) == (4, 4)
            assert len(statuses) >= 20
            assert set(statuses) == {200}, [s for s in statuses if s != 200]
            assert (sidecar.state.version, _held(sidecar)) == (version, held)
            assert await plane.store.latest_version() == store_version
            assert set(upstream.secrets()) <= set(SECRETS)
            for key in await plane.store.list_provider_keys(TENANT):
                assert ciphertext_key_id(key.secret_ciphertext) == "k1"

            # Retire the old key, restart the control plane with only the new one
            # (same address): the sidecar reconnects and keeps serving; a new
            # sidecar gets every secret.
            status = await admin.GetMasterKeyStatus(apb.GetMasterKeyStatusRequest(), metadata=ADMIN_MD)
            assert {u.key_id: u.secrets for u in status.usage} == {legacy_key_id(K0): 0, "k1": 4}
            write_keyring_file(keyring, [("k1", K1)])
            address = plane.address
            await channel.close(None)
            await plane.stop(grace=0)
            plane = ControlPlane(_config(store_url, keyring, b"", address))

            async def restart() -> None:
                await asyncio.sleep(0.3)  # the sidecar serves from its cache meanwhile
                await plane.start()

            statuses = await _steady_traffic(sidecar, token, asyncio.ensure_future(restart()))
            assert len(statuses) >= 5 and set(statuses) == {200}
            for _ in range(200):  # the sidecar is back on the restarted control plane
                if any(i.sidecar_id == "mk-sidecar-1" for i in plane.hub.cache.connected()):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the sidecar did not reconnect")
            assert (sidecar.state.version, _held(sidecar)) == (version, held)
            assert plane.master_keys.current().ids == ("k1",)
            sidecars.append(await _sidecar(plane.address, 2))
            assert _held(sidecars[1]) == held
            channel = aio.insecure_channel(plane.address)
    finally:
        for sidecar in sidecars:
            await sidecar.stop()
        await channel.close(None)
        await plane.stop(grace=0.2)
