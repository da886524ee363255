"""Issue 3 end to end: a real control plane (in-process, SQLite, real gRPC
socket), two real sidecars (real HTTP sockets, Watch + ReportOutcomes) and a
real fake upstream (aiohttp on 127.0.0.1) answering with the providers' real
error bodies. Configuration goes through the real admin API; assertions read
the admin API, the sidecars' HTTP answers and what the upstream received.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.domain import Provider
from keyplane.health.machine import HealthPolicy
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.upstream import (
    BROKEN_STREAM,
    CONTEXT_LENGTH_EXCEEDED,
    GEMINI_INVALID_API_KEY,
    SERVICE_UNAVAILABLE,
    FakeUpstream,
    rate_limited,
)

ADMIN_TOKEN = "adm-health-e2e-7c6b5a4d3e2f"
SIDECAR_TOKEN = "sc-health-e2e-acme-1f2e3d4c5b6a"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
TENANT = "acme"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
# Short cooldowns so the suite stays fast.
POLICY = HealthPolicy(
    error_window=30.0,
    error_threshold=5,
    base_cooldown=2.0,
    max_cooldown=10.0,
    rate_limit_default=2.0,
    provider_window=30.0,
    provider_threshold=2,
    provider_cooldown=10.0,
)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0, what: str = "condition") -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        if await check():
            return loop.time() - started
        if loop.time() - started > within:
            raise AssertionError(f"{what} not met within {within}s")
        await asyncio.sleep(0.02)


@dataclass
class Fleet:
    plane: ControlPlane
    channel: aio.Channel
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    upstream: FakeUpstream
    sidecars: list[Sidecar] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)
    token: str = ""
    # label -> key id
    keys: dict[str, str] = field(default_factory=dict)

    async def key(self, label: str, provider: rpb.Provider.ValueType, secret: str, weight: int = 1) -> str:
        response = await self.admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant=TENANT,
                provider=provider,
                label=label,
                secret=secret,
                base_url=self.upstream.base_url,
                weight=weight,
            ),
            metadata=ADMIN_MD,
        )
        self.keys[label] = response.key.id
        return response.key.id

    async def route(self, public_model: str, *targets: tuple[rpb.Provider.ValueType, str, int]) -> None:
        await self.admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant=TENANT,
                public_model=public_model,
                targets=[
                    rpb.RouteTarget(provider=provider, upstream_model=model, priority=priority)
                    for provider, model, priority in targets
                ],
            ),
            metadata=ADMIN_MD,
        )

    async def start_sidecars(self, count: int = 2, *, report_outcomes: bool = True) -> None:
        response = await self.admin.CreateClientKey(
            apb.CreateClientKeyRequest(tenant=TENANT, label="app"), metadata=ADMIN_MD
        )
        self.token = response.token
        for n in range(count):
            config = SidecarConfig(
                control_plane_target=self.plane.address,
                sidecar_token=SIDECAR_TOKEN,
                tenants=(TENANT,),
                port=0,
                sidecar_id=f"sidecar-{n + 1}",
                upstream_connect_timeout=2.0,
                upstream_read_timeout=10.0,
                request_timeout=15.0,
                shutdown_grace=1.0,
                watch_backoff_base=0.05,
                watch_backoff_cap=0.5,
                health_policy=POLICY,
                report_outcomes=report_outcomes,
                report_interval=0.01,
            )
            sidecar = Sidecar(config)
            await sidecar.start()
            self.sidecars.append(sidecar)
            assert await sidecar.wait_ready(10.0)
            client = httpx.AsyncClient(
                base_url=sidecar.url, timeout=20.0, headers={"authorization": f"Bearer {self.token}"}
            )
            self.clients.append(client)
        await self.synced()

    async def synced(self) -> None:
        """Every sidecar holds everything written so far."""
        latest = await self.plane.store.latest_version()

        async def check() -> bool:
            return all(s.state.version >= latest for s in self.sidecars)

        await eventually(check, what="sidecars in sync")

    async def chat(self, sidecar: int, model: str) -> httpx.Response:
        return await self.clients[sidecar].post(CHAT, json={"model": model, "messages": MESSAGES})

    async def health(self) -> apb.GetHealthResponse:
        return await self.admin.GetHealth(apb.GetHealthRequest(tenant=TENANT), metadata=ADMIN_MD)

    async def reported(self, count: int) -> None:
        """The control plane has folded at least ``count`` outcomes."""

        async def check() -> bool:
            return self.plane.aggregator.stats.accepted >= count

        await eventually(check, what=f"{count} outcomes accepted")


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
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
    async with FakeUpstream() as upstream:
        fleet = Fleet(plane, channel, admin_service_pb2_grpc.AdminServiceStub(channel), upstream)
        try:
            await fleet.admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
            yield fleet
        finally:
            for client in fleet.clients:
                await client.aclose()
            for sidecar in fleet.sidecars:
                await sidecar.stop()
            await channel.close(None)
            await plane.stop(grace=0.2)


def _key_health(response: apb.GetHealthResponse, key_id: str) -> list[rpb.KeyHealth]:
    return [h for h in response.key_health if h.key_id == key_id]


# (a) ------------------------------------------------------------------------------------


async def test_gemini_invalid_key_is_skipped_by_the_whole_fleet(fleet: Fleet) -> None:
    g1 = await fleet.key("g1", rpb.PROVIDER_GEMINI, "sk-gemini-bad-key-0001", weight=100)
    g2 = await fleet.key("g2", rpb.PROVIDER_GEMINI, "sk-gemini-good-key-0002")
    await fleet.route("chat", (rpb.PROVIDER_GEMINI, "gemini-2.0-flash", 0))
    await fleet.route("other", (rpb.PROVIDER_GEMINI, "gemini-2.5-pro", 0))
    await fleet.start_sidecars()
    up = fleet.upstream
    up.program("sk-gemini-bad-key-0001", GEMINI_INVALID_API_KEY)

    r = await fleet.chat(0, "chat")
    assert r.status_code == 200, r.text
    assert r.headers["x-keyplane-attempts"] == "2"
    assert r.headers["x-keyplane-key"] == g2
    assert r.headers["x-keyplane-excluded"] == f"{g1}:credential"
    assert up.secrets() == ["sk-gemini-bad-key-0001", "sk-gemini-good-key-0002"]

    # Marked bad key-wide, as the admin sees it.
    async def marked() -> bool:
        return any(
            h.model == "" and h.state == rpb.HEALTH_STATE_UNHEALTHY for h in _key_health(await fleet.health(), g1)
        )

    await eventually(marked, what="key 1 unhealthy in GetHealth")
    [entry] = _key_health(await fleet.health(), g1)
    assert "API key not valid" in entry.reason
    assert not entry.HasField("until")

    # The second sidecar learns it from the control plane, without paying a request.
    second = fleet.sidecars[1]

    async def pushed() -> bool:
        return not second.state.health(TENANT).key_usable(g1, "gemini-2.0-flash", time.time())

    await eventually(pushed, within=3.0, what="second sidecar skips key 1")
    mark = len(up.chat_requests())
    for model in ("chat", "other", "chat", "other", "chat"):
        r = await fleet.chat(1, model)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == g2
        assert r.headers["x-keyplane-excluded"] == f"{g1}:unhealthy"
    assert set(up.secrets(mark)) == {"sk-gemini-good-key-0002"}
    # Key 1 was only ever sent once, by the first sidecar.
    assert up.secrets().count("sk-gemini-bad-key-0001") == 1

    # The admin fixes the key and resets its health: every sidecar uses it again, the
    # first one included (its own finding is cleared by the pushed reset).
    up.reset("sk-gemini-bad-key-0001")
    await fleet.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant=TENANT, key_id=g1), metadata=ADMIN_MD)
    assert _key_health(await fleet.health(), g1) == []

    async def restored() -> bool:
        return all(s.state.health(TENANT).key_usable(g1, "gemini-2.0-flash", time.time()) for s in fleet.sidecars)

    await eventually(restored, what="key 1 usable again on every sidecar")
    for sidecar in (0, 1):
        r = await fleet.chat(sidecar, "chat")
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-key"] == g1


async def test_a_reset_clears_a_credential_finding_the_control_plane_never_heard_of(fleet: Fleet) -> None:
    """The sidecar found the key invalid on its own and its report never reached the
    control plane (here: reports are off), so the store has nothing for the key. An
    admin reset still reaches the sidecar over Watch and clears its finding, for
    every model."""
    g1 = await fleet.key("g1", rpb.PROVIDER_GEMINI, "sk-gemini-bad-key-0001", weight=100)
    g2 = await fleet.key("g2", rpb.PROVIDER_GEMINI, "sk-gemini-good-key-0002")
    await fleet.route("chat", (rpb.PROVIDER_GEMINI, "gemini-2.0-flash", 0))
    await fleet.route("other", (rpb.PROVIDER_GEMINI, "gemini-2.5-pro", 0))
    await fleet.start_sidecars(1, report_outcomes=False)
    up = fleet.upstream
    up.program("sk-gemini-bad-key-0001", GEMINI_INVALID_API_KEY)

    r = await fleet.chat(0, "chat")
    assert r.status_code == 200, r.text
    assert r.headers["x-keyplane-key"] == g2
    assert r.headers["x-keyplane-excluded"] == f"{g1}:credential"
    # A local verdict only: the control plane knows nothing of it ...
    assert fleet.plane.aggregator.stats.accepted == 0
    assert list((await fleet.health()).key_health) == []
    # ... and the sidecar skips the key for every model.
    for model in ("chat", "other"):
        r = await fleet.chat(0, model)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == g2
        assert r.headers["x-keyplane-excluded"] == f"{g1}:unhealthy"

    up.reset("sk-gemini-bad-key-0001")
    version = await fleet.plane.store.latest_version()
    await fleet.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant=TENANT, key_id=g1), metadata=ADMIN_MD)
    assert await fleet.plane.store.latest_version() > version  # the reset is a change, even with nothing stored
    await fleet.synced()

    mark = len(up.chat_requests())
    for model in ("chat", "other"):
        r = await fleet.chat(0, model)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == g1
        assert "x-keyplane-excluded" not in r.headers
    assert up.secrets(mark) == ["sk-gemini-bad-key-0001"] * 2


# (b) ------------------------------------------------------------------------------------


async def test_rate_limit_cools_one_model_down_and_expires(fleet: Fleet) -> None:
    k1 = await fleet.key("k1", rpb.PROVIDER_OPENAI, "sk-openai-limited-0001", weight=100)
    k2 = await fleet.key("k2", rpb.PROVIDER_OPENAI, "sk-openai-spare-0002")
    await fleet.route("model-a", (rpb.PROVIDER_OPENAI, "gpt-a", 0))
    await fleet.route("model-b", (rpb.PROVIDER_OPENAI, "gpt-b", 0))
    await fleet.start_sidecars()
    up = fleet.upstream
    up.program("sk-openai-limited-0001", rate_limited(2), model="gpt-a", times=1)

    r = await fleet.chat(0, "model-a")
    assert r.status_code == 200, r.text
    assert r.headers["x-keyplane-key"] == k2
    assert r.headers["x-keyplane-excluded"] == f"{k1}:rate_limited"

    async def cooling() -> bool:
        entries = _key_health(await fleet.health(), k1)
        return any(h.model == "gpt-a" and h.state == rpb.HEALTH_STATE_COOLDOWN for h in entries)

    await eventually(cooling, what="k1 cooling down for gpt-a")
    [entry] = _key_health(await fleet.health(), k1)  # never key-wide
    until = entry.until.ToNanoseconds() / 1e9
    assert 0 < until - time.time() <= 2.5

    async def pushed() -> bool:
        return not fleet.sidecars[1].state.health(TENANT).key_usable(k1, "gpt-a", time.time())

    await eventually(pushed, what="second sidecar knows the cooldown")
    mark = len(up.chat_requests())
    for sidecar in (0, 1):
        # Model B still uses key 1 ...
        r = await fleet.chat(sidecar, "model-b")
        assert r.status_code == 200 and r.headers["x-keyplane-key"] == k1
        # ... model A does not, on either sidecar.
        r = await fleet.chat(sidecar, "model-a")
        assert r.status_code == 200 and r.headers["x-keyplane-key"] == k2
        assert r.headers["x-keyplane-excluded"] == f"{k1}:cooldown"
    assert "sk-openai-limited-0001" not in up.secrets(mark, model="gpt-a")
    assert "sk-openai-limited-0001" in up.secrets(mark, model="gpt-b")

    # After the cooldown, key 1 serves model A again.
    await asyncio.sleep(max(0.0, until - time.time()) + 0.05)
    mark = len(up.chat_requests())
    for sidecar in (0, 1):
        r = await fleet.chat(sidecar, "model-a")
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-key"] == k1
        assert "x-keyplane-excluded" not in r.headers
    assert up.secrets(mark, model="gpt-a") == ["sk-openai-limited-0001"] * 2


# (c) ------------------------------------------------------------------------------------


async def test_same_provider_recovery_spares_the_provider_and_total_failure_does_not(fleet: Fleet) -> None:
    p1 = await fleet.key("p1", rpb.PROVIDER_GEMINI, "sk-gemini-p1-0001", weight=100)
    p2 = await fleet.key("p2", rpb.PROVIDER_GEMINI, "sk-gemini-p2-0002")
    q1 = await fleet.key("q1", rpb.PROVIDER_OPENAI, "sk-openai-q1-0003")
    await fleet.route("chat", (rpb.PROVIDER_GEMINI, "gemini-2.0-flash", 0), (rpb.PROVIDER_OPENAI, "gpt-4o-mini", 1))
    await fleet.start_sidecars()
    up = fleet.upstream

    # Key 1 fails (503), key 2 of the same provider recovers the request: twice, one per sidecar.
    up.program("sk-gemini-p1-0001", SERVICE_UNAVAILABLE, times=2)
    for sidecar in (0, 1):
        r = await fleet.chat(sidecar, "chat")
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-provider"] == "gemini"
        assert r.headers["x-keyplane-key"] == p2
        assert r.headers["x-keyplane-excluded"] == f"{p1}:upstream_error"
    await fleet.reported(4)
    health = await fleet.health()
    assert list(health.provider_health) == []  # untouched, although provider_threshold is 2
    assert list(health.key_health) == []  # 2 errors < error_threshold

    # Every key of Gemini fails: the request moves to OpenAI, and Gemini's health drops for this model.
    up.program("sk-gemini-p1-0001", SERVICE_UNAVAILABLE)
    up.program("sk-gemini-p2-0002", SERVICE_UNAVAILABLE)
    for sidecar in (0, 1):
        r = await fleet.chat(sidecar, "chat")
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-attempts"] == "3"
        assert r.headers["x-keyplane-provider"] == "openai"
        assert r.headers["x-keyplane-key"] == q1
        assert r.headers["x-keyplane-excluded"] == f"{p1}:upstream_error,{p2}:upstream_error"

    async def degraded() -> bool:
        return any(
            h.provider == rpb.PROVIDER_GEMINI and h.state == rpb.HEALTH_STATE_DEGRADED
            for h in (await fleet.health()).provider_health
        )

    await eventually(degraded, what="gemini degraded")
    [entry] = (await fleet.health()).provider_health
    assert entry.model == "gemini-2.0-flash"
    assert entry.HasField("until")

    # Degraded providers go last: both sidecars now ask OpenAI first.
    async def demoted() -> bool:
        return all(
            s.state.health(TENANT).provider_degraded(Provider.GEMINI, "gemini-2.0-flash", time.time())
            for s in fleet.sidecars
        )

    await eventually(demoted, what="sidecars demote gemini")
    mark = len(up.chat_requests())
    for sidecar in (0, 1):
        r = await fleet.chat(sidecar, "chat")
        assert r.status_code == 200
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-provider"] == "openai"
    assert up.secrets(mark) == ["sk-openai-q1-0003"] * 2


# (d) ------------------------------------------------------------------------------------


async def test_context_length_exceeded_goes_back_unchanged_and_penalises_nobody(fleet: Fleet) -> None:
    k1 = await fleet.key("k1", rpb.PROVIDER_OPENAI, "sk-openai-one-0001", weight=100)
    await fleet.key("k2", rpb.PROVIDER_OPENAI, "sk-openai-two-0002")
    await fleet.route("chat", (rpb.PROVIDER_OPENAI, "gpt-4o-mini", 0))
    await fleet.start_sidecars()
    up = fleet.upstream
    up.program("sk-openai-one-0001", CONTEXT_LENGTH_EXCEEDED)

    for sidecar in (0, 1, 0, 1):
        r = await fleet.chat(sidecar, "chat")
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        assert r.json() == CONTEXT_LENGTH_EXCEEDED.body
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == k1
        assert "x-keyplane-excluded" not in r.headers
    assert up.secrets() == ["sk-openai-one-0001"] * 4
    await fleet.reported(4)
    health = await fleet.health()
    assert list(health.key_health) == [] and list(health.provider_health) == []


# (e) ------------------------------------------------------------------------------------


async def test_a_stream_broken_mid_way_is_not_retried_and_is_reported(fleet: Fleet) -> None:
    k1 = await fleet.key("k1", rpb.PROVIDER_OPENAI, "sk-openai-one-0001", weight=100)
    await fleet.key("k2", rpb.PROVIDER_OPENAI, "sk-openai-two-0002")
    await fleet.route("chat", (rpb.PROVIDER_OPENAI, "gpt-4o-mini", 0))
    await fleet.start_sidecars(1)
    up = fleet.upstream
    up.program("sk-openai-one-0001", BROKEN_STREAM)

    payload = {"model": "chat", "messages": MESSAGES, "stream": True}
    for _ in range(POLICY.error_threshold):
        async with fleet.clients[0].stream("POST", CHAT, json=payload) as r:
            body = b"".join([c async for c in r.aiter_bytes()])
        assert r.status_code == 200
        assert r.headers["x-keyplane-attempts"] == "1"
        assert r.headers["x-keyplane-key"] == k1
        assert b'"content":"Hello"' in body
        assert b'"code":"stream_broken"' in body
        assert not body.endswith(b"data: [DONE]\n\n")
    # Never retried: one upstream request per app request.
    assert up.secrets() == ["sk-openai-one-0001"] * POLICY.error_threshold

    # The control plane received them as stream_broken: they count against (k1, model).
    async def cooled() -> bool:
        entries = _key_health(await fleet.health(), k1)
        return any(h.model == "gpt-4o-mini" and h.state == rpb.HEALTH_STATE_COOLDOWN for h in entries)

    await eventually(cooled, what="k1 cooled down by broken streams")
    [entry] = _key_health(await fleet.health(), k1)
    assert "stream" in entry.reason
