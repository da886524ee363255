"""Node affinity's test fleet: real control planes (SQLite, or replicas on one Postgres),
real sidecars attached to them over gRPC, and fake vLLM nodes (real local HTTP servers)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from sidecar.nodes import node_id_for
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from .conftest import sidecar_config

ADMIN_TOKEN = "adm-affinity-7c6b5a4f3e2d"
SIDECAR_TOKEN = "sc-affinity-1f2e3d4c5b6a"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
TENANT = "acme"
MODEL = "llama"
UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PG_DSN = os.environ.get("KEYPLANE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]


@contextlib.asynccontextmanager
async def postgres_url() -> AsyncIterator[str]:
    """A fresh schema on the test Postgres (fails under CI=true when unreachable, else skips)."""
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"Postgres at {PG_DSN} is unreachable: {type(exc).__name__}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"kp_aff_{uuid.uuid4().hex[:16]}"
    try:
        yield f"{PG_DSN}?schema={schema}"
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@dataclass
class Fleet:
    planes: list[ControlPlane]
    sidecars: list[Sidecar]
    nodes: list[FakeUpstream]
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    route_id: str
    store_url: str
    tokens: dict[str, str] = field(default_factory=dict)  # client key id -> token
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def node_id(self, index: int) -> str:
        return node_id_for(self.route_id, self.nodes[index].base_url)

    def node_index(self, node_id: str) -> int:
        return [self.node_id(i) for i in range(len(self.nodes))].index(node_id)

    def served(self) -> list[int]:
        """How many chat requests each node answered so far."""
        return [len(n.chat_requests()) for n in self.nodes]

    async def client_key(self, label: str) -> tuple[str, str]:
        made = await self.admin.CreateClientKey(
            apb.CreateClientKeyRequest(tenant=TENANT, label=label), metadata=ADMIN_MD
        )
        self.tokens[made.client_key.id] = made.token
        return made.client_key.id, made.token

    async def ask(self, sidecar: int, token: str, messages: Sequence[dict[str, str]] = MESSAGES) -> httpx.Response:
        return await self.clients[sidecar].post(
            CHAT, json={"model": MODEL, "messages": list(messages)}, headers={"authorization": f"Bearer {token}"}
        )

    async def binding_rows(self, client_key_id: str) -> int:
        """Rows of the store's bindings table for the client key, read with the store's own driver."""
        if self.store_url.startswith("sqlite:///"):
            with contextlib.closing(sqlite3.connect(self.store_url.removeprefix("sqlite:///"))) as db:
                (count,) = db.execute(
                    "SELECT count(*) FROM bindings WHERE client_key_id = ?", (client_key_id,)
                ).fetchone()
                return int(count)
        dsn, _, schema = self.store_url.partition("?schema=")
        conn = await asyncpg.connect(dsn)
        try:
            found = await conn.fetchval(
                f'SELECT count(*) FROM "{schema}".bindings WHERE client_key_id = $1', client_key_id
            )
            return int(found)
        finally:
            await conn.close()

    async def bindings(self, client_key_id: str = "") -> list[rpb.Binding]:
        listed = await self.admin.ListBindings(
            apb.ListBindingsRequest(tenant=TENANT, client_key_id=client_key_id, page_size=1000), metadata=ADMIN_MD
        )
        return list(listed.bindings)


@contextlib.asynccontextmanager
async def open_fleet(
    tmp_path: Path,
    *,
    store_url: str | None = None,
    replicas: int = 1,
    sidecars: int = 2,
    nodes: int = 3,
    binding_ttl: float | None = None,
    **sidecar_overrides: object,
) -> AsyncIterator[Fleet]:
    """``replicas`` control planes on one store, ``sidecars`` sidecars spread over them, a
    route ``llama`` whose vllm target has ``nodes`` fake nodes."""
    master_key = os.urandom(32)
    url = store_url or f"sqlite:///{tmp_path / 'keyplane.db'}"
    planes: list[ControlPlane] = []
    started: list[Sidecar] = []
    upstreams: list[FakeUpstream] = []
    channel: aio.Channel | None = None
    fleet: Fleet | None = None
    async with contextlib.AsyncExitStack() as stack:
        try:
            for _ in range(replicas):
                extra: dict[str, object] = {} if binding_ttl is None else {"binding_ttl": binding_ttl}
                plane = ControlPlane(
                    ControlPlaneConfig(
                        store_url=url,
                        admin_token=ADMIN_TOKEN,
                        sidecar_tokens={SIDECAR_TOKEN: (TENANT,)},
                        master_key=master_key,
                        listen="127.0.0.1:0",
                        poll_interval=None,
                        shutdown_grace=0.2,
                        **extra,  # type: ignore[arg-type]
                    )
                )
                await plane.start()
                planes.append(plane)
            for _ in range(nodes):
                upstreams.append(await stack.enter_async_context(FakeUpstream()))
            channel = aio.insecure_channel(planes[0].address)
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            await admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
            target = rpb.RouteTarget(
                provider=rpb.PROVIDER_VLLM, upstream_model=UPSTREAM_MODEL, node_urls=[n.base_url for n in upstreams]
            )
            route = await admin.CreateRoute(
                apb.CreateRouteRequest(tenant=TENANT, public_model=MODEL, targets=[target]), metadata=ADMIN_MD
            )
            fleet = Fleet(planes, started, upstreams, admin, route.route.id, url)
            for i in range(sidecars):
                plane = planes[i % len(planes)]
                config = sidecar_config(
                    control_plane_target=plane.address,
                    sidecar_token=SIDECAR_TOKEN,
                    sidecar_id=f"affinity-sc-{i}",
                    snapshot_file=None,
                    **sidecar_overrides,
                )
                sc = Sidecar(config)
                await sc.start()
                started.append(sc)
                assert await sc.wait_ready(10.0)
                fleet.clients.append(await stack.enter_async_context(httpx.AsyncClient(base_url=sc.url, timeout=20)))
            yield fleet
        finally:
            for sc in started:
                await sc.stop()
            if channel is not None:
                await channel.close(None)
            for plane in planes:
                await plane.stop(grace=0.2)
