"""The request-path shortcuts keep the behaviour they replace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from keyplane.domain import Provider
from keyplane.health.classify import Classification, ErrorClass, classify_exception, classify_response
from keyplane.health.machine import HealthPolicy, Outcome
from sidecar.answering import DisconnectWatch
from sidecar.asgi import Message
from sidecar.health import TenantHealth
from sidecar.proxy import classify_status
from sidecar.server import Sidecar
from sidecar.state import SidecarState

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT, auth, sidecar_config

SAME_MODEL = "same-model"
PUBLIC_MODEL = "public-model"
REWRITTEN_MODEL = "rewritten-upstream-model"


class RawUpstream:
    """A real HTTP upstream that keeps the exact bytes of every request body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.bodies.append(raw)
        model = json.loads(raw)["model"]
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        }
        return web.json_response(answer)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    await up.start()
    try:
        yield up
    finally:
        await up.close()


async def test_body_passes_through_unchanged_unless_the_model_is_rewritten(raw_upstream: RawUpstream) -> None:
    snapshot = p.snapshot(
        3,
        p.tenant_state(
            TENANT,
            keys=[p.pkey("k1", "sk-one", base_url=raw_upstream.base_url)],
            routes=[
                p.route("r1", SAME_MODEL, p.target(SAME_MODEL)),
                p.route("r2", PUBLIC_MODEL, p.target(REWRITTEN_MODEL)),
            ],
            client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
        ),
    )
    async with Sidecar(sidecar_config(), watch=False) as sidecar:
        sidecar.state.apply(snapshot)
        async with httpx.AsyncClient(base_url=sidecar.url, timeout=20.0) as client:
            # Odd spacing and key order, non-ASCII: what the app sent is what the upstream gets.
            raw = (
                b'{ "messages" : [{"role":"user","content":"h\\u00e9llo \xc3\xbc"}],\n "model": "'
                + SAME_MODEL.encode()
                + b'" }'
            )
            r = await client.post("/v1/chat/completions", content=raw, headers=auth())
            assert r.status_code == 200, r.text
            assert raw_upstream.bodies[-1] == raw

            raw = b'{ "model": "' + PUBLIC_MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}] }'
            r = await client.post("/v1/chat/completions", content=raw, headers=auth())
            assert r.status_code == 200, r.text
            sent = raw_upstream.bodies[-1]
            assert json.loads(sent) == {"model": REWRITTEN_MODEL, "messages": [{"role": "user", "content": "hi"}]}
            assert sent == json.dumps(json.loads(sent), separators=(",", ":")).encode()


def test_authenticate_memo_follows_client_key_changes() -> None:
    state = SidecarState()
    state.apply(p.snapshot(1, p.tenant_state(TENANT, client_keys=[p.client_key("ck1", CLIENT_TOKEN)])))
    assert state.authenticate(CLIENT_TOKEN) == TENANT
    assert state.authenticate(CLIENT_TOKEN) == TENANT  # from the memo
    assert state.authenticate(CLIENT_TOKEN + "x") is None
    assert state.authenticate("") is None
    state.apply(p.delta(p.client_key_deleted(2, TENANT, "ck1")))
    assert state.authenticate(CLIENT_TOKEN) is None
    state.apply(p.delta(p.client_key_put(3, TENANT, p.client_key("ck2", CLIENT_TOKEN))))
    assert state.authenticate(CLIENT_TOKEN) == TENANT
    state.apply(p.delta(p.tenant_deleted(4, TENANT)))
    assert state.authenticate(CLIENT_TOKEN) is None
    # Many distinct valid tokens: still right once the memo has been emptied for room.
    tokens = [f"kp-token-{n:04d}" for n in range(600)]
    state.apply(
        p.snapshot(5, p.tenant_state(TENANT, client_keys=[p.client_key(f"c{n}", t) for n, t in enumerate(tokens)]))
    )
    for _ in range(2):
        assert all(state.authenticate(t) == TENANT for t in tokens)


def test_record_success_is_record() -> None:
    policy = HealthPolicy(error_threshold=2)
    success = classify_response(200, {}, b"", now=0.0)
    error = classify_exception("timeout")

    def outcome(classification: Classification) -> Outcome:
        return Outcome("k1", Provider.OPENAI, "m", classification, provider_final=True)

    fast, slow = TenantHealth(TENANT, policy), TenantHealth(TENANT, policy)
    now = 1_000.0
    # Empty book: nothing to reset, nothing recorded.
    assert fast.record_success("k1", Provider.OPENAI, "m", success, provider_final=True, recovered=False, now=now) == []
    assert slow.record(outcome(success), now) == []
    assert len(fast.local) == len(slow.local) == 0
    for book in (fast, slow):
        book.record(outcome(error), now)
        book.record(outcome(error), now)
        assert not book.key_usable("k1", "m", now + 1)
    changes_fast = fast.record_success(
        "k1", Provider.OPENAI, "m", success, provider_final=True, recovered=False, now=now + 1
    )
    changes_slow = slow.record(outcome(success), now + 1)
    assert changes_fast == changes_slow and changes_fast
    assert fast.key_usable("k1", "m", now + 1) and slow.key_usable("k1", "m", now + 1)
    assert fast.local.unhealthy(now + 1) == slow.local.unhealthy(now + 1)


def test_classify_status_matches_classify_response() -> None:
    for status in (200, 201, 204, 299, 301, 400, 401, 429, 500, 503, 529):
        headers = {"retry-after": "3"}
        body = b'{"error": {"code": "invalid_api_key"}}'
        fast = classify_status(status, headers, body, lambda: 1_000.0)
        assert fast == classify_response(status, headers, body, now=1_000.0)
    assert classify_status(200, {}, b"", lambda: 0.0).error_class is ErrorClass.SUCCESS


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _hang_up() -> Message:
    return {"type": "http.disconnect"}


async def _watched(receive: Callable[[], Awaitable[Message]], after: float, work: Awaitable[int]) -> tuple[bool, int]:
    """The way ``SidecarApp._chat`` uses a ``DisconnectWatch``: (hung up, result)."""
    task = asyncio.current_task()
    assert task is not None
    watch = DisconnectWatch(receive, task, after)
    result = -1
    try:
        result = await work
    except asyncio.CancelledError:
        if not watch.gone:
            raise
    finally:
        watch.close()
    if watch.gone:
        if task.uncancel() > 0:
            raise asyncio.CancelledError
        return True, -1
    return False, result


@pytest.mark.parametrize("after", [0.0, 0.05])
async def test_disconnect_watch_finishes_and_leaves_no_task(after: float) -> None:
    async def work() -> int:
        await asyncio.sleep(0.1)  # outlives the delay: the watcher did start
        return 7

    before = len(asyncio.all_tasks())
    assert await _watched(_never, after, work()) == (False, 7)
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_disconnect_watch_starts_no_task_for_a_quick_answer() -> None:
    started: list[asyncio.Task[object]] = []
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()

    def spy(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        started.append(task)
        return task

    async def work() -> int:
        await asyncio.sleep(0)
        return 3

    loop.set_task_factory(spy)
    try:
        assert await _watched(_never, 0.05, work()) == (False, 3)
        await asyncio.sleep(0.1)  # the timer was cancelled: nothing starts later either
    finally:
        loop.set_task_factory(factory)
    assert started == []


@pytest.mark.parametrize("after", [0.0, 0.02])
async def test_disconnect_watch_cancels_the_work_on_hang_up(after: float) -> None:
    cancelled = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    assert await _watched(_hang_up, after, work()) == (True, -1)
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # this task was not left cancelled


async def test_disconnect_watch_keeps_a_cancellation_from_outside() -> None:
    async def work() -> int:
        await asyncio.sleep(30)
        return 1

    task = asyncio.create_task(_watched(_never, 0.0, work()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
