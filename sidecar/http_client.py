"""A pooled HTTP/1.1 client for upstream calls, on asyncio protocols and httptools.

The sidecar's one upstream client. It replaces aiohttp's ClientSession on
the request path: ``bench.client_stack`` measured aiohttp's client at about
half of a pass-through proxy's CPU per request, and a keep-alive pool on
httptools (the C parser uvicorn already uses) at a fraction of that. It
does only what an upstream call needs, and all of that:

- one pool per origin (scheme, host, port); idle connections are reused
  newest first (keep-alive) and closed after ``keepalive_timeout`` idle, or
  at once after ``Connection: close`` or when the caller stops reading a
  body before its end;
- at most ``limit_per_host`` connections per origin; more requests wait for
  one, first come first served, within their own deadline;
- TLS with one SSL context (the system's CAs, or ``ca_file``) and SNI;
- ``trust_env``: HTTP(S)_PROXY / NO_PROXY, ``http://`` origins through the
  proxy in absolute form, ``https://`` ones through a CONNECT tunnel;
- timeouts: connecting (TCP, proxy and TLS handshake), reading (the longest
  silence between two bytes of the answer, not counted while the caller has
  stopped reading) and the whole exchange (``timeout``: headers and body);
- response bodies streamed as they arrive, with backpressure: the socket
  stops being read while more than 256 KiB wait for the caller;
- a request whose reused keep-alive connection turns out closed by the
  server before any byte of the answer is sent once more on a new one (the
  server closed an idle connection as the request went out).

Errors: ``TimeoutError`` for every timeout, ``UpstreamError`` for the rest
(refused, DNS, TLS, closed early, a malformed answer). Messages name the
origin, never a header: requests carry provider secrets.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import httptools

__all__ = ["HttpClient", "HttpResponse", "UpstreamError"]

# Reading pauses with more than this waiting for the caller (and resumes once it reads).
_HIGH_WATER = 256 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamError(Exception):
    """No usable answer from the upstream: refused, DNS, TLS, closed early, malformed."""


class _StaleConnection(UpstreamError):
    """A reused connection closed before any byte of the answer: send again on a new one."""


@functools.lru_cache(maxsize=1024)
def _split_url(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, request target, Host header) of an absolute http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an absolute http(s) URL: {scheme or '?'}://{parts.hostname or '?'}")
    host = parts.hostname
    port = parts.port or _DEFAULT_PORTS[scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if " " in target or "\t" in target:
        raise ValueError("the URL's path holds whitespace")
    named = f"[{host}]" if ":" in host else host
    host_header = named if port == _DEFAULT_PORTS[scheme] else f"{named}:{port}"
    return scheme, host, port, target, host_header


class HttpResponse:
    """An upstream's answer: status and headers at once, the body as it arrives.

    Read the body (``read``, ``readany``, ``iter_any``), then ``release()``
    (the connection goes back to the pool when the body was read to its end)
    or ``close()`` (the connection is dropped)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_exc",
        "_headers",
        "_size",
        "_waiter",
        "_whole",
        "raw_headers",
        "status",
    )

    def __init__(self, conn: _Connection, status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        # As received: original case, duplicates kept.
        self.raw_headers = raw_headers
        self._conn: _Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers: dict[str, str] | None = None
        # ``read()`` waits for the whole body: no backpressure then.
        self._whole = False

    @property
    def headers(self) -> dict[str, str]:
        """Lower-case names; a repeated header's values joined with ", "."""
        headers = self._headers
        if headers is None:
            headers = {}
            for raw_name, raw_value in self.raw_headers:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    def at_eof(self) -> bool:
        """The whole body arrived and was read."""
        return self._eof and not self._chunks

    async def read(self) -> bytes:
        """The whole body."""
        if not self._eof:
            self._whole = True
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume()
        while not self._eof:
            if self._exc is not None:
                raise self._exc
            await self._wait()
        return self._take()

    async def readany(self) -> bytes:
        """What has arrived since the last read (waiting for something); b"" at the end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        return self._take()

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def release(self) -> None:
        """Done with this answer: its connection is reused if the body was complete."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.released(reusable=self._eof and self._exc is None)

    def close(self) -> None:
        """Done with this answer; its connection is dropped."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.released(reusable=False)

    # -- fed by the connection --------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return data

    async def _wait(self) -> None:
        conn = self._conn
        if conn is None:
            raise UpstreamError("the response was already released")
        waiter = conn.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        self._wake()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Counted in its pool's open connections (connected, not yet lost).
        self.counted = False
        self.paused = False
        # Served an exchange before (the server may have closed it meanwhile).
        self.reused = False
        self.idle_since = 0.0
        # The exchange in flight.
        self.busy = False
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._response: HttpResponse | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._got_bytes = False
        self._informational = False
        self._until_close = False
        self._complete = False
        self._keep_alive = False
        self._deadline: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the exchange -----------------------------------------------------------

    def send(self, request: bytes, deadline: float | None) -> asyncio.Future[HttpResponse]:
        """Write ``request``; the future is the answer once its headers are in."""
        waiter: asyncio.Future[HttpResponse] = self.loop.create_future()
        self._waiter = waiter
        self._response = None
        self._raw_headers = []
        self._got_bytes = self._informational = self._until_close = False
        self._complete = False
        self.busy = True
        self._deadline = deadline
        if self.pool.read_timeout is not None:
            self._last_read = self.loop.time()
        self._arm()
        assert self.transport is not None
        self.transport.write(request)
        return waiter

    def abandon(self) -> None:
        """The caller gave up before the answer's headers (cancelled): drop the connection."""
        self._waiter = None
        self._drop()

    def released(self, *, reusable: bool) -> None:
        self._response = None
        transport = self.transport
        if reusable and self._complete and self._keep_alive and transport is not None and not transport.is_closing():
            self._cancel_timer()
            self.busy = False
            self.reused = True
            self.pool.put_back(self)
        else:
            self._drop()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _drop(self) -> None:
        self._cancel_timer()
        if not self.closed and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """The exchange failed: tell whoever waits, and drop the connection."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        response = self._response
        if response is not None and not response._eof:
            response._fail(exc)
        self._cancel_timer()
        if not self.closed and self.transport is not None:
            self.transport.abort()

    # -- timeouts: one timer for the deadline and the read timeout ---------------

    def _arm(self) -> None:
        when = self._deadline
        read_timeout = self.pool.read_timeout
        if read_timeout is not None:
            silent_until = self._last_read + read_timeout
            if when is None or silent_until < when:
                when = silent_until
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._deadline is not None and now >= self._deadline:
            self._fail(TimeoutError("the upstream did not answer in time"))
            return
        read_timeout = self.pool.read_timeout
        if read_timeout is not None:
            if self.paused:  # the caller is not reading: silence is ours, not the upstream's
                self._last_read = now
            elif now - self._last_read >= read_timeout:
                self._fail(TimeoutError(f"the upstream sent nothing for {read_timeout:g} s"))
                return
        self._arm()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are no subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self._fail(UpstreamError(f"{self.pool.origin}: bytes on an idle connection"))
            return
        self._got_bytes = True
        if self.pool.read_timeout is not None:
            self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamError(f"{self.pool.origin}: malformed HTTP response"))

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.lost(self)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if self.reused and not self._got_bytes:
                waiter.set_exception(_StaleConnection(f"{self.pool.origin}: keep-alive connection closed"))
            else:
                waiter.set_exception(UpstreamError(f"{self.pool.origin}: connection closed before the answer"))
            return
        response = self._response
        if response is not None and not self._complete and response._exc is None:
            if self._until_close and exc is None:
                self._complete = True
                response._feed_eof()
            else:
                response._fail(UpstreamError(f"{self.pool.origin}: connection closed in the middle of the answer"))

    # -- httptools callbacks ------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx (103 Early Hints...): the answer is still to come
            self._informational = True
            self._raw_headers = []
            return
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():  # nobody waits (cancelled, or bytes after the answer)
            self._fail(UpstreamError(f"{self.pool.origin}: an answer nobody waits for"))
            return
        raw = self._raw_headers
        framed = status in (204, 304)
        for name, value in raw:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                framed = True
                break
        self._until_close = not framed
        response = HttpResponse(self, status, raw)
        self._response = response
        waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        response._feed(body)
        if response._size > _HIGH_WATER and not response._whole and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()
        self._cancel_timer()
        response = self._response
        if response is not None:
            response._feed_eof()


class _Pool:
    """The connections to one origin."""

    def __init__(self, client: HttpClient, scheme: str, host: str, port: int) -> None:
        self.client = client
        self.loop = client.loop
        self.origin = f"{scheme}://{host}:{port}"
        self.scheme, self.host, self.port = scheme, host, port
        self.read_timeout = client.read_timeout
        self.idle: list[_Connection] = []
        # Every connection counted in ``open``, idle or busy.
        self.conns: set[_Connection] = set()
        self.open = 0
        self.closed = False
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        # What the request line and extra headers look like through a proxy.
        self.proxy = client.proxy_for(scheme, host)
        self.target_prefix = ""
        self.proxy_headers = ""
        if self.proxy is not None and scheme == "http":
            self.target_prefix = f"http://{host}:{port}"
            self.proxy_headers = self.proxy.authorization

    def take(self) -> _Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                return conn
        return None

    def put_back(self, conn: _Connection) -> None:
        if self.closed:
            conn._drop()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.client.keepalive_timeout, self._on_sweep)
        self._wake()

    def lost(self, conn: _Connection) -> None:
        if not conn.counted:
            return
        conn.counted = False
        self.open -= 1
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _on_sweep(self) -> None:
        self._sweep = None
        expired = self.loop.time() - self.client.keepalive_timeout
        for conn in [c for c in self.idle if c.idle_since <= expired]:
            self.idle.remove(conn)
            conn._drop()
        if self.idle:
            oldest = min(c.idle_since for c in self.idle)
            self._sweep = self.loop.call_at(oldest + self.client.keepalive_timeout, self._on_sweep)

    async def connection(self, deadline: float | None) -> _Connection:
        """An idle connection, or a new one once the per-host cap allows."""
        while True:
            conn = self.take()
            if conn is not None:
                return conn
            if self.open < self.client.limit_per_host:
                break
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        return await self.connect(deadline)

    async def connect(self, deadline: float | None) -> _Connection:
        self.open += 1
        try:
            by = self.loop.time() + self.client.connect_timeout
            async with asyncio.timeout_at(by if deadline is None else min(by, deadline)):
                conn = await self._connect()
        except TimeoutError:
            self.open -= 1
            self._wake()
            raise
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            self.open -= 1
            self._wake()
            raise UpstreamError(f"cannot connect to {self.origin}: {type(exc).__name__}") from exc
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        if conn.closed:  # lost already (closed at once, or cancelled as it connected)
            self.open -= 1
            self._wake()
            raise UpstreamError(f"{self.origin}: connection closed as it opened")
        conn.counted = True
        self.conns.add(conn)
        return conn

    async def _connect(self) -> _Connection:
        loop = self.loop
        tls = self.client.ssl_context if self.scheme == "https" else None
        proxy = self.proxy
        if proxy is None:
            _, conn = await loop.create_connection(
                lambda: _Connection(self), self.host, self.port, ssl=tls, server_hostname=self.host if tls else None
            )
            return conn
        if tls is None:  # plain http through the proxy: absolute-form requests
            _, conn = await loop.create_connection(lambda: _Connection(self), proxy.host, proxy.port)
            return conn
        transport, handshake = await loop.create_connection(lambda: _TunnelHandshake(loop), proxy.host, proxy.port)
        try:
            authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            transport.write(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{proxy.authorization}\r\n".encode("latin-1")
            )
            await handshake.done
            conn = _Connection(self)
            tls_transport = await loop.start_tls(transport, conn, tls, server_hostname=self.host)
        except BaseException:
            transport.abort()
            raise
        if tls_transport is None:
            raise UpstreamError(f"{self.origin}: TLS through the proxy failed")
        conn.connection_made(tls_transport)
        return conn

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.idle.clear()
        for conn in list(self.conns):
            conn._fail(UpstreamError("the client is closed"))
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("the client is closed"))
        self.waiters.clear()


class _TunnelHandshake(asyncio.Protocol):
    """Reads a proxy's answer to CONNECT (its head only; nothing follows before TLS)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, _ = self.buffer.partition(b"\r\n\r\n")
        if not sep or self.done.done():
            return
        status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if len(status_line) >= 2 and status_line[1].startswith(b"2"):
            self.done.set_result(None)
        else:
            code = status_line[1].decode("latin-1") if len(status_line) >= 2 else "?"
            self.done.set_exception(UpstreamError(f"the proxy refused the tunnel ({code})"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(UpstreamError("the proxy closed the connection"))


class _Proxy:
    __slots__ = ("authorization", "host", "port")

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("only http:// proxies are supported")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authorization = ""
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self.authorization = f"Proxy-Authorization: Basic {token}\r\n"


class HttpClient:
    """Pools of HTTP/1.1 connections, one per origin. Create and use inside one event loop."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 600.0,
        limit_per_host: int = 256,
        keepalive_timeout: float = 60.0,
        trust_env: bool = False,
        ca_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if connect_timeout <= 0 or keepalive_timeout <= 0 or limit_per_host < 1:
            raise ValueError("connect_timeout and keepalive_timeout must be > 0, limit_per_host >= 1")
        if read_timeout is not None and read_timeout <= 0:
            raise ValueError("read_timeout must be > 0 or None")
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limit_per_host = limit_per_host
        self.keepalive_timeout = keepalive_timeout
        self.ssl_context = ssl_context or ssl.create_default_context(cafile=ca_file)
        self._proxy_env: dict[str, str] = urllib.request.getproxies_environment() if trust_env else {}
        # Parsed now, so that a proxy URL we cannot use fails at start, not on a request.
        self._proxies = {s: _Proxy(self._proxy_env[s]) for s in ("http", "https") if self._proxy_env.get(s)}
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._closed = False

    def proxy_for(self, scheme: str, host: str) -> _Proxy | None:
        proxy = self._proxies.get(scheme)
        if proxy is None or urllib.request.proxy_bypass_environment(host, self._proxy_env):  # type: ignore[attr-defined]
            return None
        return proxy

    def post(
        self, url: str, headers: Mapping[str, str], body: bytes, *, timeout: float | None = None
    ) -> Awaitable[HttpResponse]:
        """Send a POST; the awaitable is the answer once its headers are in.

        ``timeout`` bounds the whole exchange, the body included. Raises
        ``ValueError`` at once for a URL or header that cannot be sent."""
        if self._closed:
            raise RuntimeError("the client is closed")
        scheme, host, port, target, host_header = _split_url(url)
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            pool = self._pools[(scheme, host, port)] = _Pool(self, scheme, host, port)
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
            raise ValueError("a header name or value holds a line break")
        head = (
            f"POST {pool.target_prefix}{target} HTTP/1.1\r\nhost: {host_header}\r\n{pool.proxy_headers}{lines}"
            f"content-length: {len(body)}\r\n\r\n"
        )
        deadline = None if timeout is None else self.loop.time() + timeout
        return self._exchange(pool, head.encode("latin-1") + body, deadline)

    async def _exchange(self, pool: _Pool, request: bytes, deadline: float | None) -> HttpResponse:
        conn = pool.take() or await pool.connection(deadline)
        try:
            return await conn.send(request, deadline)
        except _StaleConnection:
            conn = await pool.connect(deadline)
        except BaseException:
            conn.abandon()
            raise
        try:
            return await conn.send(request, deadline)
        except BaseException:
            conn.abandon()
            raise

    async def close(self) -> None:
        """Close every connection; answers still being read break off."""
        self._closed = True
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
        await asyncio.sleep(0)  # let the transports finish closing

    def stats(self) -> dict[str, Any]:
        """Open and idle connections per origin (for tests and debugging)."""
        return {p.origin: {"open": p.open, "idle": len(p.idle)} for p in self._pools.values()}
