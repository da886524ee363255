"""A byte-level HTTP/1.1 server for client tests: each test scripts what goes on the wire.

A handler gets every connection as (reader, writer) and answers as it likes,
well-formed or not; the server counts the connections it accepted and how
many were open at once, and keeps each request as it was received.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["RawRequest", "RawServer", "read_request"]


@dataclass(frozen=True)
class RawRequest:
    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(lower-case name, value), in order."""
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            out.append((name.strip().lower(), value.strip()))
        return out

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    """One request (Content-Length bodies), or None when the client closed first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    request = RawRequest(head[:-4], b"")
    length = int(request.header("content-length") or 0)
    body = await reader.readexactly(length) if length else b""
    return RawRequest(request.head, body)


Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    def __init__(self, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[RawRequest] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Hang up on every client: the handlers' reads end, and so do they.
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def request(self, reader: asyncio.StreamReader) -> RawRequest | None:
        """Read one request and keep it."""
        request = await read_request(reader)
        if request is not None:
            self.requests.append(request)
        return request


def response(status: int, body: bytes, *headers: str) -> bytes:
    """A Content-Length framed response."""
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{lines}\r\n".encode() + body
