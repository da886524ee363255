"""A raw-socket HTTP/1.1 exchange for edge tests: send bytes as they are (optionally
drip-fed), read the first final answer or the close, and time it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

# One piece of a request: bytes, sent after a pause of this many seconds.
Piece = tuple[bytes, float]


@dataclass(slots=True)
class Exchange:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""
    closed: bool = False  # the server closed (or reset) the connection
    timed_out: bool = False  # neither an answer nor a close within the bound
    elapsed: float = 0.0
    sent: int = 0  # request bytes the socket accepted

    def openai_error(self) -> dict[str, object]:
        """The error object of an OpenAI-shaped answer (AssertionError otherwise)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        payload = json.loads(self.body)
        assert isinstance(payload, dict) and set(payload) == {"error"}, self
        error = payload["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, self
        assert isinstance(error["message"], str) and error["message"], self
        assert isinstance(error["type"], str) and error["type"], self
        return error


def _parse(buf: bytes, *, head_only: bool) -> tuple[int, dict[str, str], bytes] | None:
    """The first final answer in ``buf`` once complete, skipping 1xx interim answers."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = buf[end + 4 :]
        if 100 <= status < 200:
            buf = rest
            continue
        if head_only or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return None
            return status, headers, rest[:length]
        return None  # read to the close


async def exchange(
    port: int, request: bytes | Sequence[Piece], *, bound: float = 5.0, host: str = "127.0.0.1"
) -> Exchange:
    pieces: Sequence[Piece] = [(request, 0.0)] if isinstance(request, bytes) else request
    head_only = pieces[0][0].startswith(b"HEAD ") if pieces else False
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = Exchange()
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        for data, pause in pieces:
            if pause:
                await asyncio.sleep(pause)
            writer.write(data)
            await writer.drain()
            result.sent += len(data)

    sender = asyncio.create_task(send())
    buf = b""
    try:
        async with asyncio.timeout(bound):
            while True:
                parsed = _parse(buf, head_only=head_only)
                if parsed is not None:
                    result.status, result.headers, result.body = parsed
                    break
                try:
                    chunk = await reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                if not chunk:
                    result.closed = True
                    break
                buf += chunk
    except TimeoutError:
        result.timed_out = True
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    result.raw = buf
    if result.status is None and buf.find(b"\r\n\r\n") >= 0:
        # Answer without a length, read to the close.
        head, _, body = buf.partition(b"\r\n\r\n")
        parsed = _parse(head + b"\r\n\r\n", head_only=True)
        if parsed is not None:
            result.status, result.headers, _ = parsed
            result.body = body
    result.elapsed = loop.time() - started
    return result
