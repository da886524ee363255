"""Anthropic-shaped errors for what the sidecar answers itself on ``/v1/messages``.

``{"type": "error", "error": {"type": "...", "message": "..."}}``, the error
type following the status as Anthropic's API does (400 invalid_request_error,
401 authentication_error, 403 permission_error, 404 not_found_error, 413
request_too_large, 429 rate_limit_error, 500 api_error, 504 timeout_error,
529 overloaded_error), so the Anthropic SDK raises its usual exception
classes. Built from the sidecar's OpenAI-shaped errors (``sidecar.errors``),
whose messages never include secrets. Pure.
"""

from __future__ import annotations

import json
import re

from . import errors

__all__ = ["BROKEN_STREAM_EVENT", "CUT_STREAM_EVENT", "ErrorEventWatch", "error_body", "from_openai", "missing_api_key"]

_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(type_: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}}, separators=(",", ":")).encode()


def _type_for(status: int) -> str:
    found = _TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def from_openai(error: errors.ErrorResponse) -> errors.ErrorResponse:
    """The same error (status and message) in Anthropic's shape."""
    try:
        message = str(json.loads(error.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = "The sidecar could not answer this request."
    return errors.ErrorResponse(error.status, error_body(_type_for(error.status), message), error.headers)


def missing_api_key() -> errors.ErrorResponse:
    return errors.ErrorResponse(
        401,
        error_body(
            "authentication_error",
            "x-api-key header is required: give your keyplane client key as the API key of the Anthropic client.",
        ),
    )


# A stream cut after its first byte, told like Anthropic's own mid-stream errors (the
# blank lines first end any event the upstream left half-sent).
BROKEN_STREAM_EVENT = b"\n\nevent: error\ndata: " + error_body("api_error", "The upstream stream broke off.") + b"\n\n"
# A stream the sidecar's shutdown cut (``sidecar.shutdown``), in the same framing.
CUT_STREAM_EVENT = (
    b"\n\nevent: error\ndata: "
    + error_body("overloaded_error", "The keyplane sidecar is shutting down; the stream was cut. Retry the request.")
    + b"\n\n"
)


_ERROR_EVENT = b"event: error"
_ERROR_TYPE = re.compile(rb'"error"\s*:\s*\{\s*"type"\s*:\s*"([a-z_]{1,40})"')


class ErrorEventWatch:
    """Spots Anthropic's in-band ``event: error`` in a stream relayed chunk by chunk
    (also across a chunk boundary); ``seen`` gives its error type (``overloaded_error``),
    or ``"error"`` when the type is not in the same bytes. One per stream."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def seen(self, chunk: bytes) -> str | None:
        data = self._tail + chunk if self._tail else chunk
        at = data.find(_ERROR_EVENT)
        # An event line starts a line: at the very start of the stream, or after a newline.
        while at > 0 and data[at - 1] != 0x0A:
            at = data.find(_ERROR_EVENT, at + 1)
        if at < 0:
            self._tail = data[-len(_ERROR_EVENT) :]
            return None
        found = _ERROR_TYPE.search(data, at)
        return found.group(1).decode() if found is not None else "error"
