"""The app-facing HTTP edge over raw sockets: head size and count limits (431), head and
body timeouts (408), body limits (413) and bad framing (400), all OpenAI-shaped, and
pathological JSON bodies (400) that never reach the upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from sidecar.edge_protocol import EdgeLimits, edge_protocol
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from .conftest import CLIENT_TOKEN, PUBLIC_MODEL, sidecar_config, standard_snapshot
from .rawhttp import exchange

CHAT = "/v1/chat/completions"
HEAD_TIMEOUT = 0.6
BODY_TIMEOUT = 0.6
MAX_BODY = 32 * 1024


@pytest.fixture
async def edge(upstream: FakeUpstream) -> AsyncIterator[Sidecar]:
    config = sidecar_config(
        request_head_timeout=HEAD_TIMEOUT,
        request_body_timeout=BODY_TIMEOUT,
        max_body_bytes=MAX_BODY,
        max_request_head_bytes=8 * 1024,
        max_request_headers=30,
    )
    async with Sidecar(config, watch=False) as sc:
        sc.state.apply(standard_snapshot(upstream))
        yield sc


def chat_head(length: int | None = None, *, extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return (
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: sidecar\r\n"
        b"Authorization: Bearer " + CLIENT_TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + framing + extra + b"\r\n"
    )


async def test_a_head_larger_than_the_limit_gets_431(edge: Sidecar, upstream: FakeUpstream) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    got = await exchange(edge.port, big)
    assert got.status == 431
    assert got.openai_error()["code"] == "request_head_too_large"
    assert got.headers["connection"] == "close"
    # Many small fields adding up count as well, and so does the request line.
    spread = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-F%d: %s\r\n" % (i, b"b" * 400) for i in range(25)) + b"\r\n"
    assert (await exchange(edge.port, spread)).status == 431
    long_url = b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n\r\n"
    assert (await exchange(edge.port, long_url)).status == 431
    assert upstream.requests == []


async def test_more_header_fields_than_the_limit_get_431(edge: Sidecar) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(31))
    got = await exchange(edge.port, b"GET /healthz HTTP/1.1\r\n" + fields + b"\r\n")
    assert got.status == 431
    assert got.openai_error()["code"] == "too_many_headers"
    at_limit = b"".join(b"X-F%d: v\r\n" % i for i in range(30))
    assert (await exchange(edge.port, b"GET /healthz HTTP/1.1\r\n" + at_limit + b"\r\n")).status == 200


async def test_a_huge_header_is_cut_after_the_limit_and_healthz_keeps_answering(edge: Sidecar) -> None:
    async def flood() -> tuple[int, float]:
        # 200 MB announced; the sidecar must cut the connection long before.
        _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        sent = 0
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Huge: ")
        chunk = b"h" * (256 * 1024)
        try:
            while sent < 200 * 1024 * 1024:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5.0)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            writer.close()
        return sent, time.monotonic() - started

    flooding = asyncio.create_task(flood())
    async with httpx.AsyncClient(base_url=edge.url, timeout=5.0) as client:
        worst = 0.0
        while not flooding.done():
            started = time.monotonic()
            assert (await client.get("/healthz")).status_code == 200
            worst = max(worst, time.monotonic() - started)
            await asyncio.sleep(0.01)
    sent, took = await flooding
    # Cut within the limit plus a read or two, and socket buffers (kernel side, both ends).
    assert sent < 32 * 1024 * 1024, sent
    assert took < 5.0
    assert worst < 1.0, worst  # (the flood runs in the same event loop as the sidecar)


async def test_a_head_that_stops_half_way_gets_408(edge: Sidecar) -> None:
    got = await exchange(edge.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", bound=5.0)
    assert got.status == 408
    assert got.openai_error()["code"] == "request_timeout"
    assert HEAD_TIMEOUT - 0.05 <= got.elapsed < HEAD_TIMEOUT + 1.0
    assert got.closed or got.headers["connection"] == "close"


async def test_a_slowloris_head_is_not_saved_by_dripping_bytes(edge: Sidecar) -> None:
    drip = [(b"GET /healthz HTTP/1.1\r\n", 0.0)] + [(b"X-D%d: v\r\n" % i, 0.1) for i in range(30)]
    got = await exchange(edge.port, drip, bound=5.0)
    assert got.status == 408
    assert got.elapsed < HEAD_TIMEOUT + 1.0


async def test_an_idle_connection_is_closed_without_an_answer(edge: Sidecar) -> None:
    got = await exchange(edge.port, b"", bound=5.0)
    assert got.closed and got.status is None and got.raw == b""
    assert got.elapsed < HEAD_TIMEOUT + 1.0


async def test_a_body_that_stops_half_way_gets_408(edge: Sidecar, upstream: FakeUpstream) -> None:
    body = json.dumps({"model": PUBLIC_MODEL, "messages": []}).encode()
    got = await exchange(edge.port, chat_head(len(body) + 100) + body, bound=5.0)
    assert got.status == 408
    assert "body" in str(got.openai_error()["message"])
    assert BODY_TIMEOUT - 0.05 <= got.elapsed < BODY_TIMEOUT + 1.0
    chunked = await exchange(edge.port, chat_head() + b'5\r\n{"mod\r\n', bound=5.0)
    assert chunked.status == 408
    assert upstream.requests == []
    # A keep-alive connection that finished its request is not hurried by either timer.
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"}")
            await asyncio.sleep(HEAD_TIMEOUT + BODY_TIMEOUT)
    finally:
        writer.close()


async def test_a_body_larger_than_the_limit_gets_413_before_it_is_all_sent(
    edge: Sidecar, upstream: FakeUpstream
) -> None:
    declared = await exchange(edge.port, chat_head(MAX_BODY + 1))
    assert declared.status == 413
    assert declared.openai_error()["code"] == "request_too_large"
    # Chunked, fed slowly: refused once the limit is passed, not after the (endless) rest.
    chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    pieces = [(chat_head(), 0.0)] + [(chunk, 0.01) for _ in range(200)]
    streamed = await exchange(edge.port, pieces, bound=5.0)
    assert streamed.status == 413
    assert streamed.openai_error()["code"] == "request_too_large"
    assert streamed.sent < 200 * len(chunk)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: v\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_bad_framing_gets_an_openai_shaped_400(edge: Sidecar, request_bytes: bytes) -> None:
    got = await exchange(edge.port, request_bytes)
    assert got.status == 400
    assert got.openai_error()["type"] == "invalid_request_error"
    assert got.closed or got.headers["connection"] == "close"


async def test_connect_and_upgrades(edge: Sidecar) -> None:
    connect = await exchange(edge.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert connect.status == 405
    assert connect.openai_error()["code"] == "method_not_allowed"
    with_body = await exchange(edge.port, chat_head(2, extra=b"Connection: upgrade\r\nUpgrade: h2c\r\n") + b"{}")
    assert with_body.status == 400
    with_body.openai_error()
    # Without a body an Upgrade is ignored: answered as a plain request, then closed.
    plain = await exchange(edge.port, b"GET /healthz HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert plain.status == 200
    assert plain.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"model":"gpt-4o-mini","messages":' + b"[" * 1000 + b"]" * 1000 + b"}", "nests deeper"),
        (b'{"model":"gpt-4o-mini","max_tokens":' + b"9" * 20_000 + b"}", "longer than"),
        (b'{"model":"gpt-4o-mini","messages":[],"x":"\xff\xfe"}', "UTF-8"),
        (b'{"model":"gpt-4o-mini","model":"gpt-4o-mini","messages":[]}', "duplicate key"),
        (b'[{"model":"gpt-4o-mini"}]', "JSON object"),
    ],
)
async def test_pathological_json_gets_400_and_never_reaches_the_upstream(
    edge: Sidecar, upstream: FakeUpstream, body: bytes, fragment: str
) -> None:
    got = await exchange(edge.port, chat_head(len(body)) + body)
    assert got.status == 400
    error = got.openai_error()
    assert error["type"] == "invalid_request_error"
    assert fragment in str(error["message"])
    assert upstream.requests == []


async def test_an_exception_in_the_app_is_an_openai_shaped_500() -> None:
    # The edge protocol alone, serving an ASGI app that fails before answering.
    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(
        boom, http=edge_protocol(EdgeLimits()), ws="none", lifespan="off", log_config=None, log_level="critical"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
            await asyncio.sleep(0.01)
        got = await exchange(sock.getsockname()[1], b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.status == 500
        assert got.openai_error()["type"] == "server_error"
        assert b"boom" not in got.raw
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def test_garbage_after_pipelined_requests_is_answered_after_their_answers(edge: Sidecar) -> None:
    valid = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(valid + valid + b"GARBAGE\r\n\r\n")
        async with asyncio.timeout(5.0):
            raw = await reader.read(-1)  # to the close
    finally:
        writer.close()
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"400"], raw
    head, _, body = answers[2].partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head
    assert json.loads(body)["error"]["code"] == "bad_request"
    for answer in answers[:2]:
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == "ok"


async def test_the_uvicorn_internals_the_edge_relies_on() -> None:
    # The edge subclasses uvicorn's httptools protocol (pinned in pyproject.toml):
    # an upgrade that moves these fails here first.
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    assert uvicorn.__version__.startswith("0.54."), uvicorn.__version__
    for name in (
        "data_received",
        "send_400_response",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "shutdown",
        "_unset_keepalive_if_required",
    ):
        assert callable(getattr(HttpToolsProtocol, name)), name
    assert callable(RequestResponseCycle.send_500_response)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = uvicorn.Config(app, log_config=None)
    protocol = edge_protocol(EdgeLimits())(config=config, server_state=uvicorn.server.ServerState(), app_state={})
    for attribute in ("parser", "pipeline", "cycle", "flow", "loop", "logger"):
        assert hasattr(protocol, attribute), attribute
