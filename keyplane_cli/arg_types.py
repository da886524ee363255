"""argparse ``type=`` checkers shared by every flag module: a bad value is a
usage error naming the flag, never a traceback or a silently odd setting."""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_seconds", "positive_count", "positive_number", "positive_seconds"]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_seconds(text: str) -> float:
    """Seconds > 0."""
    value = _number(text, "a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """Seconds >= 0 (0: not at all)."""
    value = _number(text, "a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number of seconds, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A number > 0 (a rate, a ratio)."""
    value = _number(text, "a number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def positive_count(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value
