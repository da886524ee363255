"""Graceful shutdown of a real ``keyplane sidecar`` process (issue 11).

A real control plane (in this process, SQLite, real gRPC socket), the real
``keyplane sidecar`` command in a subprocess, and two fake providers on real
sockets: one that answers after a while and streams slowly, one whose stream
never ends. The test sends SIGTERM while requests and streams are in flight
and checks each phase through real sockets:

- during ``--shutdown-delay`` new connections are accepted and served, and
  /healthz answers 503 ``draining``;
- after it, new connections are refused, and requests in flight at SIGTERM
  (a non-streamed one, a slow stream) complete;
- a stream still running at the end of ``--shutdown-grace`` ends with an
  OpenAI-shaped SSE error event and a clean end of body;
- the process exits within delay + grace (plus teardown), and the outcome of
  every request reached the control plane.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
from keyplane.v1 import resources_pb2 as rpb
from tests.e2e import processes
from tests.fakes.upstream import FakeUpstream, Reply

ADMIN_TOKEN = "adm-shutdown-e2e-3c2b1a0f9e8d"
SIDECAR_TOKEN = "sc-shutdown-e2e-acme-9e8d7c6b5a4f"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
TENANT = "acme"
SLOW_SECRET = "sk-slow-upstream-key-0001"
ENDLESS_SECRET = "sk-endless-upstream-key-0002"
DELAY = 1.5
GRACE = 3.5
# Seconds of teardown allowed after delay + grace (watch end, report flush, interpreter exit).
TEARDOWN = 2.5


@dataclass
class Setup:
    plane: ControlPlane
    client_token: str
    slow: FakeUpstream
    endless: FakeUpstream


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    plane = ControlPlane(
        ControlPlaneConfig(
            store_url=f"sqlite:///{tmp_path / 'kp.db'}",
            admin_token=ADMIN_TOKEN,
            master_key=os.urandom(32),
            sidecar_tokens={SIDECAR_TOKEN: (TENANT,)},
            listen="127.0.0.1:0",
            shutdown_grace=0.2,
        )
    )
    await plane.start()
    # Answers after 1 s, then streams 6 chunks 0.4 s apart.
    slow = FakeUpstream(chunk_delay=0.4)
    endless = FakeUpstream()
    endless.stream_gate = asyncio.Event()  # never set: the stream stops after its first chunk, open
    async with slow, endless, aio.insecure_channel(plane.address) as channel:
        slow.program(SLOW_SECRET, Reply(200, None, delay=1.0))
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        await admin.CreateTenant(apb.CreateTenantRequest(name=TENANT), metadata=ADMIN_MD)
        # One provider each, so that each route reaches only its own key.
        for label, secret, upstream, model, provider in (
            ("slow", SLOW_SECRET, slow, "slow-model", rpb.PROVIDER_OPENAI),
            ("endless", ENDLESS_SECRET, endless, "endless-model", rpb.PROVIDER_OPENAI_COMPATIBLE),
        ):
            await admin.CreateProviderKey(
                apb.CreateProviderKeyRequest(
                    tenant=TENANT,
                    provider=provider,
                    label=label,
                    secret=secret,
                    base_url=upstream.base_url,
                ),
                metadata=ADMIN_MD,
            )
            await admin.CreateRoute(
                apb.CreateRouteRequest(
                    tenant=TENANT,
                    public_model=model,
                    targets=[rpb.RouteTarget(provider=provider, upstream_model=model)],
                ),
                metadata=ADMIN_MD,
            )
        created = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant=TENANT, label="app"), metadata=ADMIN_MD)
        try:
            yield Setup(plane, created.token, slow, endless)
        finally:
            await plane.stop(grace=0.2)


async def _start_sidecar(plane: ControlPlane, tmp_path: Path, *extra: str) -> tuple[processes.Running, str]:
    env = processes.child_env(tmp_path / "home", {"KEYPLANE_SIDECAR_TOKEN": SIDECAR_TOKEN})
    running = await processes.start(
        ["sidecar", "--control-plane", plane.address, "--port", "0", "--tenant", TENANT, *extra],
        env,
        ready=r"sidecar listening on http://",
    )
    url = running.find(r"(http://\S+)/v1").group(1)
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        for _ in range(200):
            if (await client.get("/healthz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the sidecar never became ready:\n" + running.output)
    return running, url


def _chat(model: str, *, stream: bool) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def _stream(url: str, token: str, model: str) -> tuple[int, list[str], float]:
    """Read a whole stream on its own connection: status, its ``data:`` payloads, when it ended."""
    payloads: list[str] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=30.0) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=_chat(model, stream=True), headers={"authorization": f"Bearer {token}"}
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
        return response.status_code, payloads, time.monotonic()


async def _complete(url: str, token: str, model: str) -> tuple[int, dict[str, object]]:
    """One non-streamed request on a new connection."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        response = await client.post(
            "/v1/chat/completions", json=_chat(model, stream=False), headers={"authorization": f"Bearer {token}"}
        )
        return response.status_code, response.json()


async def _connect(url: str) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.close()
    await writer.wait_closed()


async def test_sigterm_drains_then_finishes_in_flight_requests_and_cuts_what_outlives_the_grace(
    setup: Setup, tmp_path: Path
) -> None:
    sidecar, url = await _start_sidecar(
        setup.plane, tmp_path, "--shutdown-delay", str(DELAY), "--shutdown-grace", str(GRACE)
    )
    token = setup.client_token
    accepted_before = setup.plane.aggregator.stats.accepted
    try:
        slow_stream = asyncio.create_task(_stream(url, token, "slow-model"))
        slow_request = asyncio.create_task(_complete(url, token, "slow-model"))
        endless_stream = asyncio.create_task(_stream(url, token, "endless-model"))
        async with asyncio.timeout(10):
            await setup.endless.first_chunk_sent.wait()
        for _ in range(500):
            if len(setup.slow.chat_requests()) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(setup.slow.chat_requests()) == 2
        sigterm = time.monotonic()
        sidecar.process.send_signal(signal.SIGTERM)

        # (b) During the delay: a new connection is accepted and served; /healthz says draining.
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            health = await client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        during_delay = asyncio.create_task(_complete(url, token, "slow-model"))
        await asyncio.sleep(0.1)
        assert len(setup.slow.chat_requests()) == 3  # it reached the provider

        # After the delay: new connections are refused.
        await asyncio.sleep(max(0.0, sigterm + DELAY + 0.4 - time.monotonic()))
        with pytest.raises(ConnectionRefusedError):
            await _connect(url)
        refused_at = time.monotonic() - sigterm

        # (a) Requests in flight at SIGTERM, and the one accepted during the delay, complete.
        status, body = await slow_request
        assert status == 200 and body["object"] == "chat.completion", body
        status, body = await during_delay
        assert status == 200 and body["object"] == "chat.completion", body
        status, payloads, slow_ended = await slow_stream
        assert status == 200
        assert payloads[-1] == "[DONE]", sidecar.output
        text = "".join(
            json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1] if "choices" in p
        )
        assert text == "".join(setup.slow.chunks)
        assert slow_ended - sigterm > DELAY  # it finished after the listener had closed

        # (c) The stream that outlives the grace ends with an SSE error event, then a clean end.
        status, payloads, cut_at = await endless_stream
        assert status == 200
        last = json.loads(payloads[-1])
        assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "service_unavailable", last
        assert "[DONE]" not in payloads
        cut_after = cut_at - sigterm
        assert DELAY + GRACE - 0.2 <= cut_after <= DELAY + GRACE + 1.5, cut_after

        # (d) The process exits within delay + grace (plus teardown), cleanly.
        code = await asyncio.wait_for(sidecar.process.wait(), DELAY + GRACE + TEARDOWN + 5)
        exited_after = time.monotonic() - sigterm
        assert code == 0, sidecar.output
        assert exited_after <= DELAY + GRACE + TEARDOWN, exited_after

        # Every request's outcome (the cut stream's too) was reported before the exit.
        reported = setup.plane.aggregator.stats.accepted - accepted_before
        assert reported == 4, (reported, sidecar.output)
        print(
            f"\nsidecar shutdown: delay {DELAY}s grace {GRACE}s; refused new connections {refused_at:.2f}s after "
            f"SIGTERM, slow stream done at {slow_ended - sigterm:.2f}s, endless stream cut at {cut_after:.2f}s, "
            f"exit at {exited_after:.2f}s; {reported} outcomes reported"
        )
    finally:
        await sidecar.stop()
