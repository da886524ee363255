"""Relaying an upstream's answer to the app: the whole body, or a stream chunk by chunk.

The chat handler hands over the attempt loop's ``UpstreamReply``; this module
sends it to the app, releases the upstream response (its connection goes
back to the pool only when read to its end) and, for a stream, classifies
how the stream ended (complete, or ``stream_broken``).
"""

from __future__ import annotations

import asyncio
import json
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
from .usage_stream import Metering, StreamTap

__all__ = ["AnswerBook", "StreamWatch", "relay", "upstream_headers"]

_log = logging.getLogger(__name__)

# Upstream response headers the app may see (besides the status and body).
_PASSED_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"retry-after", b"retry-after-ms", b"x-request-id", b"openai-processing-ms", b"cache-control"}
    | {b"request-id"}  # Anthropic's
)
_PASSED_RESPONSE_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


class StreamWatch(Protocol):
    """Looks at a relayed stream's bytes for an error the upstream told in band (after
    its 200): Anthropic's ``event: error``. The name of the error when one is seen."""

    def seen(self, chunk: bytes) -> str | None: ...


class AnswerBook(Protocol):
    """The request's book-keeping, as the relay needs it."""

    @property
    def request_id(self) -> str: ...

    def attempted(self, record: AttemptRecord) -> None: ...

    def flush(self, *, followed: bool = False) -> None: ...


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
    typed_errors: bool = False,
    broken_event: bytes | None = None,
    watch: StreamWatch | None = None,
    cut_event: bytes | None = None,
    metering: Metering | None = None,
) -> int:
    """Send ``reply`` to the app with ``own_headers`` (the x-keyplane-* ones); its status.

    ``typed_errors``: a broken event stream is told with a typed ``event: error``
    (the Responses API's framing) instead of chat's ``data:`` error object;
    ``broken_event``: the event to tell it with instead (Anthropic's). ``watch``: an
    error event it spots in the stream makes the stream ``stream_broken`` (relayed as
    it came all the same). ``metering``: the answer's usage is read (after it is sent)
    into its record (``sidecar.usage_stream``)."""
    response = reply.response
    try:
        extra = [*upstream_headers(response), *own_headers]
        if reply.streaming:
            # The failed attempts before it are reported now, not when the stream ends
            # (each followed by another: this one, reported when it ends if it is keyed).
            book.flush(followed=reply.attempt.key is not None)
            tap = metering.tap() if metering is not None else None
            return await _relay_stream(
                book, reply, extra, send, metrics, wall_clock, typed_errors, broken_event, watch, cut_event, tap
            )
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
            if metering is not None and 200 <= response.status < 300:
                reply.record.usage = metering.of_body(reply.head)
            book.attempted(reply.record)


_BROKEN = "The upstream stream broke off."


def _broken_event(typed: bool) -> bytes:
    """The event telling the app its stream is cut (the blank lines first end any
    event the upstream left half-sent)."""
    if typed:
        # The Responses API's ``ResponseErrorEvent`` (``type: error``, no sequence number of ours).
        event = {"type": "error", "code": "stream_broken", "message": _BROKEN, "param": None}
        return b"\n\nevent: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    error = errors.error_body(_BROKEN, "upstream_error", code="stream_broken")
    return b"\n\ndata: " + error + b"\n\n"


async def _relay_stream(
    book: AnswerBook,
    reply: UpstreamReply,
    extra: list[tuple[bytes, bytes]],
    send: Send,
    metrics: SidecarMetrics,
    wall_clock: Callable[[], float],
    typed_errors: bool,
    broken_event: bytes | None = None,
    watch: StreamWatch | None = None,
    cut_event: bytes | None = None,
    tap: StreamTap | None = None,
) -> int:
    """Pass a committed stream to the app chunk by chunk, then classify how it ended."""
    response = reply.response
    # Until the stream ends well, a cut (or the app hanging up) is how it ended.
    ending: Classification | None = None
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": extra})
        head = reply.head if tap is None else tap.seen(reply.head)
        if head:
            await send({"type": "http.response.body", "body": head, "more_body": True})
        if reply.head:
            if watch is not None and (told := watch.seen(reply.head)) is not None:
                ending, watch = _told(book, reply, told, metrics), None
        try:
            async for chunk in response.iter_chunks():
                sent = chunk if tap is None else tap.seen(chunk)
                if sent:
                    await send({"type": "http.response.body", "body": sent, "more_body": True})
                if watch is not None and (told := watch.seen(chunk)) is not None:
                    ending, watch = _told(book, reply, told, metrics), None
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
            await _send_held(tap, send)
            if response.content_type == "text/event-stream":
                # Like OpenAI mid-stream: an error event, so the app knows the answer is cut
                # (the blank lines first terminate any event the upstream left half-sent).
                if broken_event is None:
                    broken_event = _broken_event(typed_errors)
                await send({"type": "http.response.body", "body": broken_event, "more_body": True})
        except asyncio.CancelledError as exc:
            if not is_cut(exc):
                raise
            # The sidecar's shutdown grace is over: end the stream with an error event, not silently
            # (the upstream did nothing wrong; the attempt is recorded as its status says).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            _log.debug("request %s: stream cut by the sidecar's shutdown", book.request_id)
            await _send_held(tap, send)
            if response.content_type == "text/event-stream":
                cut = cut_event if cut_event is not None else cut_stream_event(typed=typed_errors)
                await send({"type": "http.response.body", "body": cut, "more_body": True})
        rest = tap.finish() if tap is not None else b""
        await send({"type": "http.response.body", "body": rest, "more_body": False})
    finally:
        if ending is None:
            # Complete, or the app went away: the upstream itself did its job.
            ending = classify_status(response.status, response.headers, b"", wall_clock)
        record = complete(reply, ending, now_loop=asyncio.get_running_loop().time())
        if tap is not None:
            record.usage = tap.usage()
        book.attempted(record)
        book.flush()
    return response.status


async def _send_held(tap: StreamTap | None, send: Send) -> None:
    """The bytes the tap still holds (a partial event), before the stream's error event."""
    held = tap.finish() if tap is not None else b""
    if held:
        await send({"type": "http.response.body", "body": held, "more_body": True})


def _told(book: AnswerBook, reply: UpstreamReply, error: str, metrics: SidecarMetrics) -> Classification:
    """The upstream sent an error event in its stream: how the stream ended."""
    _log.warning(
        "request %s: stream from %s carried an error event (%s) after the first byte; not retried",
        book.request_id,
        describe(reply.attempt),
        error,
    )
    metrics.stream_errors.labels(reply.attempt.target.provider.value).inc()
    return stream_broken(f"stream error event: {error}"[:120])
