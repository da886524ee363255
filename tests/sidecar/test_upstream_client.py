"""The sidecar's upstream client (``sidecar.upstream``, aiohttp underneath) against
real local servers that script the wire byte by byte: a POST is written once,
connections with stray bytes are never reused, heads and bodies are bounded,
waiters are served in order, failures are told apart, keep-alive, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.upstream import (
    UpstreamAnswerCut,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamMalformed,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from tests.fakes.raw_http import RawServer, response

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


async def answer_each(server: RawServer, reader: Reader, writer: Writer) -> None:
    """Keep-alive: answer every request with its own body echoed back."""
    while (request := await server.request(reader)) is not None:
        writer.write(response(200, b"echo:" + request.body, "content-type: application/json"))
        await writer.drain()


async def started(**kw: object) -> UpstreamClient:
    values: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0}
    values.update(kw)
    client = UpstreamClient(**values)  # type: ignore[arg-type]
    await client.start()
    return client


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = await started()
    yield c
    await c.close()


def request(url: str, **headers: str) -> UpstreamRequest:
    return UpstreamRequest(url + "/v1/chat/completions", {"content-type": "application/json", **headers})


async def post(c: UpstreamClient, url: str, body: bytes = b"{}", time_left: float | None = None) -> UpstreamResponse:
    return await c.send(request(url), body, time_left=time_left)


async def fetch(c: UpstreamClient, url: str, body: bytes = b"{}", limit: int = 1 << 20) -> bytes:
    """The whole answer's body; the connection goes back to the pool if it is clean."""
    reply = await post(c, url, body)
    try:
        return await reply.read(limit)
    finally:
        reply.release()


async def test_keep_alive_reuses_one_connection_and_sends_only_what_it_is_given(client: UpstreamClient) -> None:
    async with RawServer(answer_each) as server:
        for i in range(3):
            reply = await client.send(request(server.url, authorization="Bearer sk-1"), b'{"n":%d}' % i)
            assert reply.status == 200
            assert await reply.read(100) == b'echo:{"n":%d}' % i
            assert reply.at_eof()
            reply.release()
        assert server.accepted == 1
        first = server.requests[0]
        assert first.request_line == "POST /v1/chat/completions HTTP/1.1"
        # No cookies, no Accept-Encoding (bodies are passed through undecoded), no
        # default User-Agent or Accept: only what the request carries, and the framing.
        assert sorted(first.headers) == [
            ("authorization", "Bearer sk-1"),
            ("content-length", "7"),
            ("content-type", "application/json"),
            ("host", f"127.0.0.1:{server.port}"),
        ]


async def test_headers_as_received_and_as_a_lower_case_mapping(client: UpstreamClient) -> None:
    async def repeated(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(
            response(429, b"{}", "Retry-After: 7", "X-Thing: a", "x-thing: b", "Content-Type: Text/Event-Stream; x=1")
        )
        await writer.drain()
        await reader.read()

    async with RawServer(repeated) as server:
        reply = await post(client, server.url)
        assert reply.status == 429
        assert (b"X-Thing", b"a") in reply.raw_headers and (b"x-thing", b"b") in reply.raw_headers
        assert reply.headers["retry-after"] == "7"
        assert reply.headers["x-thing"] == "a, b"
        assert reply.content_type == "text/event-stream"
        reply.close()


# --- a POST is written at most once -------------------------------------------------------


async def test_a_keep_alive_connection_closed_under_a_post_fails_it_and_it_is_not_sent_again(
    client: UpstreamClient,
) -> None:
    async def close_on_second(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(response(200, b"first"))
        await writer.drain()
        await server.request(reader)  # read, then the connection is closed without an answer

    async with RawServer(close_on_second) as server:
        assert await fetch(client, server.url) == b"first"
        with pytest.raises(UpstreamAnswerCut, match="closed before the answer"):
            await post(client, server.url, b'{"again":1}')
        await asyncio.sleep(0.1)  # a resend, if any, would have arrived by now
        assert server.accepted == 1
        assert [r.body for r in server.requests] == [b"{}", b'{"again":1}']
        # The next call gets a new connection.
        assert await fetch(client, server.url, b"third") == b"first"
        assert server.accepted == 2


# --- no stray bytes: never reused, never mixed into another answer -------------------------


async def test_bytes_after_a_complete_answer_are_never_read_as_another_answer(client: UpstreamClient) -> None:
    stray = b"HTTP/1.1 200 X\r\nx-stray: 1\r\ncontent-length: 5\r\n\r\nEVIL!"

    async def extra_bytes(server: RawServer, reader: Reader, writer: Writer) -> None:
        """Each connection's first answer comes with stray bytes: in the same write
        (1), after a pause (2, 3: when the connection is idle in the pool), as junk
        in the same write (4); then clean answers."""
        first = True
        while await server.request(reader) is not None:
            if not first:
                writer.write(response(200, b"clean"))
            elif server.accepted == 1:
                writer.write(response(200, b"first") + stray)
            elif server.accepted in (2, 3):
                writer.write(response(200, b"late %d" % server.accepted))
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(stray if server.accepted == 2 else b"junk that is no HTTP\r\n\r\n")
            elif server.accepted == 4:
                writer.write(response(200, b"fourth") + b"junk that is no HTTP")
            else:
                writer.write(response(200, b"clean"))
            first = False
            await writer.drain()

    async with RawServer(extra_bytes) as server:
        assert await fetch(client, server.url) == b"first"
        # Never the stray answer: a fresh connection and a clean answer, every time.
        assert await fetch(client, server.url) == b"late 2"
        assert server.accepted == 2
        await asyncio.sleep(0.15)
        assert await fetch(client, server.url) == b"late 3"
        assert server.accepted == 3
        await asyncio.sleep(0.15)
        # Junk in the same read as the answer: the answer is refused, never delivered with it.
        with pytest.raises(UpstreamMalformed):
            await post(client, server.url)
        assert server.accepted == 4
        reply = await post(client, server.url)
        assert (reply.status, await reply.read(100)) == (200, b"clean")
        assert "x-stray" not in reply.headers
        reply.release()
        assert server.accepted == 5  # nothing was ever reused after stray bytes
        assert len(server.requests) == 5


async def test_an_answer_released_before_its_end_drops_the_connection(client: UpstreamClient) -> None:
    async def two_parts(server: RawServer, reader: Reader, writer: Writer) -> None:
        while await server.request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"67890")
            await writer.drain()

    async with RawServer(two_parts) as server:
        reply = await post(client, server.url)
        assert await reply.readany() == b"12345"
        reply.release()
        assert await fetch(client, server.url) == b"1234567890"
        assert server.accepted == 2
        await asyncio.sleep(0.05)
        assert server.open == 1  # the unfinished one was closed, the finished one is idle


async def test_a_large_unread_stream_released_early_is_not_reused(client: UpstreamClient) -> None:
    async def big(server: RawServer, reader: Reader, writer: Writer) -> None:
        while await server.request(reader) is not None:
            if server.accepted == 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (4 << 20))
                writer.write(b"x" * (4 << 20))
            else:
                writer.write(response(200, b"small"))
            await writer.drain()

    async with RawServer(big) as server:
        reply = await post(client, server.url)
        assert await reply.readany()
        reply.release()  # megabytes still unread: this connection is done
        reply = await post(client, server.url, time_left=2.0)
        assert await reply.read(100) == b"small"
        reply.release()
        assert server.accepted == 2


# --- bounded heads and bodies ---------------------------------------------------------------


async def test_response_heads_are_bounded_in_count_and_size() -> None:
    async def answer_with(head_lines: list[str]) -> RawServer:
        async def handler(server: RawServer, reader: Reader, writer: Writer) -> None:
            await server.request(reader)
            writer.write(response(200, b"ok", *head_lines))
            await writer.drain()
            await reader.read()

        return RawServer(handler)

    client = await started(max_headers=20, max_header_size=1024)
    try:
        for lines, fine in (
            ([f"x-h{i}: v" for i in range(15)], True),
            ([f"x-h{i}: v" for i in range(40)], False),
            (["x-big: " + "v" * 1000], True),
            (["x-big: " + "v" * 2000], False),
        ):
            async with await answer_with(lines) as server:
                if fine:
                    assert await fetch(client, server.url) == b"ok"
                else:
                    with pytest.raises(UpstreamMalformed, match="malformed answer"):
                        await post(client, server.url)
    finally:
        await client.close()


async def test_the_default_head_limits_refuse_thousands_of_headers(client: UpstreamClient) -> None:
    async def flood(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(response(200, b"ok", *(f"x-h{i}: v" for i in range(2001))))
        await writer.drain()
        await reader.read()

    async with RawServer(flood) as server:
        with pytest.raises(UpstreamMalformed):
            await post(client, server.url)


async def test_a_body_over_the_limit_is_refused_not_buffered(client: UpstreamClient) -> None:
    async def declared(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def chunked(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(b"400\r\n" + b"z" * 1024 + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(declared) as server:
        reply = await post(client, server.url)
        with pytest.raises(UpstreamTooLarge, match="1000000 bytes are over the 65536"):
            await reply.read(65536)
        reply.close()
    async with RawServer(chunked) as server:
        reply = await post(client, server.url)
        with pytest.raises(UpstreamTooLarge, match="over the 10000 bytes"):
            await reply.read(10000)
        reply.close()
        assert await fetch(client, server.url, limit=200_000) == b"z" * 102400


# --- waiters for a connection ---------------------------------------------------------------


async def test_waiters_are_served_in_order_and_a_cancelled_one_strands_nothing() -> None:
    async def first_unfinished(server: RawServer, reader: Reader, writer: Writer) -> None:
        while (r := await server.request(reader)) is not None:
            if r.body == b"0":  # an answer that is not over: the connection stays taken
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nnot over")
            else:
                writer.write(response(200, b"echo:" + r.body))
            await writer.drain()

    client = await started(limit_per_host=1)
    try:
        async with RawServer(first_unfinished) as server:
            held = await post(client, server.url, b"0")  # the one connection, held until released
            waiters = []
            for i in range(1, 6):
                waiters.append(asyncio.create_task(fetch(client, server.url, b"%d" % i)))
                await asyncio.sleep(0.01)  # queued in this order
            waiters[1].cancel()  # cancelled while it waits
            await asyncio.sleep(0.01)
            held.close()  # frees the slot and wakes the first waiter ...
            waiters[0].cancel()  # ... cancelled in the same loop turn: the wake-up must pass on
            done = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 3.0)
            assert [type(d).__name__ if isinstance(d, BaseException) else d for d in done] == [
                "CancelledError",
                "CancelledError",
                b"echo:3",
                b"echo:4",
                b"echo:5",
            ]
            assert [r.body for r in server.requests] == [b"0", b"3", b"4", b"5"]
            assert server.accepted == 2  # the closed connection, then one for every waiter in turn
    finally:
        await client.close()


async def test_a_waiter_that_gets_no_connection_before_its_deadline_times_out() -> None:
    async def slow(server: RawServer, reader: Reader, writer: Writer) -> None:
        while await server.request(reader) is not None:
            await asyncio.sleep(0.3)
            writer.write(response(200, b"ok"))
            await writer.drain()

    client = await started(limit_per_host=1)
    try:
        async with RawServer(slow) as server:
            holding = asyncio.create_task(fetch(client, server.url))
            await asyncio.sleep(0.05)
            with pytest.raises(UpstreamTimeout):
                await post(client, server.url, time_left=0.1)
            assert await holding == b"ok"
            assert len(server.requests) == 1
    finally:
        await client.close()


# --- what went wrong, told apart ------------------------------------------------------------


async def test_refused_and_unresolvable_are_connect_errors(client: UpstreamClient) -> None:
    async with RawServer(answer_each) as server:
        port = server.port
    with pytest.raises(UpstreamConnectError, match=rf"cannot connect to 127\.0\.0\.1:{port}"):
        await post(client, f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError, match="cannot connect"):
        await post(client, "http://no-such-host.invalid")


async def test_closed_before_or_during_the_answer_and_malformed(client: UpstreamClient) -> None:
    async def hang_up(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)

    async def cut(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async def cut_chunked(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async def garbage(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def switching(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxx")
        await writer.drain()
        await reader.read()

    async with RawServer(hang_up) as server:
        with pytest.raises(UpstreamAnswerCut, match="closed before the answer"):
            await post(client, server.url)
        assert len(server.requests) == 1
    async with RawServer(cut) as server:
        reply = await post(client, server.url)
        assert await reply.readany() == b"only this"
        with pytest.raises(UpstreamAnswerCut, match="middle of the answer"):
            await reply.readany()
        reply.close()
        reply = await post(client, server.url)
        with pytest.raises(UpstreamAnswerCut):
            await reply.read(1000)
        reply.close()
    async with RawServer(cut_chunked) as server:
        reply = await post(client, server.url)
        with pytest.raises(UpstreamAnswerCut):
            async for _ in reply.iter_chunks():
                pass
        reply.close()
    async with RawServer(garbage) as server:
        with pytest.raises(UpstreamMalformed, match="malformed"):
            await post(client, server.url)
    async with RawServer(switching) as server:
        with pytest.raises(UpstreamMalformed, match="answered 101"):
            await post(client, server.url)


async def test_read_timeout_is_the_longest_silence_and_the_deadline_bounds_everything() -> None:
    async def stall_after_first_chunk(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await reader.read()

    async def trickle(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\n.\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def never(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        await reader.read()

    client = await started(read_timeout=0.2)
    loop = asyncio.get_running_loop()
    try:
        async with RawServer(stall_after_first_chunk) as server:
            reply = await post(client, server.url)
            assert await reply.readany() == b"hi"
            with pytest.raises(UpstreamTimeout):
                await reply.readany()
            reply.close()
        async with RawServer(never) as server:
            with pytest.raises(UpstreamTimeout):  # no first byte
                await post(client, server.url)
        async with RawServer(trickle) as server:
            start = loop.time()
            reply = await post(client, server.url, time_left=0.5)
            with pytest.raises(UpstreamTimeout):
                await reply.read(1 << 20)  # never silent for 0.2 s, but over the 0.5 s deadline
            assert 0.45 < loop.time() - start < 2.0
            reply.close()
    finally:
        await client.close()


async def test_a_slow_reader_is_not_a_silent_upstream() -> None:
    async def big(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (4 << 20))
        writer.write(b"y" * (4 << 20))
        await writer.drain()
        await reader.read()

    client = await started(read_timeout=0.15)
    try:
        async with RawServer(big) as server:
            reply = await post(client, server.url)
            await asyncio.sleep(0.5)  # reading paused all along: no read timeout
            assert len(await reply.read(8 << 20)) == 4 << 20
            reply.release()
    finally:
        await client.close()


# --- framings, streaming, keep-alive --------------------------------------------------------


async def test_chunked_and_until_close_bodies_and_early_hints(client: UpstreamClient) -> None:
    async def chunked(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await server.request(reader)  # kept alive: a second request on the same connection
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + response(201, b"made", "x-final: 1"))
        await writer.drain()
        await reader.read()

    async def until_close(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")
        await writer.drain()

    async with RawServer(chunked) as server:
        assert await fetch(client, server.url) == b"hello world"
        reply = await post(client, server.url)
        assert reply.status == 201
        assert reply.headers == {"content-length": "4", "x-final": "1"}
        assert await reply.read(10) == b"made"
        reply.release()
        assert server.accepted == 1
    async with RawServer(until_close) as server:
        assert await fetch(client, server.url) == b"part one, part two"


async def test_a_stream_is_handed_over_chunk_by_chunk_as_it_arrives(client: UpstreamClient) -> None:
    go_on = asyncio.Event()

    async def sse(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b'data: {"i": %d}\n\n' % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await go_on.wait()  # the next one only once the client has had this one
            go_on.clear()
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        await writer.drain()
        await server.request(reader)
        writer.write(response(200, b"next"))
        await writer.drain()
        await reader.read()

    async with RawServer(sse) as server:
        reply = await post(client, server.url)
        got = []
        async for chunk in reply.iter_chunks():
            got.append(chunk)
            go_on.set()
        assert got[:3] == [b'data: {"i": %d}\n\n' % i for i in range(3)]
        assert b"".join(got[3:]) == b"data: [DONE]\n\n"
        assert reply.at_eof()
        reply.release()
        assert await fetch(client, server.url) == b"next"
        assert server.accepted == 1  # read to its end: the connection was reused


async def test_a_cancelled_call_drops_its_connection(client: UpstreamClient) -> None:
    async def silent(server: RawServer, reader: Reader, writer: Writer) -> None:
        await server.request(reader)
        await reader.read()

    async with RawServer(silent) as server:
        task = asyncio.create_task(post(client, server.url))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert server.open == 0


async def test_idle_connections_close_after_the_keepalive_timeout() -> None:
    client = await started(keepalive_timeout=0.1)
    try:
        async with RawServer(answer_each) as server:
            assert await fetch(client, server.url) == b"echo:{}"
            assert server.open == 1
            for _ in range(40):
                await asyncio.sleep(0.05)
                if server.open == 0:
                    break
            assert server.open == 0
    finally:
        await client.close()
