"""The sidecar's upstream client (``sidecar.upstream``, aiohttp underneath) against
real local servers that script the wire byte by byte: a POST is written once,
connections with stray bytes are never reused, keep-alive, framings and
streaming. Bounds, waiters, timeouts and failure kinds: test_upstream_limits.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.upstream import (
    UpstreamAnswerCut,
    UpstreamClient,
    UpstreamMalformed,
)
from tests.fakes.raw_http import RawServer, response
from tests.sidecar.upstream_scripts import Reader, Writer, answer_each, fetch, post, request, started


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = await started()
    yield c
    await c.close()


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
