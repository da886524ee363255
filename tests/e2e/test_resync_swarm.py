"""1,000 watch streams dropped at once resync within 2 s, and the store is not queried per stream.

A real control plane (gRPC on a socket) on a real Postgres store whose every
SQL statement is counted (asyncpg's query logger on each pooled connection),
and 1,000 of the sidecar's own ``WatchClient``s in another process
(``tests/e2e/watch_swarm.py``) over 10 connections through a TCP proxy that
cuts all of them in one instant. The control plane stays up: the reconnects
are served from its snapshot cache, so the statements counted while the fleet
resyncs are the background poller's and the fleet record's batched writes
(a few per flush interval), however many streams come back.
The store has a database of its own (NOTIFY is per database).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from control_plane.store import PostgresStore
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from tests.pg import PG_DSN
from tests.pg import admin_connection as _admin_connection

ADMIN_TOKEN = "adm-swarm-0a1b2c3d4e5f"
SIDECAR_TOKEN = "kps-swarm-6a7b8c9d0e1f"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
STREAMS = 1000
FLEET_FLUSH_INTERVAL = 0.05  # control_plane.fleet.FleetTracker's default
ROOT = Path(__file__).resolve().parents[2]


class CountingPostgresStore(PostgresStore):
    """The real Postgres store; counts every SQL statement its pooled connections run."""

    statements = 0
    recent: list[str] = []

    def _count(self, record: Any) -> None:
        self.statements += 1
        self.recent = [*self.recent[-19:], str(record.query)[:80]]

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[asyncpg.Connection]:
        async with super()._session() as conn:
            conn.add_query_logger(self._count)
            try:
                yield conn
            finally:
                conn.remove_query_logger(self._count)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with super()._transaction() as conn:
            conn.add_query_logger(self._count)
            try:
                yield conn
            finally:
                conn.remove_query_logger(self._count)


async def _configure(target: str) -> None:
    async with _admin(target) as admin:
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
        for i in range(3):
            await admin.CreateProviderKey(
                apb.CreateProviderKeyRequest(
                    tenant="acme", provider=rpb.PROVIDER_OPENAI, label=f"k{i}", secret=f"sk-swarm-secret-{i:04d}"
                ),
                metadata=ADMIN_MD,
            )
        await admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant="acme",
                public_model="gpt-4o-mini",
                targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o-mini")],
            ),
            metadata=ADMIN_MD,
        )
        for i in range(5):
            await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label=f"app{i}"), metadata=ADMIN_MD)


@asynccontextmanager
async def _admin(target: str) -> AsyncIterator[admin_service_pb2_grpc.AdminServiceAsyncStub]:
    channel = aio.insecure_channel(target)
    try:
        yield admin_service_pb2_grpc.AdminServiceStub(channel)
    finally:
        await channel.close(None)


async def _read_event(process: asyncio.subprocess.Process, within: float) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), within)
    assert line, "the swarm exited early"
    event: dict[str, Any] = json.loads(line)
    return event


async def test_1000_watch_streams_dropped_at_once_resync_within_2s_without_a_query_per_stream(
    tmp_path: Path,
) -> None:
    # A database of its own: NOTIFY is per database, so writes of other tests
    # (other schemas of the shared one) cannot wake this control plane up.
    admin_conn = await _admin_connection()
    database = f"kp_swarm_{uuid.uuid4().hex[:16]}"
    await admin_conn.execute(f'CREATE DATABASE "{database}"')
    dsn = urlunsplit(urlsplit(PG_DSN)._replace(path=f"/{database}"))
    store = CountingPostgresStore(dsn, schema="keyplane", max_size=4)
    plane = ControlPlane(
        ControlPlaneConfig(
            store_url=dsn,
            admin_token=ADMIN_TOKEN,
            master_key=os.urandom(32),
            sidecar_tokens={SIDECAR_TOKEN: ("acme",)},
            listen="127.0.0.1:0",
        ),
        store=store,
    )
    swarm: asyncio.subprocess.Process | None = None
    log = (tmp_path / "swarm.log").open("wb")  # the clients' log lines, for a failure's post-mortem
    try:
        await plane.start()
        await _configure(plane.address)
        writes = store.statements
        assert writes > 10  # the counter sees the store's statements

        swarm = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.e2e.watch_swarm",
            "--control-plane",
            plane.address,
            "--streams",
            str(STREAMS),
            "--channels",
            "10",
            cwd=ROOT,
            env={**os.environ, "KEYPLANE_SIDECAR_TOKEN": SIDECAR_TOKEN, "PYTHONPATH": str(ROOT)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        ready = await _read_event(swarm, 90)
        assert ready["streams"] == STREAMS, ready
        assert ready["versions"] == [plane.hub.version]
        connected = len(plane.hub.cache.connected())
        assert connected == STREAMS

        before = store.statements
        started = asyncio.get_running_loop().time()
        assert swarm.stdin is not None
        swarm.stdin.write(b"drop\n")
        await swarm.stdin.drain()
        result = await _read_event(swarm, 60)
        during = store.statements - before
        seconds = asyncio.get_running_loop().time() - started
        print(
            f"\n{STREAMS} watch streams over {result['connections_cut']} connections cut at once: "
            f"{result['resynced']} resynced, slowest {result['max']:.3f}s (p50 {result['p50']:.3f}s, "
            f"p99 {result['p99']:.3f}s), {result['pushbacks']} told to wait by the control plane; "
            f"store SQL statements while they resynced: {during} (setup wrote with {writes}; "
            f"ready after {ready['seconds']:.2f}s)"
        )
        assert result["resynced"] == STREAMS
        assert result["max"] <= 2.0
        # Bounded, not per stream: the poller's few reads of the change log, and
        # the fleet record's batched writes (one transaction of at most 3 batched
        # statements + BEGIN/COMMIT per flush interval, however many streams came back).
        flushes = seconds / FLEET_FLUSH_INTERVAL + 2
        assert during <= 10 + 5 * flushes, store.recent[-during:]
        assert during < STREAMS / 4, store.recent[-during:]
        assert len(plane.hub.cache.connected()) == STREAMS
    finally:
        if swarm is not None:
            if swarm.returncode is None and swarm.stdin is not None:
                swarm.stdin.write(b"stop\n")
                swarm.stdin.close()
                try:
                    await asyncio.wait_for(swarm.wait(), 30)
                except TimeoutError:
                    swarm.kill()
                    await swarm.wait()
        log.close()
        await plane.stop(grace=0)
        try:
            await admin_conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin_conn.close()
