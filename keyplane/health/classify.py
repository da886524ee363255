"""Classify one upstream attempt into the DESIGN.md error classes.

Pure: no I/O, no clock of its own (``now`` is wall-clock epoch seconds passed in).
Reasons are built from fixed labels and short identifier-like codes only, never from
free-form upstream text, because providers echo parts of the key back
("Incorrect API key provided: sk-abc***...wxyz").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from keyplane.health._body import ScannedBody, scan_body
from keyplane.health._retry_after import MAX_RETRY_AFTER, parse_duration, parse_retry_after
from keyplane.health.exhaustion import EXHAUSTION_MARKERS, provider_reason

__all__ = [
    "NODE_FAILURES",
    "Classification",
    "ErrorClass",
    "ExceptionKind",
    "classify_exception",
    "classify_response",
    "counts_against_key",
    "parse_retry_after",
    "stream_broken",
]


class ErrorClass(enum.StrEnum):
    SUCCESS = "success"
    CREDENTIAL = "credential"
    RATE_LIMITED = "rate_limited"
    UPSTREAM_ERROR = "upstream_error"
    CLIENT_ERROR = "client_error"
    STREAM_BROKEN = "stream_broken"
    EXHAUSTED = "exhausted"  # out of credits or quota: the key, for every model, for a long while


# What a self-hosted node's failure looks like (connect errors, timeouts, 5xx, cut
# streams): it belongs to that node, whose health demotes it, not to the key the
# request carried (which the pool's other nodes accept).
NODE_FAILURES = frozenset({ErrorClass.UPSTREAM_ERROR, ErrorClass.STREAM_BROKEN})


def counts_against_key(error_class: ErrorClass, *, on_node: bool) -> bool:
    """Whether an attempt's class goes into its key's health: everything does, but a
    node's own failure when the attempt went to a node of a pool."""
    return not (on_node and error_class in NODE_FAILURES)


_RETRY_SAME_PROVIDER = frozenset(
    {ErrorClass.CREDENTIAL, ErrorClass.RATE_LIMITED, ErrorClass.UPSTREAM_ERROR, ErrorClass.EXHAUSTED}
)
_HARMLESS = frozenset({ErrorClass.SUCCESS, ErrorClass.CLIENT_ERROR})


@dataclass(frozen=True, slots=True)
class Classification:
    error_class: ErrorClass
    status: int  # HTTP status, 0 when no response arrived
    reason: str  # short and secret-free, e.g. "401 invalid_api_key"
    retry_after: float | None = None  # seconds from now, when the upstream said so

    @property
    def retry_same_provider(self) -> bool:
        """Another key of the same provider may succeed where this one failed."""
        return self.error_class in _RETRY_SAME_PROVIDER

    @property
    def penalises(self) -> bool:
        """The attempt counts against some key or provider health."""
        return self.error_class not in _HARMLESS


# Markers are matched case-insensitively against the JSON error fields and the raw
# body text. Each maps to the label used in the reason.
_CREDENTIAL_MARKERS: tuple[tuple[str, str], ...] = (
    # OpenAI (and OpenAI-compatible servers).
    ("invalid_api_key", "invalid_api_key"),
    ("incorrect api key provided", "invalid_api_key"),
    ("you didn't provide an api key", "missing api key"),
    # Gemini: 400 INVALID_ARGUMENT with ErrorInfo reason API_KEY_INVALID.
    ("api_key_invalid", "API key not valid"),
    ("api key not valid", "API key not valid"),
    ("api key expired", "API key expired"),
    ("api key not found", "API key not found"),
    # Anthropic.
    ("authentication_error", "authentication_error"),
    ("invalid x-api-key", "authentication_error"),
    # Azure OpenAI.
    ("invalid subscription key", "invalid subscription key"),
    # OpenRouter.
    ("no auth credentials found", "no auth credentials"),
    ("user not found.", "user not found"),
    # Generic phrasings of several OpenAI-compatible servers.
    ("invalid api key", "invalid api key"),
    ("invalid_authentication", "invalid authentication"),
)

# Gemini's RESOURCE_EXHAUSTED is mostly a per-minute (or per-day) quota with a RetryInfo
# delay: a rate limit whatever the status, never a reason to bench the key for an hour.
# Out of credits or quota (keyplane.health.exhaustion.EXHAUSTION_MARKERS, any 4xx, and
# every 402) is EXHAUSTED instead: the key, for every model, until a recovery probe.
_QUOTA_MARKERS: tuple[tuple[str, str], ...] = (("resource_exhausted", "RESOURCE_EXHAUSTED"),)


def _marker(scanned: ScannedBody, markers: tuple[tuple[str, str], ...]) -> str | None:
    for needle, label in markers:
        if needle in scanned.haystack:
            return label
    return None


def _wait(headers: Mapping[str, str], scanned: ScannedBody, now: float) -> float | None:
    """Headers first; else Gemini's RetryInfo.retryDelay from the body (Gemini sends no Retry-After)."""
    wait = parse_retry_after(headers, now=now)
    if wait is None and scanned.retry_delay is not None:
        delay = parse_duration(scanned.retry_delay)
        if delay is not None:
            wait = min(max(delay, 0.0), MAX_RETRY_AFTER)
    return wait


def classify_response(status: int, headers: Mapping[str, str], body: bytes, *, now: float) -> Classification:
    """Classify an upstream HTTP response (status, headers, body as received)."""
    if 200 <= status < 300:
        return Classification(ErrorClass.SUCCESS, status, f"{status} ok")
    if status == 529:  # Anthropic overloaded_error
        return Classification(ErrorClass.UPSTREAM_ERROR, status, "529 overloaded", parse_retry_after(headers, now=now))
    if status >= 500:
        return Classification(
            ErrorClass.UPSTREAM_ERROR, status, f"{status} upstream error", parse_retry_after(headers, now=now)
        )
    if status < 400 or status > 599:
        # 1xx/3xx (or nonsense) from an API endpoint: the upstream misbehaved, not the request.
        return Classification(ErrorClass.UPSTREAM_ERROR, status, f"{status} unexpected status")

    scanned = scan_body(body)
    if status == 429:
        exhausted = _marker(scanned, EXHAUSTION_MARKERS)
        if exhausted is not None:
            return _exhausted(status, exhausted, scanned, headers, now)
        quota = _marker(scanned, _QUOTA_MARKERS)
        label = quota if quota is not None and quota != "RESOURCE_EXHAUSTED" else "rate limited"
        return Classification(ErrorClass.RATE_LIMITED, status, f"429 {label}", _wait(headers, scanned, now))

    credential = _marker(scanned, _CREDENTIAL_MARKERS)
    if credential is None and "401" in scanned.codes:  # Azure: {"error": {"code": "401", ...}}
        credential = "unauthorized"
    if credential is not None:
        return Classification(ErrorClass.CREDENTIAL, status, f"{status} {credential}")
    if status == 401:
        return Classification(ErrorClass.CREDENTIAL, status, f"401 {scanned.code or 'unauthorized'}")
    exhausted = _marker(scanned, EXHAUSTION_MARKERS)
    if exhausted is None and status == 402:  # Payment Required, whatever the wording
        exhausted = "payment required"
    if exhausted is not None:
        return _exhausted(status, exhausted, scanned, headers, now)
    quota = _marker(scanned, _QUOTA_MARKERS)
    if quota is not None:
        return Classification(ErrorClass.RATE_LIMITED, status, f"{status} {quota}", _wait(headers, scanned, now))
    if status == 403:
        return Classification(ErrorClass.CREDENTIAL, status, f"403 {scanned.code or 'forbidden'}")
    return Classification(ErrorClass.CLIENT_ERROR, status, f"{status} {scanned.code or 'client error'}")


def _exhausted(status: int, label: str, scanned: ScannedBody, headers: Mapping[str, str], now: float) -> Classification:
    """EXHAUSTED, with the provider's own words (cleaned of key material) in the reason."""
    said = provider_reason(scanned.message)
    reason = f"{status} {label}: {said}" if said else f"{status} {label}"
    return Classification(ErrorClass.EXHAUSTED, status, reason, _wait(headers, scanned, now))


# What went wrong when no usable answer came back (the reason each one reports):
# no connection, a failed TLS handshake, a timeout, an answer that is not
# HTTP, a connection closed before the answer was whole, an answer too large.
ExceptionKind = Literal["connect", "tls", "timeout", "malformed", "cut", "too_large"]
_EXCEPTION_REASONS: dict[str, str] = {
    "connect": "connect error",
    "tls": "tls error",
    "timeout": "timeout",
    "malformed": "malformed answer",
    "cut": "answer cut off",
    "too_large": "answer too large",
}


def classify_exception(kind: ExceptionKind) -> Classification:
    """No usable response (nothing was sent to the app yet): always an upstream error."""
    return Classification(ErrorClass.UPSTREAM_ERROR, 0, _EXCEPTION_REASONS[kind])


def stream_broken(reason: str = "stream broken") -> Classification:
    """A failure after the first byte was already sent to the app."""
    return Classification(ErrorClass.STREAM_BROKEN, 0, reason)
