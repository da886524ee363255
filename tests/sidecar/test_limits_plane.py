"""Tokens per minute through a real control plane and sidecar (gRPC and HTTP
sockets, in one process) and the fake provider's real usage objects: a
request is admitted while the sidecar's lease has tokens left, its tokens are
charged once its answer's usage is read, and the fleet's tokens per window
pass the limit by at most what the request in flight used."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from grpc import aio

from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

ADMIN_TOKEN = "adm-limits-plane-0a1b2c3d4e"
SIDECAR_TOKEN = "sc-limits-plane-5f6a7b8c9d"
MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
WINDOW_MS = 6000


@dataclass
class Setup:
    plane: ControlPlane
    admin: admin_service_pb2_grpc.AdminServiceAsyncStub
    sidecar: Sidecar
    token: str
    client_key_id: str


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with FakeUpstream() as upstream:
        plane = ControlPlane(
            ControlPlaneConfig(
                store_url=f"sqlite:///{tmp_path / 'k.db'}",
                admin_token=ADMIN_TOKEN,
                master_key=os.urandom(32),
                sidecar_tokens={SIDECAR_TOKEN: ("acme",)},
                listen="127.0.0.1:0",
                poll_interval=None,
                shutdown_grace=0.2,
                quota_window=WINDOW_MS / 1000,
                quota_rebalance_interval=0.2,
            )
        )
        await plane.start()
        channel = aio.insecure_channel(plane.address)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=MD)
        await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme",
                provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
                label="k",
                secret="sk-limits-plane-0001",
                base_url=upstream.base_url,
            ),
            metadata=MD,
        )
        target = rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI_COMPATIBLE, upstream_model="u")
        await admin.CreateRoute(apb.CreateRouteRequest(tenant="acme", public_model="m", targets=[target]), metadata=MD)
        ck = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=MD)
        sidecar = Sidecar(
            SidecarConfig(
                control_plane_target=plane.address,
                sidecar_token=SIDECAR_TOKEN,
                tenants=("acme",),
                port=0,
                quota_report_interval=0.2,
                snapshot_file=None,
            )
        )
        await sidecar.start()
        try:
            yield Setup(plane, admin, sidecar, ck.token, ck.client_key.id)
        finally:
            await sidecar.stop()
            await channel.close(None)
            await plane.stop(grace=0.2)


async def test_tokens_per_minute_hold_within_one_request_in_flight(setup: Setup) -> None:
    limits = lpb.Limits(tenant="acme", client_key_id=setup.client_key_id, tokens_per_minute=2000)  # 200 per 6 s
    await setup.admin.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=MD)
    # A new limit holds from its first lease, about one rebalance later.
    limiter = setup.sidecar.app.limiter
    assert limiter is not None
    for _ in range(100):
        if limiter.limited:
            break
        await asyncio.sleep(0.02)
    assert limiter.limited, "no lease within 2 s"
    url = f"http://127.0.0.1:{setup.sidecar.port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {setup.token}"}
    tokens_by_window: dict[int, int] = {}
    refusals: list[httpx.Response] = []
    biggest = 0
    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.monotonic() + 2.5 * WINDOW_MS / 1000
        while time.monotonic() < deadline:
            sent_ms = time.time_ns() // 1_000_000
            resp = await client.post(
                url, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers=headers
            )
            if resp.status_code == 200:
                tokens = resp.json()["usage"]["total_tokens"]
                biggest = max(biggest, tokens)
                w = sent_ms - sent_ms % WINDOW_MS
                tokens_by_window[w] = tokens_by_window.get(w, 0) + tokens
            else:
                assert resp.status_code == 429, resp.text
                refusals.append(resp)
            await asyncio.sleep(0.01)
    print(f"\ntokens admitted per {WINDOW_MS // 1000} s window (limit 200): {list(tokens_by_window.values())}")
    assert refusals
    error = json.loads(refusals[0].content)["error"]
    assert (error["code"], error["type"]) == ("client_rate_limit_exceeded", "tokens")
    assert "tokens per" in error["message"]
    assert int(refusals[0].headers["retry-after-ms"]) > 0
    # The sidecar charges a request when its answer is read, this test counts it
    # when sent: one request at a window's end may count on either side.
    for tokens in tokens_by_window.values():
        assert tokens <= 200 + 2 * biggest


async def test_a_daily_budget_is_never_overspent_by_more_than_a_lease(setup: Setup) -> None:
    # $1 per million input tokens, $2 per million output: 1 and 2 micro-dollars a token.
    price = upb.Price(
        tenant="acme",
        provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
        model="u",
        input_micros_per_million=1_000_000,
        cached_input_micros_per_million=1_000_000,
        output_micros_per_million=2_000_000,
    )
    await setup.admin.SetPrice(apb.SetPriceRequest(price=price), metadata=MD)
    budget = 1500  # micro-dollars per UTC day
    limits = lpb.Limits(tenant="acme", client_key_id=setup.client_key_id, daily_budget_micros=budget)
    await setup.admin.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=MD)
    limiter = setup.sidecar.app.limiter
    assert limiter is not None
    for _ in range(100):
        if limiter.limited:
            break
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{setup.sidecar.port}/v1/chat/completions"
    headers = {"authorization": f"Bearer {setup.token}"}
    spent = 0
    biggest_cost = 0
    biggest_lease = 0
    refusal: httpx.Response | None = None
    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            resp = await client.post(url, json=body, headers=headers)
            quota = next(iter(limiter._quotas.values()))
            biggest_lease = max(biggest_lease, quota.granted)
            if resp.status_code == 200:
                usage = resp.json()["usage"]
                cost = usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2
                spent += cost
                biggest_cost = max(biggest_cost, cost)
            else:
                assert resp.status_code == 429, resp.text
                refusal = resp
                if spent >= budget:
                    break
    print(
        f"\ndaily budget {budget} micro-USD: spent {spent} ({spent - budget:+d}); "
        f"largest request {biggest_cost}, largest lease held {biggest_lease}"
    )
    assert refusal is not None and spent >= budget
    assert spent - budget <= biggest_cost <= biggest_lease
    error = json.loads(refusal.content)["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "budget_exceeded")
    assert "spend budget of this client key for this day" in error["message"]
    assert refusal.headers["x-should-retry"] == "false"
    assert 0 < int(refusal.headers["retry-after"]) <= 86_400
    got = await setup.admin.GetLimits(
        lpb.GetLimitsRequest(tenant="acme", client_key_id=setup.client_key_id), metadata=MD
    )
    [usage_row] = got.status.usage
    assert (usage_row.kind, usage_row.limit, usage_row.window_seconds) == (lpb.QUOTA_KIND_SPEND_DAY, budget, 86_400)


async def test_anthropic_messages_get_the_refusal_in_anthropic_shape(setup: Setup) -> None:
    limits = lpb.Limits(tenant="acme", client_key_id=setup.client_key_id, requests_per_minute=10)  # 1 per 6 s
    await setup.admin.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=MD)
    limiter = setup.sidecar.app.limiter
    assert limiter is not None
    for _ in range(100):
        if limiter.limited:
            break
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{setup.sidecar.port}/v1/messages"
    headers = {"x-api-key": setup.token, "anthropic-version": "2023-06-01"}
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await client.post(url, json=body, headers=headers) for _ in range(3)]
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 2, [(a.status_code, a.text[:100]) for a in answers]
    payload = refused[0].json()
    assert payload["type"] == "error" and payload["error"]["type"] == "rate_limit_error"
    assert "keyplane limit" in payload["error"]["message"]
    assert int(refused[0].headers["retry-after"]) >= 1 and "retry-after-ms" in refused[0].headers
