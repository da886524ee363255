"""Rollups are right after 10,000 requests over two sidecars, on SQLite and on Postgres.

Two real sidecars report to one real control plane; an HTTP client drives 10,000
chat requests (plain and streamed, two client keys, two public models) through
them against a fake OpenAI upstream that reports 9 prompt tokens and one
completion token a chunk. GetUsage must then count every request and token
exactly, and cost them to the micro-dollar; the number of store writes shows the
batching (one upsert per rollup row per flush, not per request).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream
from tests.pg import fresh_schema, schema_url

from .plane import ADMIN_MD, ADMIN_TOKEN, SIDECAR_TOKEN, eventually
from .test_reporter import reporter_config

REQUESTS = 10_000
CONCURRENCY = 48
CHUNKS = ("a", "b", "c")  # 3 completion tokens a request


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keyplane.db'}"
        return
    async with fresh_schema("kp_usage") as schema:
        yield schema_url(schema)


async def test_rollups_are_exact_after_10000_requests_over_two_sidecars(store_url: str, unused_tcp_port: int) -> None:
    config = ControlPlaneConfig(
        store_url=store_url,
        admin_token=ADMIN_TOKEN,
        master_key=os.urandom(32),
        sidecar_tokens={SIDECAR_TOKEN: ("acme",)},
        listen=f"127.0.0.1:{unused_tcp_port}",
        poll_interval=None,
        shutdown_grace=0.2,
        usage_flush_interval=0.5,
    )
    plane = ControlPlane(config)
    await plane.start()
    try:
        async with FakeUpstream(chunks=CHUNKS) as up:
            channel_target = f"127.0.0.1:{unused_tcp_port}"
            async with aio.insecure_channel(channel_target) as channel:
                admin = admin_service_pb2_grpc.AdminServiceStub(channel)
                tokens = await _configure(admin, up)
                async with (
                    Sidecar(reporter_config(channel_target, sidecar_id="sc-a", report_interval=0.05)) as a,
                    Sidecar(reporter_config(channel_target, sidecar_id="sc-b", report_interval=0.05)) as b,
                ):
                    assert await a.wait_ready(10) and await b.wait_ready(10)
                    started = time.monotonic()
                    statuses = await _drive([a.url, b.url], tokens)
                    elapsed = time.monotonic() - started
                    assert statuses == {200: REQUESTS}
                    await _check(admin, tokens, plane)
                    print(f"\n{REQUESTS} requests over two sidecars in {elapsed:.1f} s ({store_url.split(':')[0]})")
    finally:
        await plane.stop(grace=0.2)


async def _configure(admin: admin_service_pb2_grpc.AdminServiceAsyncStub, up: FakeUpstream) -> dict[str, str]:
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    await admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme", provider=rpb.PROVIDER_OPENAI, label="main", secret="sk-main-0001", base_url=up.base_url
        ),
        metadata=ADMIN_MD,
    )
    for public in ("gpt", "mini"):
        target = rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=f"{public}-upstream")
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model=public, targets=[target]), metadata=ADMIN_MD
        )
    price = upb.Price(
        tenant="acme",
        provider=rpb.PROVIDER_OPENAI,
        model="gpt-upstream",
        input_micros_per_million=2_500_000,  # $2.50 / M
        cached_input_micros_per_million=1_250_000,
        output_micros_per_million=10_000_000,  # $10 / M
    )
    await admin.SetPrice(apb.SetPriceRequest(price=price), metadata=ADMIN_MD)
    tokens: dict[str, str] = {}
    for label in ("app1", "app2"):
        created = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label=label), metadata=ADMIN_MD)
        tokens[created.client_key.id] = created.token
    return tokens


def _request(n: int, tokens: dict[str, str]) -> tuple[str, dict[str, object]]:
    """Request n: its client key (alternating), model (every third is "mini"), streamed (every other)."""
    token = list(tokens.values())[n % 2]
    model = "mini" if n % 3 == 0 else "gpt"
    return token, {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": n % 4 < 2}


async def _drive(urls: list[str], tokens: dict[str, str]) -> dict[int, int]:
    statuses: dict[int, int] = {}
    queue = iter(range(REQUESTS))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(w: int) -> None:
            url = urls[w % 2]
            for n in queue:
                token, body = _request(n, tokens)
                async with session.post(
                    f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
                ) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return statuses


async def _check(
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub, tokens: dict[str, str], plane: ControlPlane
) -> None:
    expected: dict[tuple[str, str], int] = {}
    ids = list(tokens)
    for n in range(REQUESTS):
        key = (ids[n % 2], "mini" if n % 3 == 0 else "gpt")
        expected[key] = expected.get(key, 0) + 1
    request = apb.GetUsageRequest(
        tenant="acme", group_by=[upb.USAGE_DIMENSION_CLIENT_KEY, upb.USAGE_DIMENSION_PUBLIC_MODEL]
    )
    rows: dict[tuple[str, str], upb.UsageRow] = {}

    async def complete() -> bool:
        answer = await admin.GetUsage(request, metadata=ADMIN_MD)
        rows.clear()
        rows.update({(r.client_key_id, r.public_model): r for r in answer.rows})
        return sum(r.requests for r in answer.rows) >= REQUESTS

    await eventually(complete, within=30)
    assert {k: r.requests for k, r in rows.items()} == expected
    for key, row in rows.items():
        count = expected[key]
        assert (row.input_tokens, row.output_tokens, row.failed_requests, row.estimated_requests) == (
            9 * count,
            len(CHUNKS) * count,
            0,
            0,
        ), key
        if key[1] == "gpt":
            # 9 x $2.50/M + 3 x $10/M = 52.5 micro-dollars a request; remainders carried per row.
            assert count * 105 // 2 - 2 <= row.cost_micros <= count * 105 // 2, (key, row.cost_micros)
        else:
            assert (row.cost_micros, row.unpriced_requests) == (0, count)
    recorder = plane._usage
    assert recorder is not None
    # Batched: one upsert per rollup row per flush, never one per request.
    assert recorder.rows_written < REQUESTS / 10, recorder.rows_written
    print(f"\nrollup rows written: {recorder.rows_written} in {recorder.flushes} flushes for {REQUESTS} requests")
