"""What both sides of the watch stream agree on when a control plane shuts down.

A replica that shuts down (``ControlPlane.stop``) ends each Watch stream with
UNAVAILABLE and the ``GOING_AWAY`` trailing metadata, after its listener has
closed and its connections got HTTP/2 GOAWAY; a sidecar that sees it
reconnects at once, without backoff, and the new stream lands on another
replica (``sidecar.watch``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["GOING_AWAY", "GOING_AWAY_DETAILS", "GOING_AWAY_KEY", "is_going_away"]

GOING_AWAY_KEY = "keyplane-going-away"
GOING_AWAY: tuple[tuple[str, str], ...] = ((GOING_AWAY_KEY, "reconnect"),)
GOING_AWAY_DETAILS = "the control plane replica is shutting down: reconnect to another replica"


def is_going_away(trailing_metadata: Iterable[Any] | None) -> bool:
    """Whether a stream's trailing metadata (``(key, value)`` pairs) carries ``GOING_AWAY``."""
    return any(item[0] == GOING_AWAY_KEY for item in trailing_metadata or ())
