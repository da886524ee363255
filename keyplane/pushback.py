"""How the control plane tells a client to come back later (retry pushback).

When the control plane sheds load (too many watch streams opening at once),
it ends the call with ``UNAVAILABLE`` and this trailing metadata entry: the
milliseconds the client should wait before it tries again. A client that
finds it waits that long instead of its own backoff (never more than
``MAX_DELAY``, whatever a server says). gRPC's own ``grpc-retry-pushback-ms``
is reserved for its built-in retries, so keyplane names its own entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_DELAY", "RETRY_DELAY_KEY", "decode_retry_delay", "encode_retry_delay"]

RETRY_DELAY_KEY = "keyplane-retry-delay-ms"
MAX_DELAY = 60.0


def encode_retry_delay(seconds: float) -> tuple[tuple[str, str], ...]:
    """The trailing metadata asking for a wait of ``seconds``."""
    return ((RETRY_DELAY_KEY, str(max(0, round(seconds * 1000)))),)


def decode_retry_delay(metadata: Iterable[Any] | None) -> float | None:
    """The wait (seconds, at most ``MAX_DELAY``) asked for in ``metadata``; None if none or malformed."""
    if metadata is None:
        return None
    for entry in metadata:
        key, value = entry[0], entry[1]
        if key != RETRY_DELAY_KEY:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        try:
            millis = int(text.strip())
        except ValueError:
            return None
        if millis < 0:
            return None
        return min(MAX_DELAY, millis / 1000.0)
    return None
