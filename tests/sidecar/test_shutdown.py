"""The sidecar's shutdown phases in process, through real sockets (the whole
sequence on a real ``keyplane sidecar`` process is tests/e2e/test_sidecar_shutdown.py).

- ``shutdown(delay)``: /healthz answers 503 draining while chat requests are still served;
- a non-streamed request still waiting for its upstream at the end of the grace gets an
  OpenAI-shaped 503 ``shutting_down`` (not a dropped connection);
- a second signal (``hurry``) ends the delay and the grace at once.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream, Reply

from .conftest import PUBLIC_MODEL, auth, sidecar_config, standard_snapshot

CHAT = {"model": PUBLIC_MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def _reached(upstream: FakeUpstream) -> None:
    for _ in range(500):
        if upstream.chat_requests():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the request never reached the upstream")


async def test_draining_answers_healthz_503_and_still_serves(upstream: FakeUpstream) -> None:
    sc = Sidecar(sidecar_config(shutdown_grace=1.0), watch=False)
    await sc.start()
    sc.state.apply(standard_snapshot(upstream))
    async with httpx.AsyncClient(base_url=sc.url, timeout=10.0) as client:
        before = await client.get("/healthz")
        assert before.status_code == 200 and before.headers.get("connection") != "close"
        shutdown = asyncio.create_task(sc.shutdown(1.0))
        await asyncio.sleep(0.2)
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "draining"
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert answer.status_code == 200, answer.text
        # Clients are told to leave their keep-alive connections while the sidecar drains,
        # so none reuses one as the listener closes.
        assert health.headers["connection"] == "close" and answer.headers["connection"] == "close"
        await shutdown


async def test_a_request_unanswered_at_the_end_of_the_grace_gets_503_shutting_down(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", Reply(200, None, delay=20.0))
    sc = Sidecar(sidecar_config(shutdown_grace=0.5), watch=False)
    await sc.start()
    sc.state.apply(standard_snapshot(upstream))
    async with httpx.AsyncClient(base_url=sc.url, timeout=10.0) as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=auth()))
        await _reached(upstream)
        started = time.monotonic()
        await sc.stop()
        took = time.monotonic() - started
        answer = await pending
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert 0.4 <= took < 2.5, took


async def test_hurry_skips_the_delay_and_the_grace(upstream: FakeUpstream) -> None:
    upstream.program("sk-one", Reply(200, None, delay=20.0))
    sc = Sidecar(sidecar_config(shutdown_grace=30.0), watch=False)
    await sc.start()
    sc.state.apply(standard_snapshot(upstream))
    hurry = asyncio.Event()
    async with httpx.AsyncClient(base_url=sc.url, timeout=10.0) as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=auth()))
        await _reached(upstream)
        started = time.monotonic()
        shutdown = asyncio.create_task(sc.shutdown(30.0, hurry=hurry))
        await asyncio.sleep(0.2)
        hurry.set()
        await shutdown
        took = time.monotonic() - started
        answer = await pending
    assert answer.status_code == 503
    assert took < 2.5, took
