"""Parse how long an upstream asked us to wait (pure; ``now`` is passed in)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

__all__ = ["MAX_RETRY_AFTER", "parse_duration", "parse_retry_after"]

MAX_RETRY_AFTER = 3600.0

# OpenAI: x-ratelimit-reset-requests / -tokens, Go duration strings ("1s", "6m0s", "20ms", "1h2m3.5s").
_OPENAI_RESET = ("requests", "tokens")
# Anthropic: RFC 3339 timestamps at which the limit is replenished.
_ANTHROPIC_RESET = ("requests", "tokens", "input-tokens", "output-tokens")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for dicts and CIMultiDict alike."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    return value.strip() if isinstance(value, str) else None


def _seconds(text: str) -> float | None:
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("6m0s", "20ms", "1h2m3.5s") or a bare number of seconds."""
    text = text.strip()
    plain = _seconds(text)
    if plain is not None:
        return plain
    if not text:
        return None
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not math.isfinite(total):
        return None
    return total


def _http_date(text: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return when.timestamp() - now


def _rfc3339(text: str, now: float) -> float | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - now


def _clamp(value: float) -> float:
    return min(max(value, 0.0), MAX_RETRY_AFTER)


def parse_retry_after(headers: Mapping[str, str], *, now: float) -> float | None:
    """Seconds to wait, from the headers of a 429 (or 503), clamped to [0, 3600].

    ``retry-after-ms`` and then ``Retry-After`` (delta seconds or HTTP-date) win when
    valid; otherwise the largest of the OpenAI and Anthropic reset headers, restricted
    to the limits whose ``*-remaining`` header is 0 when any is (the reset of a limit
    with room left is not what we wait for). Garbage, missing or unparseable values
    give None.
    """
    raw = _header(headers, "retry-after-ms")
    if raw is not None:
        ms = _seconds(raw)
        if ms is not None:
            return _clamp(ms / 1000.0)
    raw = _header(headers, "retry-after")
    if raw is not None:
        value = _seconds(raw)
        if value is None:
            value = _http_date(raw, now)
        if value is not None:
            return _clamp(value)
    # (seconds, exhausted): a limit whose matching "remaining" header says 0 is the one that bit.
    candidates: list[tuple[float, bool]] = []
    for limit in _OPENAI_RESET:
        raw = _header(headers, f"x-ratelimit-reset-{limit}")
        value = parse_duration(raw) if raw is not None else None
        if value is not None:
            candidates.append((value, _header(headers, f"x-ratelimit-remaining-{limit}") == "0"))
    for limit in _ANTHROPIC_RESET:
        raw = _header(headers, f"anthropic-ratelimit-{limit}-reset")
        value = _rfc3339(raw, now) if raw is not None else None
        if value is not None:
            candidates.append((value, _header(headers, f"anthropic-ratelimit-{limit}-remaining") == "0"))
    if not candidates:
        return None
    exhausted = [seconds for seconds, out in candidates if out]
    return _clamp(max(exhausted or [seconds for seconds, _ in candidates]))
