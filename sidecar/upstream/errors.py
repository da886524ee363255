"""What can go wrong with an upstream call, as the attempt loop sees it.

``kind`` is what ``keyplane.health.classify_exception`` classifies, ``label``
the metrics label; messages name the origin at most, never a header.
"""

from __future__ import annotations

from typing import ClassVar

from keyplane.health.classify import ExceptionKind

__all__ = [
    "UpstreamAnswerCut",
    "UpstreamConfigError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamMalformed",
    "UpstreamTimeout",
    "UpstreamTlsError",
    "UpstreamTooLarge",
]


class UpstreamConfigError(Exception):
    """The attempt cannot be sent: its key or target lacks a usable base URL."""


class UpstreamError(Exception):
    """No usable answer from the upstream. ``kind`` is what went wrong for
    ``keyplane.health.classify_exception``, ``label`` the metrics label.
    Messages name the origin at most, never a header: requests carry secrets."""

    kind: ClassVar[ExceptionKind] = "cut"
    label: ClassVar[str] = "cut"


class UpstreamConnectError(UpstreamError):
    """No connection: refused, unreachable, DNS, a proxy that refused the tunnel."""

    kind = "connect"
    label = "connect_error"


class UpstreamTlsError(UpstreamError):
    """The TLS handshake failed: an untrusted certificate, a hostname mismatch."""

    kind = "tls"
    label = "tls_error"


class UpstreamTimeout(UpstreamError):
    """Connecting, the first byte, a silence between two bytes, or the deadline."""

    kind = "timeout"
    label = "timeout"


class UpstreamMalformed(UpstreamError):
    """The answer is not HTTP/1.1 as it must be (or its head is over the limits)."""

    kind = "malformed"
    label = "malformed"


class UpstreamAnswerCut(UpstreamError):
    """The connection closed before the answer was complete (or before it began)."""

    kind = "cut"
    label = "cut"


class UpstreamTooLarge(UpstreamError):
    """A non-streamed answer over the body limit."""

    kind = "too_large"
    label = "too_large"
