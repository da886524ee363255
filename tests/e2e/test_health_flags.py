"""The health-policy flags reach the running processes: the real ``keyplane``
command in subprocesses, a real fake upstream, outcomes reported over the
real ReportOutcomes RPC, health read back through the admin API."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, sidecar_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.e2e.processes import Running, child_env, cli, start
from tests.e2e.test_quickstart import _wait_until_served
from tests.fakes.upstream import SERVICE_UNAVAILABLE, FakeUpstream

ADMIN_TOKEN = "adm-health-flags-0a1b2c3d4e5f"
SIDECAR_TOKEN = "sc-health-flags-6a7b8c9d0e1f"
SECRET = "sk-upstream-health-flags-0001"
OTHER_MODEL = "reported-directly"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


class Plane:
    """A control plane's admin and sidecar APIs, as seen from outside."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = aio.insecure_channel(target)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        self.sidecar = sidecar_service_pb2_grpc.SidecarServiceStub(self.channel)

    async def configure(self, upstream: FakeUpstream, admin_md: tuple[tuple[str, str], ...]) -> tuple[str, str]:
        """Tenant, one key, one route, one client key; returns (key id, client token)."""
        await self.admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=admin_md)
        key = await self.admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme",
                provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
                label="only",
                secret=SECRET,
                base_url=upstream.base_url,
            ),
            metadata=admin_md,
        )
        await self.admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant="acme",
                public_model="gpt-test",
                targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI_COMPATIBLE, upstream_model="upstream-model")],
            ),
            metadata=admin_md,
        )
        client = await self.admin.CreateClientKey(
            apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=admin_md
        )
        return key.key.id, client.token

    async def report_error(self, key_id: str, sidecar_token: str) -> None:
        """One upstream error for (key, OTHER_MODEL), folded before this returns."""
        outcome = spb.Outcome(
            tenant="acme",
            key_id=key_id,
            provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
            model=OTHER_MODEL,
            outcome_class=spb.OUTCOME_CLASS_UPSTREAM_ERROR,
            status_code=503,
            request_id="req-direct",
        )
        call = self.sidecar.ReportOutcomes(None, metadata=(("authorization", f"Bearer {sidecar_token}"),))
        await call.write(spb.ReportOutcomesRequest(outcomes=[outcome], sidecar_id="sc-direct"))
        await call.done_writing()
        assert (await asyncio.wait_for(call, 10.0)).accepted == 1

    async def cooldowns(self, admin_md: tuple[tuple[str, str], ...]) -> dict[str, float]:
        """model -> seconds left, for the COOLDOWN entries of the tenant's keys."""
        health = await self.admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=admin_md)
        return {
            h.model: h.until.ToNanoseconds() / 1e9 - time.time()
            for h in health.key_health
            if h.state == rpb.HEALTH_STATE_COOLDOWN
        }

    async def close(self) -> None:
        await self.channel.close(None)


async def _chat(url: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20.0) as client:
        return await client.post(
            f"{url}/chat/completions",
            headers={"authorization": f"Bearer {token}"},
            json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]},
        )


class Deployment:
    """A real ``keyplane control-plane`` (SQLite) and ``keyplane sidecar`` processes."""

    def __init__(self, tmp_path: Path, env_extra: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.admin_file = tmp_path / "admin.token"
        self.admin_file.write_text(ADMIN_TOKEN + "\n")
        self.tokens_file = tmp_path / "sidecar.tokens"
        self.tokens_file.write_text(f"{SIDECAR_TOKEN} acme\n")
        self.sidecar_file = tmp_path / "sidecar.token"
        self.sidecar_file.write_text(SIDECAR_TOKEN + "\n")
        self.env = child_env(
            tmp_path / "home",
            {"KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), **(env_extra or {})},
        )
        self.admin_md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        self.processes: list[Running] = []
        self.plane: Plane | None = None

    async def start_plane(self, *flags: str) -> Plane:
        process = await start(
            [
                "control-plane",
                "--listen",
                "127.0.0.1:0",
                "--store",
                f"sqlite:///{self.tmp_path / 'keyplane.db'}",
                "--admin-token-file",
                str(self.admin_file),
                "--sidecar-tokens-file",
                str(self.tokens_file),
                *flags,
            ],
            self.env,
            r"control plane listening on port \d+",
        )
        self.processes.append(process)
        port = process.find(r"listening on port (\d+)").group(1)
        self.plane = Plane(f"127.0.0.1:{port}")
        return self.plane

    async def start_sidecar(self, token: str, *flags: str) -> str:
        """A sidecar with ``flags``, serving once this returns; its base URL."""
        assert self.plane is not None
        process = await start(
            [
                "sidecar",
                "--control-plane",
                self.plane.target,
                "--token-file",
                str(self.sidecar_file),
                "--port",
                "0",
                *flags,
            ],
            self.env,
            r"sidecar listening on http://",
        )
        self.processes.append(process)
        url = process.find(r"(http://\S+/v1)").group(1)
        await _wait_until_served(url, token)
        return url

    async def stop(self) -> None:
        if self.plane is not None:
            await self.plane.close()
        for process in reversed(self.processes):
            assert await process.stop() == 0, process.output


async def test_control_plane_and_sidecar_run_the_policy_their_flags_and_environment_set(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    # From the environment: caps the 40 s asked for on the command line.
    deployment = Deployment(tmp_path, {"KEYPLANE_HEALTH_MAX_COOLDOWN": "25"})
    try:
        # The control plane cools a (key, model) down after 2 errors (default 3) ...
        plane = await deployment.start_plane("--health-error-threshold", "2", "--health-base-cooldown", "40")
        admin_md = deployment.admin_md
        key_id, token = await plane.configure(upstream, admin_md)
        # ... and this sidecar after 1 (locally, before the control plane says anything).
        # (No panic routing: the cooling key is not probed by the next request.)
        url = await deployment.start_sidecar(token, "--health-error-threshold", "1", "--no-panic-routing")

        # The sidecar: one 503 and the only key cools down there at once.
        upstream.program(SECRET, SERVICE_UNAVAILABLE, times=1)
        first = await _chat(url, token)
        assert first.headers["x-keyplane-excluded"] == f"{key_id}:upstream_error"
        second = await _chat(url, token)
        assert second.headers["x-keyplane-excluded"] == f"{key_id}:cooldown", second.text
        assert upstream.secrets() == [SECRET]  # the second request never left the sidecar

        # The control plane: one error is not enough, the second one is; the cooldown is
        # the flag's 40 s capped by the environment's 25 s (the defaults would say 10 s).
        await plane.report_error(key_id, SIDECAR_TOKEN)
        assert OTHER_MODEL not in await plane.cooldowns(admin_md)
        await plane.report_error(key_id, SIDECAR_TOKEN)
        left = (await plane.cooldowns(admin_md))[OTHER_MODEL]
        assert 20.0 < left <= 25.0
    finally:
        await deployment.stop()


async def test_up_hands_its_flags_to_the_control_plane(tmp_path: Path, upstream: FakeUpstream) -> None:
    home = tmp_path / "home"
    up = await start(
        [
            "up",
            "--listen",
            "127.0.0.1:0",
            "--port",
            "0",
            "--health-error-threshold",
            "1",
            "--health-base-cooldown",
            "33",
            "--health-retry-interval",
            "0.5",
        ],
        child_env(home),
        r"sidecar listening on http://",
    )
    plane = Plane(up.find(r"control plane listening on (\S+)").group(1))
    try:
        admin_md = (("authorization", f"Bearer {(home / 'admin.token').read_text().strip()}"),)
        key_id, _ = await plane.configure(upstream, admin_md)
        await plane.report_error(key_id, (home / "sidecar.token").read_text().strip())
        left = (await plane.cooldowns(admin_md))[OTHER_MODEL]
        assert 28.0 < left <= 33.0
    finally:
        await plane.close()
        assert await up.stop() == 0, up.output


async def test_bad_values_stop_the_command_with_a_clear_message(tmp_path: Path) -> None:
    env = child_env(tmp_path / "home")
    store = f"sqlite:///{tmp_path / 'never.db'}"
    result = await cli(["control-plane", "--store", store, "--health-max-cooldown", "-1"], env)
    assert result.code == 2
    assert "argument --health-max-cooldown: must be a positive number of seconds, got '-1'" in result.stderr
    result = await cli(["sidecar", "--health-error-threshold", "0"], env)
    assert result.code == 2
    assert "argument --health-error-threshold: must be at least 1, got '0'" in result.stderr
    bad_env = child_env(tmp_path / "home", {"KEYPLANE_HEALTH_IDLE_TTL": "0"})
    result = await cli(["up", "--listen", "127.0.0.1:0", "--port", "0"], bad_env)
    assert result.code == 1
    assert "KEYPLANE_HEALTH_IDLE_TTL: must be a positive number of seconds, got '0'" in result.stderr
    assert not (tmp_path / "home").exists()  # stopped before touching anything


async def test_a_sidecar_without_outcome_reports_acts_alone(tmp_path: Path, upstream: FakeUpstream) -> None:
    """``--no-outcome-reports``: the sidecar still cools the key down itself, but the
    control plane (which would cool it down after one error too) never hears of it."""
    deployment = Deployment(tmp_path)
    try:
        plane = await deployment.start_plane("--health-error-threshold", "1")
        key_id, token = await plane.configure(upstream, deployment.admin_md)
        # (No panic routing: the cooling key is not probed by the next request.)
        url = await deployment.start_sidecar(
            token, "--health-error-threshold", "1", "--no-outcome-reports", "--no-panic-routing"
        )
        upstream.program(SECRET, SERVICE_UNAVAILABLE, times=1)
        first = await _chat(url, token)
        assert first.headers["x-keyplane-excluded"] == f"{key_id}:upstream_error"
        second = await _chat(url, token)
        assert second.headers["x-keyplane-excluded"] == f"{key_id}:cooldown"
        await asyncio.sleep(0.5)  # ten report intervals: a report would have been folded by now
        assert await plane.cooldowns(deployment.admin_md) == {}
    finally:
        await deployment.stop()
