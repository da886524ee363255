"""The sidecar's upstream client against byte-scripted servers: heads and
bodies are bounded, waiters are served in order, failures are told apart,
timeouts. (Reuse, at-most-once POSTs and framings: test_upstream_client.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.upstream import (
    UpstreamAnswerCut,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from tests.fakes.raw_http import RawServer, response
from tests.sidecar.upstream_scripts import Reader, Writer, answer_each, fetch, post, started


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = await started()
    yield c
    await c.close()


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
