"""The one pooled ``aiohttp.ClientSession`` of a sidecar, and the answers it gives.

Tuned once when the sidecar starts (no cookie jar, no auto-decompression, no
auto headers we do not want, one prebuilt timeout per deadline class, a
connector with the per-host cap and keep-alive, the SSL context built once);
callers see ``UpstreamResponse`` and ``UpstreamError``s, never aiohttp's types.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler

from .errors import (
    UpstreamAnswerCut,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTooLarge,
)
from .host_gate import HostGate
from .request import RequestBody, UpstreamRequest, origin_of

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "UpstreamClient",
    "UpstreamResponse",
    "make_ssl_context",
]

# Limits on an upstream's answer (aiohttp's own defaults for the head).
DEFAULT_MAX_HEADER_SIZE = 8190  # bytes in the status line and in any one header line
DEFAULT_MAX_HEADERS = 128  # header lines in one response head
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer held in memory

# Headers aiohttp would add on its own: no Accept-Encoding (bodies are passed
# through undecoded, so the upstream must not compress), no default
# User-Agent or Accept (the app's are forwarded when it sends them).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


def make_ssl_context(ca_file: str | None = None, *, ca_file_only: bool = False) -> ssl.SSLContext:
    """The upstream TLS context: the system's CAs plus ``ca_file``, or ``ca_file`` alone."""
    if ca_file_only:
        if ca_file is None:
            raise ValueError("ca_file_only needs a ca_file")
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def _translate(exc: BaseException, *, answering: bool) -> UpstreamError:
    """Our error for aiohttp's (or asyncio's) ``exc``; ``answering``: the head is in."""
    error: UpstreamError
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts subclass it
        error = UpstreamTimeout("the upstream timed out")
    elif isinstance(exc, aiohttp.ClientSSLError):
        inner = getattr(exc, "certificate_error", None) or exc.os_error
        error = UpstreamTlsError(f"TLS handshake with {exc.host}:{exc.port} failed: {type(inner).__name__}")
    elif isinstance(exc, aiohttp.ClientHttpProxyError):
        error = UpstreamConnectError(f"the proxy refused the tunnel ({exc.status})")
    elif isinstance(exc, aiohttp.ClientConnectorError):
        error = UpstreamConnectError(f"cannot connect to {exc.host}:{exc.port}")
    elif isinstance(exc, aiohttp.ClientResponseError):
        # The parser's verdict (its ``status`` is the one it would answer with, not the upstream's).
        error = UpstreamMalformed(f"malformed answer: {str(exc.message)[:120]}")
    elif isinstance(exc, aiohttp.ClientPayloadError):
        error = UpstreamAnswerCut("the connection closed in the middle of the answer")
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        where = "in the middle of" if answering else "before"
        error = UpstreamAnswerCut(f"the connection closed {where} the answer")
    elif isinstance(exc, aiohttp.ClientError | OSError):
        error = UpstreamAnswerCut(f"the connection failed: {type(exc).__name__}")
    else:  # pragma: no cover - every aiohttp failure is one of the above
        error = UpstreamError(type(exc).__name__)
    return error


class _StrictHandler(ResponseHandler):
    """aiohttp's connection protocol, never reused with anything left on it.

    aiohttp checks ``should_close`` (unread body, stray bytes, a parse error)
    when a connection is released, but a connection idle in the pool is only
    checked for being open: bytes arriving after the answer (a stray second
    response, a late header block) would be parsed there and handed to the
    next request as its answer. Here an idle connection holding anything is
    not connected, so the pool closes it instead of reusing it.
    """

    def is_connected(self) -> bool:
        return super().is_connected() and not self.should_close


class _StrictConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` whose connections are ``_StrictHandler``s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp builds every connection's protocol with this factory.
        self._factory = cast("functools.partial[ResponseHandler]", functools.partial(_StrictHandler, loop=self._loop))


class UpstreamResponse:
    """An upstream's answer: status and head at once, the body as it arrives.

    Read the body (``read``, ``readany``, ``iter_chunks``), then ``release()``
    (the connection goes back to the pool only when the body was read to its
    end and nothing else came after it) or ``close()`` (the connection is
    dropped). Read errors are ``UpstreamError``s."""

    __slots__ = ("_gate", "_headers", "_origin", "_response", "raw_headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, gate: HostGate, origin: str) -> None:
        self._response = response
        # The per-host slot this answer holds until ``release``/``close``.
        self._gate: HostGate | None = gate
        self._origin = origin
        self.status: int = response.status
        # As received: original case, duplicates kept.
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = response.raw_headers
        self._headers: dict[str, str] | None = None

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
        return self._response.content.at_eof()

    async def read(self, limit: int) -> bytes:
        """The whole body; ``UpstreamTooLarge`` when it is over ``limit`` bytes."""
        declared = self._response.content_length
        if declared is not None and declared > limit:
            raise UpstreamTooLarge(f"the answer's {declared} bytes are over the {limit} allowed")
        content = self._response.content
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise UpstreamTooLarge(f"the answer is over the {limit} bytes allowed")
                chunks.append(chunk)
        except UpstreamError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, answering=True) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def readany(self) -> bytes:
        """The next bytes of the body as soon as any are in; b"" at its end."""
        try:
            return await self._response.content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, answering=True) from None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body, as it arrives."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, answering=True) from None

    def release(self) -> None:
        """Done with the answer: its connection is reused if it is clean, else closed."""
        self._response.release()
        self._leave()

    def close(self) -> None:
        """Done with the answer, whatever is left of it: the connection is closed."""
        self._response.close()
        self._leave()

    def _leave(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.leave(self._origin)


class UpstreamClient:
    """One pooled HTTP client for every provider; ``start`` before use, ``close`` after.

    ``connect_timeout`` bounds the TCP connect and the TLS handshake,
    ``read_timeout`` the longest silence between two bytes of an answer and
    ``total_timeout`` one call, its body included (unless ``send`` is given
    less time)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        total_timeout: float | None = 600.0,
        limit_per_host: int = 256,
        keepalive_timeout: float = 60.0,
        trust_env: bool = False,
        ca_file: str | None = None,
        ca_file_only: bool = False,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._limit_per_host = limit_per_host
        self._keepalive_timeout = keepalive_timeout
        self._trust_env = trust_env
        self._ssl = make_ssl_context(ca_file, ca_file_only=ca_file_only)
        self._max_header_size = max_header_size
        self._max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        # The deadline classes: a whole request's (first attempts), and one per
        # shorter budget (retries; built then, since each has its own).
        self._timeout = aiohttp.ClientTimeout(total=total_timeout, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        # Calls in flight per origin, the waiters in line (see ``host_gate``).
        self._gate = HostGate(limit_per_host)

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = _StrictConnector(
            limit=0,  # no overall cap: each provider host has its own
            limit_per_host=self._limit_per_host,
            keepalive_timeout=self._keepalive_timeout,
            ssl=self._ssl,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=self._timeout,
            raise_for_status=False,
            trust_env=self._trust_env,
            max_line_size=self._max_header_size,
            max_field_size=self._max_header_size,
            max_headers=self._max_headers,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _timeout_for(self, time_left: float | None) -> aiohttp.ClientTimeout:
        total = self._total_timeout
        if time_left is None or (total is not None and time_left >= total - 0.5):
            return self._timeout
        return aiohttp.ClientTimeout(total=time_left, sock_connect=self._connect_timeout, sock_read=self._read_timeout)

    async def send(
        self, request: UpstreamRequest, body: RequestBody, *, time_left: float | None = None
    ) -> UpstreamResponse:
        """Send ``body`` (a POST, or ``request.method``); returns once the upstream's head is in.

        A ``StreamedBody`` is sent as it is read, with its ``size`` as Content-Length.

        ``time_left`` caps the whole call, reading its body included (what is
        left of the request's deadline); None keeps the client's total timeout.
        The caller owns the response: read or stream its body, then
        ``release()`` it. Raises ``UpstreamError``; the request is written to
        the network at most once.
        """
        session = self._session
        if session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        origin = origin_of(request.url)
        gate = self._gate
        if not gate.try_enter(origin):
            time_left = await self._wait_in_line(origin, time_left)
        headers = request.headers
        data: Any = body
        method = request.method
        if method != "POST" and not body:
            data = None
        elif not isinstance(body, bytes):
            headers = {**headers, "content-length": str(body.size)}
            data = body.chunks()
        try:
            response = await session.request(
                method,
                request.url,
                data=data,
                headers=headers,
                timeout=self._timeout_for(time_left),
                allow_redirects=False,
            )
        except aiohttp.InvalidURL as exc:
            gate.leave(origin)
            raise UpstreamConfigError(f"unusable request: {type(exc).__name__}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:  # (certificate errors are ValueErrors too)
            gate.leave(origin)
            raise _translate(exc, answering=False) from None
        except ValueError as exc:  # a header value with a line break
            gate.leave(origin)
            raise UpstreamConfigError(f"unusable request: {type(exc).__name__}") from None
        except BaseException:
            gate.leave(origin)
            raise
        if response.status < 200:  # 101 (interim 1xx answers never get here): not an answer to pass on
            response.close()
            gate.leave(origin)
            raise UpstreamMalformed(f"the upstream answered {response.status} to a {method}")
        return UpstreamResponse(response, gate, origin)

    async def _wait_in_line(self, origin: str, time_left: float | None) -> float | None:
        """Wait for a slot to ``origin`` within ``time_left``; what is left of it then."""
        budget = self._total_timeout if time_left is None else time_left
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(budget):
                await self._gate.enter(origin)
        except TimeoutError:
            raise UpstreamTimeout("no connection to the upstream came free within the deadline") from None
        if budget is None:
            return None
        left = budget - (loop.time() - started)
        if left <= 0:
            self._gate.leave(origin)
            raise UpstreamTimeout("no connection to the upstream came free within the deadline")
        return left
