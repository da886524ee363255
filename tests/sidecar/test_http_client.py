"""The sidecar's upstream HTTP client against real local servers that script the wire:
keep-alive and its limits, body framings, streaming with backpressure, the
per-host cap, every timeout, closed and malformed connections, TLS, proxies."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.http_client import HttpClient, HttpResponse, UpstreamError
from tests.fakes.raw_http import RawServer, read_request, response
from tests.fakes.tls import self_signed_certificate

JSON = {"content-type": "application/json"}


async def answer_each(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer every request with its own body echoed back."""
    while (request := await server.request(reader)) is not None:
        writer.write(response(200, b"echo:" + request.body, "content-type: application/json"))
        await writer.drain()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(connect_timeout=2.0, read_timeout=5.0)
    yield http
    await http.close()


async def post(http: HttpClient, url: str, body: bytes = b"{}", **kw: float) -> HttpResponse:
    return await http.post(url + "/v1/chat/completions", JSON, body, **kw)


async def fetch(http: HttpClient, url: str, body: bytes = b"{}", **kw: float) -> bytes:
    """The whole answer's body; the connection goes back to the pool."""
    reply = await post(http, url, body, **kw)
    try:
        return await reply.read()
    finally:
        reply.release()


async def test_keep_alive_reuses_one_connection_and_sends_the_request_as_given(client: HttpClient) -> None:
    async with RawServer(answer_each) as server:
        for i in range(3):
            reply = await client.post(
                server.url + "/v1/chat/completions?x=1",
                {"content-type": "application/json", "authorization": "Bearer sk-1"},
                b'{"n":%d}' % i,
            )
            assert reply.status == 200
            assert await reply.read() == b'echo:{"n":%d}' % i
            assert reply.at_eof()
            reply.release()
        assert server.accepted == 1
        assert client.stats() == {f"http://127.0.0.1:{server.port}": {"open": 1, "idle": 1}}
        first = server.requests[0]
        assert first.request_line == "POST /v1/chat/completions?x=1 HTTP/1.1"
        assert first.headers == [
            ("host", f"127.0.0.1:{server.port}"),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-1"),
            ("content-length", "7"),
        ]


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(client: HttpClient) -> None:
    async with RawServer(answer_each) as server:
        for bad in ({"authorization": "Bearer sk\r\nx-injected: 1"}, {"x-a": "b\nc"}, {"x\r\ny": "1"}):
            with pytest.raises(ValueError, match="line break"):
                client.post(server.url + "/v1", bad, b"{}")
        with pytest.raises(ValueError):
            client.post("ftp://127.0.0.1/x", JSON, b"")
        with pytest.raises(ValueError, match="whitespace"):
            client.post(server.url + "/a b", JSON, b"")
        assert server.accepted == 0


async def test_connection_close_is_not_reused(client: HttpClient) -> None:
    async def close_each(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(response(200, b"bye", "connection: close"))
        await writer.drain()

    async with RawServer(close_each) as server:
        for _ in range(2):
            assert await fetch(client, server.url) == b"bye"
        assert server.accepted == 2


async def test_headers_as_received_and_as_a_lower_case_mapping(client: HttpClient) -> None:
    async def two_cookies(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(
            response(429, b"{}", "Retry-After: 7", "X-Thing: a", "x-thing: b", "Content-Type: Text/Event-Stream; x=1")
        )
        await writer.drain()
        await reader.read()

    async with RawServer(two_cookies) as server:
        reply = await post(client, server.url)
        assert reply.status == 429
        assert (b"X-Thing", b"a") in reply.raw_headers and (b"x-thing", b"b") in reply.raw_headers
        assert reply.headers["retry-after"] == "7"
        assert reply.headers["x-thing"] == "a, b"
        assert reply.content_type == "text/event-stream"
        reply.close()


async def test_chunked_and_until_close_bodies(client: HttpClient) -> None:
    async def chunked(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        await server.request(reader)  # kept alive: a second request on the same connection
        writer.write(response(200, b"again"))
        await writer.drain()
        await reader.read()

    async def until_close(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part two")
        await writer.drain()

    async with RawServer(chunked) as server:
        assert await fetch(client, server.url) == b"hello world"
        assert await fetch(client, server.url) == b"again"
        assert server.accepted == 1
    async with RawServer(until_close) as server:
        assert await fetch(client, server.url) == b"part one, part two"
        assert client.stats()[f"http://127.0.0.1:{server.port}"] == {"open": 0, "idle": 0}


async def test_a_stream_is_handed_over_chunk_by_chunk_as_it_arrives(client: HttpClient) -> None:
    go_on = asyncio.Event()

    async def sse(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        await reader.read()

    async with RawServer(sse) as server:
        reply = await post(client, server.url)
        got = []
        async for chunk in reply.iter_any():
            got.append(chunk)
            go_on.set()
        assert got[:3] == [b'data: {"i": %d}\n\n' % i for i in range(3)]
        assert b"".join(got[3:]) == b"data: [DONE]\n\n"
        assert reply.at_eof()
        reply.release()
        assert client.stats()[f"http://127.0.0.1:{server.port}"]["idle"] == 1


async def test_reading_pauses_while_the_caller_does_not_read(client: HttpClient) -> None:
    size = 8 * 1024 * 1024
    sent_all = asyncio.Event()

    async def big(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        sent_all.set()
        await reader.read()

    async with RawServer(big) as server:
        reply = await post(client, server.url)
        # The client holds at most ~256 KiB unread; the rest stays in the sockets, so the server blocks.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sent_all.wait(), 0.5)
        first = await reply.readany()
        assert 0 < len(first) < 1024 * 1024
        rest = await reply.read()
        assert len(first) + len(rest) == size
        assert sent_all.is_set()
        reply.release()


async def test_release_of_an_unfinished_body_drops_the_connection(client: HttpClient) -> None:
    async def two_parts(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        assert client.stats()[f"http://127.0.0.1:{server.port}"] == {"open": 1, "idle": 1}


async def test_early_hints_before_the_answer(client: HttpClient) -> None:
    async def hints(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n" + response(201, b"made", "x-final: 1"))
        await writer.drain()
        await reader.read()

    async with RawServer(hints) as server:
        reply = await post(client, server.url)
        assert reply.status == 201
        assert reply.headers == {"content-length": "4", "x-final": "1"}
        assert await reply.read() == b"made"
        reply.release()


async def test_the_per_host_cap_queues_requests() -> None:
    async def slow(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(response(200, b"ok"))
            await writer.drain()

    http = HttpClient(limit_per_host=2)
    try:
        async with RawServer(slow) as server:

            async def one() -> bytes:
                reply = await post(http, server.url)
                try:
                    return await reply.read()
                finally:
                    reply.release()

            assert await asyncio.gather(*(one() for _ in range(7))) == [b"ok"] * 7
            assert server.most_open == 2
            assert server.accepted == 2
            # A request that cannot get a connection before its deadline times out.
            holding = asyncio.gather(one(), one())
            await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError):
                await post(http, server.url, timeout=0.02)
            assert list(await holding) == [b"ok", b"ok"]
    finally:
        await http.close()


async def test_refused_and_unresolvable_are_upstream_errors(client: HttpClient) -> None:
    async with RawServer(answer_each) as server:
        port = server.port
    with pytest.raises(UpstreamError, match=f"cannot connect to http://127.0.0.1:{port}"):
        await post(client, f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamError, match="cannot connect"):
        await post(client, "http://no-such-host.invalid")
    assert client.stats()[f"http://127.0.0.1:{port}"] == {"open": 0, "idle": 0}


async def test_connect_timeout_covers_the_tls_handshake() -> None:
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    http = HttpClient(connect_timeout=0.2)
    try:
        async with RawServer(silent) as server:
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await post(http, f"https://127.0.0.1:{server.port}")
            assert 0.15 < asyncio.get_running_loop().time() - started < 1.5
    finally:
        await http.close()


async def test_read_timeout_is_the_longest_silence_and_the_deadline_bounds_everything() -> None:
    async def stall_after_first_chunk(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await reader.read()

    async def trickle(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"1\r\n.\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def never(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        await reader.read()

    http = HttpClient(read_timeout=0.2)
    loop = asyncio.get_running_loop()
    try:
        async with RawServer(stall_after_first_chunk) as server:
            reply = await post(http, server.url)
            assert await reply.readany() == b"hi"
            with pytest.raises(TimeoutError):
                await reply.readany()
            reply.close()
        async with RawServer(never) as server:
            with pytest.raises(TimeoutError):
                await post(http, server.url)
        async with RawServer(trickle) as server:
            started = loop.time()
            reply = await post(http, server.url, timeout=0.5)
            with pytest.raises(TimeoutError):
                await reply.read()  # never silent for 0.2 s, but over the 0.5 s deadline
            assert 0.45 < loop.time() - started < 2.0
            reply.close()
    finally:
        await http.close()


async def test_a_slow_reader_is_not_a_silent_upstream() -> None:
    async def big(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (4 * 1024 * 1024))
        writer.write(b"y" * (4 * 1024 * 1024))
        await writer.drain()
        await reader.read()

    http = HttpClient(read_timeout=0.15)
    try:
        async with RawServer(big) as server:
            reply = await post(http, server.url)
            await asyncio.sleep(0.5)  # reading paused all along: no read timeout
            assert len(await reply.read()) == 4 * 1024 * 1024
            reply.release()
    finally:
        await http.close()


async def test_a_keep_alive_connection_closed_under_a_request_is_retried_once_on_a_new_one(
    client: HttpClient,
) -> None:
    async def close_on_second(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(response(200, b"first"))
        await writer.drain()
        await server.request(reader)  # the server closes idle connections as this arrives
        if server.accepted == 1:
            return
        writer.write(response(200, b"second"))
        await writer.drain()
        await reader.read()

    async with RawServer(close_on_second) as server:
        assert await fetch(client, server.url) == b"first"
        assert await fetch(client, server.url, b'{"again":1}') == b"first"  # the new connection's first answer
        assert server.accepted == 2
        assert [r.body for r in server.requests] == [b"{}", b'{"again":1}', b'{"again":1}']


async def test_closed_before_or_during_the_answer_and_malformed(client: HttpClient) -> None:
    async def hang_up(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)

    async def cut(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async def garbage(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(hang_up) as server:
        with pytest.raises(UpstreamError, match="closed before the answer"):
            await post(client, server.url)  # a new connection: not sent twice
        assert len(server.requests) == 1
    async with RawServer(cut) as server:
        reply = await post(client, server.url)
        assert await reply.readany() == b"only this"
        with pytest.raises(UpstreamError, match="middle of the answer"):
            await reply.readany()
        reply.close()
        reply = await post(client, server.url)
        with pytest.raises(UpstreamError):
            await reply.read()
        reply.close()
    async with RawServer(garbage) as server:
        with pytest.raises(UpstreamError, match="malformed"):
            await post(client, server.url)
    assert all(stats["open"] == 0 for stats in client.stats().values())


async def test_a_cancelled_request_drops_its_connection(client: HttpClient) -> None:
    async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with RawServer(silent) as server:
        task = asyncio.create_task(post(client, server.url))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)
        assert client.stats()[f"http://127.0.0.1:{server.port}"] == {"open": 0, "idle": 0}


async def test_idle_connections_close_after_the_keepalive_timeout() -> None:
    http = HttpClient(keepalive_timeout=0.1)
    try:
        async with RawServer(answer_each) as server:
            reply = await post(http, server.url)
            await reply.read()
            reply.release()
            assert server.open == 1
            await asyncio.sleep(0.3)
            assert http.stats()[f"http://127.0.0.1:{server.port}"] == {"open": 0, "idle": 0}
            assert server.open == 0
    finally:
        await http.close()


async def test_close_breaks_off_an_answer_being_read(client: HttpClient) -> None:
    async def half(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12")
        await writer.drain()
        await reader.read()

    async with RawServer(half) as server:
        reply = await post(client, server.url)
        await client.close()
        with pytest.raises(UpstreamError):
            await reply.read()
        with pytest.raises(RuntimeError, match="closed"):
            client.post(server.url, JSON, b"")


# --- TLS and proxies -----------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def test_tls_is_verified_against_the_ca_file(certificate: tuple[Path, Path]) -> None:
    async with RawServer(answer_each, tls=server_tls(certificate)) as server:
        trusting = HttpClient(ca_file=str(certificate[0]))
        system = HttpClient()
        try:
            for host in ("127.0.0.1", "localhost"):
                assert await fetch(trusting, f"https://{host}:{server.port}", b"secret") == b"echo:secret"
            with pytest.raises(UpstreamError, match="SSLCertVerificationError"):
                await post(system, server.url)
        finally:
            await trusting.close()
            await system.close()
        assert server.requests[0].header("host") == f"127.0.0.1:{server.port}"


class ForwardProxy:
    """An HTTP proxy: absolute-form requests are forwarded, CONNECT opens a tunnel.
    It asks for credentials when ``credentials`` is set, and keeps what it was asked."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.seen: list[str] = []
        self.server = RawServer(self._handle)

    async def _handle(self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if request is None:
            return
        self.seen.append(request.request_line)
        if self.credentials is not None and request.header("proxy-authorization") != self.credentials:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            return
        method, target, _ = request.request_line.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            host_port = target.split("/")[2]
            host, port = host_port.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            path = "/" + target.split("/", 3)[3]
            kept = b"\r\n".join(
                line for line in request.head.split(b"\r\n")[1:] if not line.lower().startswith(b"proxy-")
            )
            up_writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + kept + b"\r\n\r\n" + request.body)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


async def test_trust_env_goes_through_the_proxy(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ForwardProxy(credentials="Basic dXNlcjpwIHc=")  # user:p w
    async with (
        proxy.server,
        RawServer(answer_each) as plain,
        RawServer(answer_each, tls=server_tls(certificate)) as tls,
    ):
        monkeypatch.setenv("HTTP_PROXY", f"http://user:p%20w@127.0.0.1:{proxy.server.port}")
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:p%20w@127.0.0.1:{proxy.server.port}")
        monkeypatch.setenv("NO_PROXY", "bypassed.example")
        http = HttpClient(trust_env=True, ca_file=str(certificate[0]))
        untrusting = HttpClient(trust_env=False)
        try:
            for url, body in ((plain.url, b"plain"), (f"https://localhost:{tls.port}", b"tunnelled")):
                for _ in range(2):
                    assert await fetch(http, url, body) == b"echo:" + body
            assert proxy.seen == [
                f"POST http://127.0.0.1:{plain.port}/v1/chat/completions HTTP/1.1",
                f"CONNECT localhost:{tls.port} HTTP/1.1",
            ]
            # Through the tunnel the upstream sees the request as if sent directly.
            assert tls.requests[0].request_line == "POST /v1/chat/completions HTTP/1.1"
            assert tls.requests[0].header("proxy-authorization") is None
            assert http.proxy_for("https", "bypassed.example") is None
            reply = await post(untrusting, plain.url)
            reply.release()
            assert len(proxy.seen) == 2
        finally:
            await http.close()
            await untrusting.close()
        proxy.credentials = "Basic wrong"
        http = HttpClient(trust_env=True, ca_file=str(certificate[0]))
        try:
            with pytest.raises(UpstreamError, match=r"refused the tunnel \(407\)"):
                await post(http, f"https://localhost:{tls.port}")
        finally:
            await http.close()
    monkeypatch.setenv("HTTPS_PROXY", "https://127.0.0.1:1")
    with pytest.raises(ValueError, match="only http:// proxies"):
        HttpClient(trust_env=True)
