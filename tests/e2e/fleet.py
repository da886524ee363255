"""Real ``keyplane control-plane`` and ``keyplane sidecar`` processes on fixed ports (so
either can be killed and started again in place), and a steady load through the sidecars."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from google.protobuf import field_mask_pb2
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from tests.e2e.processes import Running, child_env, start
from tests.fakes.upstream import FakeUpstream

__all__ = ["Fleet", "Load", "free_port"]

ADMIN_TOKEN = "adm-fleet-0a1b2c3d4e5f6a7b"
SIDECAR_TOKEN = "kps-fleet-6a7b8c9d0e1f2a3b"
MODEL = "gpt-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Fleet:
    """One control plane (SQLite unless ``store_url`` is given) and its
    sidecars, configured through the admin API; more replicas of the control
    plane on the same store with ``start_replica``."""

    def __init__(self, tmp_path: Path, store_url: str | None = None) -> None:
        self.tmp_path = tmp_path
        (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
        (tmp_path / "sidecar.tokens").write_text(f"{SIDECAR_TOKEN} acme\n")
        (tmp_path / "sidecar.token").write_text(SIDECAR_TOKEN + "\n")
        self.env = child_env(tmp_path / "home", {"KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()})
        self.cp_port = free_port()
        self.target = f"127.0.0.1:{self.cp_port}"
        self.store_url = store_url or f"sqlite:///{tmp_path / 'keyplane.db'}"
        self.control_plane: Running | None = None
        self.replicas: dict[int, Running] = {}  # more control planes, by port
        self.sidecars: dict[int, Running] = {}
        self.admin_md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    async def start_control_plane(self, *flags: str) -> Running:
        self.control_plane = await self._control_plane(self.target, flags)
        return self.control_plane

    async def start_replica(self, port: int, *flags: str) -> Running:
        """Another control plane on the same store, at 127.0.0.1:``port``."""
        self.replicas[port] = await self._control_plane(f"127.0.0.1:{port}", flags)
        return self.replicas[port]

    async def stop_replica(self, port: int) -> None:
        running = self.replicas.pop(port)
        assert await running.stop() == 0, running.output

    async def _control_plane(self, target: str, flags: tuple[str, ...]) -> Running:
        return await start(
            [
                "control-plane",
                "--listen",
                target,
                "--store",
                self.store_url,
                "--admin-token-file",
                str(self.tmp_path / "admin.token"),
                "--sidecar-tokens-file",
                str(self.tmp_path / "sidecar.tokens"),
                *flags,
            ],
            self.env,
            r"control plane listening on port \d+",
        )

    async def kill_control_plane(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        assert self.control_plane is not None
        self.control_plane.process.kill()
        await self.control_plane.stop()
        self.control_plane = None

    async def stop_control_plane(self) -> None:
        assert self.control_plane is not None
        assert await self.control_plane.stop() == 0, self.control_plane.output
        self.control_plane = None

    async def start_sidecar(self, port: int, *flags: str, target: str | None = None) -> Running:
        running = await start(
            [
                "sidecar",
                "--control-plane",
                target or self.target,
                "--token-file",
                str(self.tmp_path / "sidecar.token"),
                "--tenant",
                "acme",
                "--port",
                str(port),
                "--snapshot-file",
                str(self.tmp_path / f"sidecar-{port}.snapshot"),
                *flags,
            ],
            self.env,
            r"sidecar listening on http://",
        )
        self.sidecars[port] = running
        return running

    async def stop_sidecar(self, port: int) -> None:
        running = self.sidecars.pop(port)
        assert await running.stop() == 0, running.output

    async def admin(self) -> tuple[aio.Channel, admin_service_pb2_grpc.AdminServiceAsyncStub]:
        channel = aio.insecure_channel(self.target)
        return channel, admin_service_pb2_grpc.AdminServiceStub(channel)

    async def configure(self, upstream: FakeUpstream, secrets: tuple[str, ...]) -> tuple[list[str], str]:
        """Tenant acme, one key per secret on one route, a client key: (key ids, client token)."""
        channel, admin = await self.admin()
        md = self.admin_md
        try:
            await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=md)
            ids = []
            for i, secret in enumerate(secrets):
                key = await admin.CreateProviderKey(
                    apb.CreateProviderKeyRequest(
                        tenant="acme",
                        provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
                        label=f"key{i}",
                        secret=secret,
                        base_url=upstream.base_url,
                    ),
                    metadata=md,
                )
                ids.append(key.key.id)
            await admin.CreateRoute(
                apb.CreateRouteRequest(
                    tenant="acme",
                    public_model=MODEL,
                    targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI_COMPATIBLE, upstream_model="upstream-m")],
                ),
                metadata=md,
            )
            client = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=md)
            return ids, client.token
        finally:
            await channel.close(None)

    async def stop(self) -> None:
        for port in list(self.sidecars):
            await self.sidecars.pop(port).stop()
        for port in list(self.replicas):
            await self.replicas.pop(port).stop()
        if self.control_plane is not None:
            await self.control_plane.stop()


def disable_request(key_id: str) -> apb.UpdateProviderKeyRequest:
    return apb.UpdateProviderKeyRequest(
        tenant="acme",
        id=key_id,
        key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED),
        update_mask=field_mask_pb2.FieldMask(paths=["status"]),
    )


@dataclass
class Load:
    """Steady chat requests through sidecars, one worker per URL, a fresh connection each.

    A refused connection (no process listening: a sidecar restarting) is retried
    after 50 ms, as an app's client retries connection errors, and counted apart;
    so is a connection reset before any answer byte (``ReadError``): the kernel
    resets the connections still queued in a listener's accept backlog when a
    stopping sidecar closes it, and the OpenAI SDKs retry that as a connection
    error too. A request fails if it gets any answer but 200, or no answer
    within 15 s.
    """

    urls: list[str]
    token: str
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    connect_retries: int = 0
    reset_retries: int = 0
    answered_at: list[tuple[float, str, int]] = field(default_factory=list)  # (monotonic, url, status)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(url)) for url in self.urls]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def ok_between(self, start: float, end: float, url: str | None = None) -> int:
        return sum(1 for at, u, s in self.answered_at if start <= at <= end and s == 200 and url in (None, u))

    async def _worker(self, url: str) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=15.0, limits=limits) as client:
            while not self._stop.is_set():
                await self._one(client, url)
                await asyncio.sleep(0.01)

    async def _one(self, client: httpx.AsyncClient, url: str) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + 15.0
        while True:
            try:
                resp = await client.post(f"{url}/chat/completions", json=body, headers=headers)
            except (httpx.ConnectError, httpx.ReadError) as exc:
                if time.monotonic() > deadline:
                    self.failed.append(f"{type(exc).__name__} for 15 s")
                    return
                if isinstance(exc, httpx.ConnectError):
                    self.connect_retries += 1
                else:
                    self.reset_retries += 1
                await asyncio.sleep(0.05)
                continue
            except httpx.HTTPError as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")
                return
            self.answered_at.append((time.monotonic(), url, resp.status_code))
            if resp.status_code == 200:
                self.ok += 1
            else:
                self.failed.append(f"{resp.status_code} {resp.text[:200]}")
            return
