"""No client can crash the control plane: a storm of cancelled calls.

The real ``keyplane control-plane`` runs in its own process (a crash inside
grpcio is a segfault, which would take an in-process server down with the
test). 1,000 Watch calls are cancelled at random points in their first 50 ms
and 200 ReportOutcomes calls are cancelled in the middle of a batch, over a
real socket; afterwards the process must still be running and serving: a new
Watch gets its snapshot and an admin write reaches a watcher.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, sidecar_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.e2e import processes

ADMIN_TOKEN = "kpa-storm-admin-0123456789abcdef"
SIDECAR_TOKEN = "kps-storm-sidecar-0123456789abcdef"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SIDECAR_MD = (("authorization", f"Bearer {SIDECAR_TOKEN}"),)
WATCHES = 1000
REPORTS = 200
CONCURRENCY = 50


Metadata = tuple[tuple[str, str], ...]


async def _cancelled_watch(
    stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub, rng: random.Random, metadata: Metadata
) -> None:
    call = stub.Watch(spb.WatchRequest(sidecar_id=f"storm-{rng.random()}"), metadata=metadata)
    await asyncio.sleep(rng.uniform(0.0, 0.05))
    call.cancel()
    try:
        await call.read()
    except asyncio.CancelledError:
        pass
    except aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.CANCELLED, exc


def _outcome(tenant: str, index: int) -> spb.Outcome:
    return spb.Outcome(
        tenant=tenant,
        key_id=f"pk_storm{index % 7}",
        provider=rpb.PROVIDER_OPENAI,
        model="gpt-4o-mini",
        outcome_class=spb.OUTCOME_CLASS_SUCCESS,
        status_code=200,
        latency_ms=12,
    )


async def _cancelled_report(
    stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub, rng: random.Random, metadata: Metadata
) -> None:
    sent_one = asyncio.Event()

    async def batches() -> AsyncIterator[spb.ReportOutcomesRequest]:
        for batch in range(1000):
            yield spb.ReportOutcomesRequest(
                sidecar_id="storm", outcomes=[_outcome("acme", batch * 50 + i) for i in range(50)]
            )
            sent_one.set()
            await asyncio.sleep(rng.uniform(0.0, 0.005))

    call = stub.ReportOutcomes(batches(), metadata=metadata)
    await asyncio.wait_for(sent_one.wait(), 10)
    await asyncio.sleep(rng.uniform(0.0, 0.02))
    call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        pass
    except aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.CANCELLED, exc


async def _bounded(jobs: list[asyncio.Future[None] | asyncio.Task[None]]) -> None:
    for outcome in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome


async def test_cancel_storm_leaves_the_control_plane_serving(tmp_path: Path) -> None:
    env = processes.child_env(
        tmp_path / "home",
        {
            "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "KEYPLANE_SIDECAR_TOKEN": SIDECAR_TOKEN,
            "KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        },
    )
    plane = await processes.start(
        [
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path / 'kp.db'}",
            "--log-level",
            "warning",
        ],
        env,
        ready=r"listening on port \d+",
    )
    try:
        port = int(plane.find(r"listening on port (\d+)").group(1))
        target = f"127.0.0.1:{port}"
        async with aio.insecure_channel(target) as channel:
            admin: admin_service_pb2_grpc.AdminServiceAsyncStub = admin_service_pb2_grpc.AdminServiceStub(channel)
            await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
            # Half the calls use a token managed through the API (their streams
            # are wrapped to end on revocation), half the bootstrap token.
            managed = await admin.CreateSidecarToken(
                apb.CreateSidecarTokenRequest(label="storm", all_tenants=True), metadata=ADMIN_MD
            )
        tokens: list[Metadata] = [SIDECAR_MD, (("authorization", f"Bearer {managed.token}"),)]
        rng = random.Random(1234)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def limited(job: Awaitable[None]) -> None:
            async with limit:
                await job

        # Several channels, so cancellations also race connection setup.
        channels = [aio.insecure_channel(target) for _ in range(4)]
        try:
            stubs: list[sidecar_service_pb2_grpc.SidecarServiceAsyncStub] = [
                sidecar_service_pb2_grpc.SidecarServiceStub(c) for c in channels
            ]
            await _bounded(
                [
                    asyncio.ensure_future(limited(_cancelled_watch(stubs[i % len(stubs)], rng, tokens[i % 2])))
                    for i in range(WATCHES)
                ]
            )
            await _bounded(
                [
                    asyncio.ensure_future(limited(_cancelled_report(stubs[i % len(stubs)], rng, tokens[i % 2])))
                    for i in range(REPORTS)
                ]
            )
        finally:
            for channel in channels:
                await channel.close(grace=None)

        assert plane.process.returncode is None, plane.output
        # Still serving: a new watcher gets its snapshot, and a write reaches it.
        async with aio.insecure_channel(target) as channel:
            sidecar: sidecar_service_pb2_grpc.SidecarServiceAsyncStub = sidecar_service_pb2_grpc.SidecarServiceStub(
                channel
            )
            admin = admin_service_pb2_grpc.AdminServiceStub(channel)
            call = sidecar.Watch(spb.WatchRequest(sidecar_id="after-storm"), metadata=SIDECAR_MD)
            first = await asyncio.wait_for(call.read(), 10)
            assert isinstance(first, spb.WatchResponse)
            assert first.WhichOneof("payload") == "snapshot"
            assert [t.tenant for t in first.snapshot.tenants] == ["acme"]
            created = await admin.CreateClientKey(
                apb.CreateClientKeyRequest(tenant="acme", label="after-storm"), metadata=ADMIN_MD
            )
            delta = await asyncio.wait_for(call.read(), 10)
            assert isinstance(delta, spb.WatchResponse)
            assert delta.WhichOneof("payload") == "delta"
            assert delta.version > first.version
            assert [c.client_key_put.id for c in delta.delta.changes] == [created.client_key.id]
            call.cancel()
            # The sidecar list no longer holds the cancelled streams.
            listed = await admin.ListSidecars(apb.ListSidecarsRequest(), metadata=ADMIN_MD)
            assert [s.sidecar_id for s in listed.sidecars if s.sidecar_id != "after-storm"] == []
        assert plane.process.returncode is None, plane.output
    finally:
        code = await plane.stop()
    assert code == 0, plane.output
