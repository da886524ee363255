"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

Messages never include secrets or client tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ErrorResponse",
    "bad_gateway",
    "body_too_large",
    "endpoint_not_served",
    "error_body",
    "invalid_api_key",
    "invalid_request",
    "method_not_allowed",
    "missing_api_key",
    "model_not_found",
    "no_usable_key",
    "not_found",
    "not_ready",
    "previous_response_unavailable",
    "rate_limited",
    "response_not_found",
    "response_unavailable",
    "upstream_timeout",
]


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    status: int
    body: bytes
    # Headers of the answer itself (Retry-After, x-should-retry), raw.
    headers: tuple[tuple[bytes, bytes], ...] = ()


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> bytes:
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json.dumps(payload, separators=(",", ":")).encode()


def _error(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(status, error_body(message, type_, param=param, code=code))


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return _error(400, message, "invalid_request_error", param=param, code=code)


def missing_api_key() -> ErrorResponse:
    return _error(
        401,
        "You didn't provide an API key. Provide your keyplane client key as 'Authorization: Bearer <key>'.",
        "invalid_request_error",
        code="missing_api_key",
    )


def invalid_api_key() -> ErrorResponse:
    return _error(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")


def not_found(path: str) -> ErrorResponse:
    return _error(404, f"Unknown request URL: {path[:200]}.", "invalid_request_error", code="unknown_url")


def model_not_found(model: str) -> ErrorResponse:
    return _error(
        404,
        f"The model '{model[:200]}' does not exist or you do not have access to it.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def method_not_allowed(method: str, path: str) -> ErrorResponse:
    return _error(
        405,
        f"Method {method[:16]} is not allowed for {path[:200]}.",
        "invalid_request_error",
        code="method_not_allowed",
    )


def body_too_large(limit: int) -> ErrorResponse:
    return _error(
        413,
        f"Request body is larger than the {limit} bytes allowed.",
        "invalid_request_error",
        code="request_too_large",
    )


def bad_gateway(message: str = "The upstream provider could not be reached.") -> ErrorResponse:
    return _error(502, message, "upstream_error", code="upstream_unavailable")


def upstream_timeout() -> ErrorResponse:
    return _error(504, "The upstream provider timed out.", "upstream_error", code="upstream_timeout")


# Answers a retry cannot help (the openai SDKs obey it).
NO_RETRY: tuple[bytes, bytes] = (b"x-should-retry", b"false")

_REASON_TEXT = {
    "credentials": "every key failed its credentials",
    "exhausted": "every key is out of credits or quota",
    "disabled": "every key is disabled",
    "no_keys": "no key is configured",
    "cooling": "every key is cooling down after errors",
    "rate_limited": "every key is rate limited",
}


def retry_after_headers(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    """``Retry-After`` (whole seconds, rounded up: never earlier than asked) and ``retry-after-ms``."""
    seconds = max(0.0, seconds)
    return (
        (b"retry-after", str(math.ceil(seconds)).encode()),
        (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()),
    )


def no_usable_key(
    model: str | None,
    *,
    reason: str | None = None,
    providers: Sequence[tuple[str, str]] = (),
    retry_after: float | None = None,
) -> ErrorResponse:
    """503 ``no_usable_key``: ``reason`` (credentials, exhausted, disabled, no_keys,
    cooling) and, per provider left without a usable key, its own reason, in the
    error object; ``retry_after`` for a cooling one, else (with a reason)
    ``x-should-retry: false``: retrying cannot help until an admin acts."""
    what = f" for model '{model[:200]}'" if model else ""
    message = f"No usable provider key{what}."
    if providers:
        message = message[:-1] + ": " + "; ".join(f"{p}: {_REASON_TEXT.get(r, r)}" for p, r in providers) + "."
    error: dict[str, object] = {
        "message": message,
        "type": "upstream_error",
        "param": "model" if model else None,
        "code": "no_usable_key",
    }
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if reason is not None:
        error["reason"] = reason
        error["providers"] = [p for p, _ in providers]
        if retry_after is not None:
            headers = retry_after_headers(retry_after)
        elif reason != "cooling":
            headers = (NO_RETRY,)
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    return ErrorResponse(503, body, headers)


def rate_limited(model: str, retry_after: float, providers: Sequence[str]) -> ErrorResponse:
    """429 when every key left is rate limited: Retry-After is when the first one recovers."""
    error = {
        "message": f"Every provider key for model '{model[:200]}' is rate limited; "
        f"the first recovers in {max(0.0, retry_after):.1f}s.",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
        "reason": "rate_limited",
        "providers": list(providers),
    }
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    return ErrorResponse(429, body, retry_after_headers(retry_after))


def not_ready() -> ErrorResponse:
    return _error(
        503,
        "The sidecar has not received its configuration from the control plane yet.",
        "service_unavailable",
        code="not_ready",
    )


def endpoint_not_served(model: str, path: str) -> ErrorResponse:
    """No target of the model's route serves this endpoint (like OpenAI's answer for a
    model used on the wrong endpoint)."""
    return _error(
        404,
        f"The model '{model[:200]}' is not served on {path[:100]}: no target of its route serves this endpoint.",
        "invalid_request_error",
        param="model",
        code="endpoint_not_supported",
    )


def previous_response_unavailable(response_id: str, why: str) -> ErrorResponse:
    """A Responses API continuation whose creating key cannot be used (``sidecar.affinity``)."""
    return _error(
        409,
        f"Response '{response_id[:100]}' can only be continued with the provider key that created it, and {why}. "
        "Retry later, or start a new conversation without previous_response_id.",
        "invalid_request_error",
        param="previous_response_id",
        code="previous_response_unavailable",
    )


def response_not_found(response_id: str) -> ErrorResponse:
    """A stored response's call naming an id no key of this sidecar made (OpenAI's 404 wording)."""
    return _error(
        404, f"Response with id '{response_id[:100]}' not found.", "invalid_request_error", code="response_not_found"
    )


def response_unavailable(response_id: str, why: str) -> ErrorResponse:
    """A stored response's call whose creating key cannot be used now (``sidecar.affinity``)."""
    return _error(
        409,
        f"Response '{response_id[:100]}' is held by the provider key that created it, and {why}. Retry later.",
        "invalid_request_error",
        code="response_unavailable",
    )
