"""WatchClient: backoff (pure) and end to end against the real control plane."""

from __future__ import annotations

import logging
import random

import httpx
import pytest

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2
from sidecar.server import Sidecar
from sidecar.watch import Backoff
from tests.fakes.upstream import FakeUpstream

from .conftest import sidecar_config
from .plane import ADMIN_MD, SIDECAR_TOKEN, Plane, eventually

PROVIDER_SECRET = "sk-e2e-PROVIDER-SECRET-abcdef0123"
CHAT = "/v1/chat/completions"


def test_backoff_full_jitter_doubles_to_the_cap() -> None:
    backoff = Backoff(0.1, 5.0, random.Random(7))
    ceilings = []
    for _ in range(10):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert ceilings[-1] == 5.0
    backoff.reset()
    assert backoff.ceiling() == pytest.approx(0.1)


def test_backoff_survives_many_failures() -> None:
    backoff = Backoff(0.1, 5.0, random.Random(1))
    for _ in range(10_000):
        assert backoff.next_delay() <= 5.0


async def test_sidecar_follows_the_control_plane(plane: Plane, upstream: FakeUpstream) -> None:
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    key = (
        await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme",
                provider=resources_pb2.PROVIDER_OPENAI_COMPATIBLE,
                label="main",
                secret=PROVIDER_SECRET,
                base_url=upstream.base_url,
            ),
            metadata=ADMIN_MD,
        )
    ).key
    await admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="fast",
            targets=[
                resources_pb2.RouteTarget(
                    provider=resources_pb2.PROVIDER_OPENAI_COMPATIBLE, upstream_model="local-7b", weight=1
                )
            ],
        ),
        metadata=ADMIN_MD,
    )
    token = (
        await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    ).token

    config = sidecar_config(
        control_plane_target=plane.address,
        sidecar_token=SIDECAR_TOKEN,
        tenants=("acme",),
        watch_backoff_cap=0.5,
    )
    async with Sidecar(config) as sc, httpx.AsyncClient(base_url=sc.url) as http:
        assert await sc.wait_ready(10)
        headers = {"authorization": f"Bearer {token}"}
        body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
        r = await http.post(CHAT, json=body, headers=headers)
        assert r.status_code == 200, r.text
        [seen] = upstream.chat_requests()
        assert seen.headers["authorization"] == f"Bearer {PROVIDER_SECRET}"
        assert seen.json["model"] == "local-7b"
        assert (await http.get("/healthz")).json()["status"] == "ok"

        # A change made through the admin API reaches the sidecar.
        await admin.DeleteProviderKey(apb.DeleteProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)

        async def key_gone() -> bool:
            return (await http.post(CHAT, json=body, headers=headers)).status_code == 503

        await eventually(key_gone)

        # Control plane gone: the sidecar keeps serving its last-known state.
        version = sc.state.version
        await plane.stop()

        async def disconnected() -> bool:
            return not sc.state.connected

        await eventually(disconnected)
        assert (await http.get("/v1/models", headers=headers)).status_code == 200
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["version"] == version

        # It comes back: the sidecar reconnects and catches up.
        admin = await plane.start()
        second = (
            await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app2"), metadata=ADMIN_MD)
        ).token

        async def second_key_works() -> bool:
            r = await http.get("/v1/models", headers={"authorization": f"Bearer {second}"})
            return r.status_code == 200

        await eventually(second_key_works, within=10)
        assert sc.state.version > version
        assert sc.watch is not None and sc.watch.streams_opened >= 2


async def test_wrong_sidecar_token_is_logged_and_retried(plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    await plane.start()
    bad_token = "sc-wrong-token-77777777"
    config = sidecar_config(control_plane_target=plane.address, sidecar_token=bad_token, watch_backoff_cap=0.2)
    with caplog.at_level(logging.DEBUG, logger="sidecar"):
        async with Sidecar(config) as sc:
            assert not await sc.wait_ready(1.0)
            assert not sc.state.is_ready
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sidecar")]
    assert any("UNAUTHENTICATED" in m for m in messages)
    assert sum("UNAUTHENTICATED" in m for m in messages) >= 2  # retried
    assert all(bad_token not in m for m in messages)
