"""Readable times for logs: ISO-8601 UTC, with how far away they are.

``until_text(until, now)`` -> ``2026-01-02T03:04:05.678Z (in 12.3s)``, the
form the sidecar and the control plane log cooldown ends in (never bare epoch
seconds).
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso_utc", "until_text"]


def iso_utc(epoch: float) -> str:
    """Epoch seconds as ISO-8601 UTC with milliseconds and a ``Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def until_text(until: float, now: float) -> str:
    """``<ISO-8601 UTC> (in 12.3s)``, or ``(ended 1.2s ago)`` when it is past."""
    left = until - now
    when = f"in {left:.1f}s" if left >= 0 else f"ended {-left:.1f}s ago"
    return f"{iso_utc(until)} ({when})"
