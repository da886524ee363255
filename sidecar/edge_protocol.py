"""The sidecar's HTTP/1.1 edge: uvicorn's httptools protocol with limits, timeouts
and OpenAI-shaped answers for everything it refuses itself.

Pinned to uvicorn 0.54 (``uvicorn.protocols.http.httptools_impl``). Stock
uvicorn answers bad framing with a plain-text 400 ("Invalid HTTP request
received."), has no limit on a request head (httptools gathers a header of any
size in memory) and no timeout on a request that stops half way. This subclass:

- answers every parse error with a JSON 400 (``data_received``; uvicorn's
  ``send_400_response`` is overridden too) and an exception in the app before
  its answer with a JSON 500 (in place of uvicorn's plain text);
- refuses a head larger than ``max_head_bytes`` or with more than
  ``max_headers`` fields with 431, counting raw bytes as they arrive (so a
  huge header is cut after the limit, not buffered);
- refuses a declared or streamed body larger than ``max_body_bytes`` with 413
  while it arrives;
- answers 408 and closes when a head has not arrived within ``head_timeout``
  of its first byte (or of the connection), or a body within
  ``body_timeout`` of its head;
- refuses CONNECT (405) and an ``Upgrade`` request that carries a body (400);
  an ``Upgrade`` request without one is answered normally and the connection
  closed after it (there is nothing to upgrade to).

An answer is written only while no response of the app has started for the
request; otherwise the connection is just closed. A refusal in the head of a
pipelined request waits until the answers before it are out. After a refusal
nothing more the connection sends is parsed; it is half-closed and closed
``LINGER`` later (closing with unread bytes would reset the answer away).
"""

from __future__ import annotations

import asyncio
import functools
import http
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from . import errors

__all__ = ["EdgeLimits", "edge_protocol"]


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    head_timeout: float = 10.0
    body_timeout: float = 30.0


# How long a refused connection stays half-open (answer sent, nothing read) before it is closed.
LINGER = 1.0


class _Refuse(Exception):
    """Raised inside a parser callback: stops the parse; the answer to write."""

    def __init__(self, error: errors.ErrorResponse) -> None:
        super().__init__(error.status)
        self.error = error


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())


def _answer(error: errors.ErrorResponse) -> bytes:
    return b"".join(
        (
            _status_line(error.status),
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(error.body),
            error.body,
        )
    )


def head_too_large(limit: int) -> errors.ErrorResponse:
    return errors.ErrorResponse(
        431,
        errors.error_body(
            f"The request head is larger than the {limit} bytes allowed.",
            "invalid_request_error",
            code="request_head_too_large",
        ),
    )


def too_many_headers(limit: int) -> errors.ErrorResponse:
    return errors.ErrorResponse(
        431,
        errors.error_body(
            f"The request has more than the {limit} header fields allowed.",
            "invalid_request_error",
            code="too_many_headers",
        ),
    )


def request_timeout(what: str, seconds: float) -> errors.ErrorResponse:
    return errors.ErrorResponse(
        408,
        errors.error_body(
            f"The request {what} did not arrive within {seconds:g}s.",
            "invalid_request_error",
            code="request_timeout",
        ),
    )


def malformed(message: str = "The HTTP request is malformed.") -> errors.ErrorResponse:
    return errors.ErrorResponse(400, errors.error_body(message, "invalid_request_error", code="bad_request"))


class EdgeProtocol(HttpToolsProtocol):
    """Use ``edge_protocol(limits)``: the subclass with the limits bound."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._refused = False
        self._refusal: errors.ErrorResponse | None = None
        # A refusal waiting for an earlier request's answer to finish.
        self._deferred: errors.ErrorResponse | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.head_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        limits = self.limits
        if self._in_head:
            if self._timer is None:
                self._arm(limits.head_timeout, "head")
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # never upgraded (no WebSockets): the request is answered as a plain one
        except httptools.HttpParserError:
            # Bad framing, or a refusal raised by a callback below (it rides on the error).
            error, self._refusal = self._refusal, None
            self._refuse(error if error is not None else malformed())
            return
        if not self._refused and self._in_head and self._head_bytes > limits.max_head_bytes:
            # Still no end of head after the limit: cut it here (at most one read past it).
            self._refuse(head_too_large(limits.max_head_bytes))

    def shutdown(self) -> None:
        if self._refused and self._deferred is None:
            self.transport.close()  # answered already; no need to linger through a shutdown
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's plain-text 400; data_received above no longer calls it, kept JSON all the same.
        self._refuse(malformed())

    # --- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._header_count = 0
        self._body_bytes = 0
        if self._timer is None:
            self._arm(self.limits.head_timeout, "head")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.limits.max_head_bytes:
            self._fail(head_too_large(self.limits.max_head_bytes))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._fail(too_many_headers(self.limits.max_headers))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        limits = self.limits
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > limits.max_head_bytes:
            self._fail(head_too_large(limits.max_head_bytes))
        method = self.parser.get_method()
        if method == b"CONNECT":
            self._fail(errors.method_not_allowed("CONNECT", self.url.decode("latin-1")))
        length = _content_length(self.headers)
        chunked = any(n == b"transfer-encoding" for n, _ in self.headers)
        if length is not None and length > limits.max_body_bytes:
            self._fail(errors.body_too_large(limits.max_body_bytes))
        upgrade = self.parser.should_upgrade()
        if upgrade and (chunked or (length or 0) > 0):
            self._fail(malformed("Protocol upgrades are not supported."))
        self._in_head = False
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            # An exception in the app before its answer: a JSON 500, not uvicorn's plain text.
            setattr(cycle, "send_500_response", functools.partial(_send_500, cycle))  # noqa: B010
            if upgrade:
                cycle.keep_alive = False
        self._arm(limits.body_timeout, "body")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._fail(errors.body_too_large(self.limits.max_body_bytes))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    # --- refusals ---------------------------------------------------------------------

    def _fail(self, error: errors.ErrorResponse) -> None:
        """From a parser callback: remember the answer and stop the parse."""
        self._refusal = error
        raise _Refuse(error)

    def _refuse(self, error: errors.ErrorResponse | None) -> None:
        """Answer ``error`` and close; nothing more from this connection is parsed.

        In a head, the cycle is the previous request's: when its answer is still
        going out (a pipelining client), the refusal waits for it (and for the
        requests queued behind it), then goes out. In a body, the cycle is this
        request's: answered when its app has not started an answer, else closed."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        cycle = self.cycle
        transport = self.transport
        if self._in_head:
            if error is not None and cycle is not None and not cycle.response_complete:
                self._deferred = error
                transport.pause_reading()
                return
            self._answer_and_close(error)
            return
        writable = not self.pipeline and (cycle is None or not cycle.response_started)
        if cycle is not None and not cycle.response_complete:
            # The app (if it runs) sees a disconnect and writes nothing more.
            cycle.disconnected = True
            cycle.message_event.set()
        if not writable:
            transport.close()
            return
        self._answer_and_close(error)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        error = self._deferred
        if error is not None and not self.pipeline and self.cycle.response_complete:
            self._deferred = None
            self._answer_and_close(error)

    def _answer_and_close(self, error: errors.ErrorResponse | None) -> None:
        transport = self.transport
        if error is None or transport.is_closing():
            transport.close()
            return
        transport.write(_answer(error))
        if not transport.can_write_eof():
            transport.close()
            return
        # Half-close, stop reading, and close a moment later: closing at once with
        # unread bytes would reset the connection and could destroy the answer in
        # flight; not reading bounds what a flooding client costs meanwhile.
        transport.write_eof()
        transport.pause_reading()
        self._disarm()
        self._timer = self.loop.call_later(LINGER, transport.close)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str, seconds: float) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.pipeline or (self._in_head and self.cycle is not None and not self.cycle.response_complete):
            # Waiting behind an answer in progress (a pipelining client): reading is
            # paused meanwhile, and that answer's own deadline bounds the wait.
            self._arm(seconds, what)
            return
        if what == "head" and self._head_bytes == 0:
            # Nothing of a request arrived: an idle connection, closed without an answer.
            self._refused = True
            self.transport.close()
            return
        self._refuse(request_timeout(what, seconds))


_INTERNAL_ERROR = errors.error_body("The sidecar failed to handle the request.", "server_error", code="internal_error")


async def _send_500(cycle: RequestResponseCycle) -> None:
    await cycle.send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(_INTERNAL_ERROR)),
                (b"connection", b"close"),
            ],
        }
    )
    await cycle.send({"type": "http.response.body", "body": _INTERNAL_ERROR, "more_body": False})


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def edge_protocol(limits: EdgeLimits) -> type[EdgeProtocol]:
    """An ``EdgeProtocol`` subclass bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("KeyplaneEdgeProtocol", (EdgeProtocol,), {"limits": limits})


# httptools raises a callback's exception as HttpParserCallbackError (an HttpParserError).
assert issubclass(httptools.HttpParserCallbackError, httptools.HttpParserError)
