"""Relaying an upstream's answer to the app: the whole body, or a stream chunk by chunk.

The chat handler hands over the attempt loop's ``UpstreamReply``; this module
sends it to the app, releases the upstream response (its connection goes
back to the pool only when read to its end) and, for a stream, classifies
how the stream ended (complete, or ``stream_broken``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from keyplane.health.classify import Classification, stream_broken

from . import errors
from .asgi import Send
from .metrics import SidecarMetrics
from .proxy import AttemptRecord, UpstreamReply, classify_status, complete, describe
from .shutdown import cut_stream_event, is_cut
from .upstream import UpstreamError, UpstreamResponse, UpstreamTimeout

__all__ = ["AnswerBook", "relay", "upstream_headers"]

_log = logging.getLogger(__name__)

# Upstream response headers the app may see (besides the status and body).
_PASSED_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"retry-after", b"retry-after-ms", b"x-request-id", b"openai-processing-ms", b"cache-control"}
)
_PASSED_RESPONSE_PREFIXES = (b"x-ratelimit-",)


class AnswerBook(Protocol):
    """The request's book-keeping, as the relay needs it."""

    @property
    def request_id(self) -> str: ...

    def attempted(self, record: AttemptRecord) -> None: ...

    def flush(self) -> None: ...


def upstream_headers(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers the app may see, as raw bytes (never decoded)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in response.raw_headers:
        lower = name.lower()
        if lower in _PASSED_RESPONSE_HEADERS or lower.startswith(_PASSED_RESPONSE_PREFIXES):
            out.append((lower, value))
    return out


async def relay(
    book: AnswerBook,
    reply: UpstreamReply,
    own_headers: list[tuple[bytes, bytes]],
    send: Send,
    *,
    metrics: SidecarMetrics,
    wall_clock: Callable[[], float],
) -> int:
    """Send ``reply`` to the app with ``own_headers`` (the x-keyplane-* ones); its status."""
    response = reply.response
    try:
        extra = [*upstream_headers(response), *own_headers]
        if reply.streaming:
            # The failed attempts before it are reported now, not when the stream ends.
            book.flush()
            return await _relay_stream(book, reply, extra, send, metrics, wall_clock)
        head = reply.head
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(b"content-length", str(len(head)).encode()), *extra],
            }
        )
        await send({"type": "http.response.body", "body": head, "more_body": False})
        return response.status
    finally:
        response.release()  # back to the pool only when the body was read to its end
        if reply.record is not None:
            # The answer is on its way: now its bookkeeping (the handler flushes the reports).
            book.attempted(reply.record)


async def _relay_stream(
    book: AnswerBook,
    reply: UpstreamReply,
    extra: list[tuple[bytes, bytes]],
    send: Send,
    metrics: SidecarMetrics,
    wall_clock: Callable[[], float],
) -> int:
    """Pass a committed stream to the app chunk by chunk, then classify how it ended."""
    response = reply.response
    # Until the stream ends well, a cut (or the app hanging up) is how it ended.
    ending: Classification | None = None
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": extra})
        if reply.head:
            await send({"type": "http.response.body", "body": reply.head, "more_body": True})
        try:
            async for chunk in response.iter_chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            provider = reply.attempt.target.provider.value
            what = "timed out" if isinstance(exc, UpstreamTimeout) else exc.label
            _log.warning(
                "request %s: stream from %s broke after the first byte (%s); not retried",
                book.request_id,
                describe(reply.attempt),
                what,
            )
            ending = stream_broken(f"stream broken: {what}"[:120])
            metrics.stream_errors.labels(provider).inc()
            if response.content_type == "text/event-stream":
                # Like OpenAI mid-stream: an error event, so the app knows the answer is cut
                # (the blank lines first terminate any event the upstream left half-sent).
                error = errors.error_body("The upstream stream broke off.", "upstream_error", code="stream_broken")
                await send({"type": "http.response.body", "body": b"\n\ndata: " + error + b"\n\n", "more_body": True})
        except asyncio.CancelledError as exc:
            if not is_cut(exc):
                raise
            # The sidecar's shutdown grace is over: end the stream with an error event, not silently
            # (the upstream did nothing wrong; the attempt is recorded as its status says).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            _log.debug("request %s: stream cut by the sidecar's shutdown", book.request_id)
            if response.content_type == "text/event-stream":
                await send({"type": "http.response.body", "body": cut_stream_event(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if ending is None:
            # Complete, or the app went away: the upstream itself did its job.
            ending = classify_status(response.status, response.headers, b"", wall_clock)
        record = complete(reply, ending, now_loop=asyncio.get_running_loop().time())
        book.attempted(record)
        book.flush()
    return response.status
