"""The sidecar's graceful shutdown, as the request path sees it.

On SIGTERM (``Sidecar.shutdown``):

1. **draining**, ``shutdown_delay`` seconds: the listener still accepts and
   serves, but ``/healthz`` answers 503 ``draining``, so a readiness probe
   takes the pod out of its Service and the app next to it stops sending
   here before the socket closes;
2. **closing**, up to ``shutdown_grace`` seconds: the listener closes (new
   connections are refused), idle keep-alive connections are closed, and
   requests and streams in flight run on;
3. **cut**: whatever still runs is cancelled with ``CUT``. A stream ends with
   an OpenAI-shaped SSE error event (``data: {"error": {...}}``) and a
   clean end of body, never silently; a request not answered yet gets 503
   ``shutting_down``.

Then the watch stream ends and the outcome reports are flushed.

A cancellation carries ``CUT`` as its message; nothing is registered per
request, so the request path pays nothing for any of this.
"""

from __future__ import annotations

import asyncio
import json

from . import errors

__all__ = ["CUT", "cut_stream_event", "is_cut", "shutting_down"]

# The message of the cancellation a shutdown sends to the requests it cuts.
CUT = "keyplane sidecar: shutdown grace over"


def is_cut(exc: asyncio.CancelledError) -> bool:
    """Whether ``exc`` is the shutdown's cut (not an app hang-up or another cancellation)."""
    return bool(exc.args) and exc.args[0] == CUT


CUT_MESSAGE = "The keyplane sidecar is shutting down; the stream was cut before its end. Retry the request."


def cut_stream_event(*, typed: bool = False) -> bytes:
    """The SSE event that ends a stream cut by the shutdown (the blank lines first end
    any event the upstream left half-sent), as OpenAI sends an error mid-stream;
    ``typed``: the Responses API's ``event: error`` framing."""
    if typed:
        event = {"type": "error", "code": "shutting_down", "message": CUT_MESSAGE, "param": None}
        return b"\n\nevent: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    error = errors.error_body(CUT_MESSAGE, "service_unavailable", code="shutting_down")
    return b"\n\ndata: " + error + b"\n\n"


def shutting_down() -> errors.ErrorResponse:
    """503 for a request the shutdown cut before it was answered."""
    return errors.ErrorResponse(
        503,
        errors.error_body(
            "The keyplane sidecar is shutting down; the request was not answered. Retry the request.",
            "service_unavailable",
            code="shutting_down",
        ),
    )
