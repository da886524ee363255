"""Errors raised by the store and services; the gRPC layer maps them to codes."""

from __future__ import annotations

__all__ = [
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "InvalidArgument",
    "KeyplaneError",
    "NotFound",
    "Unavailable",
]


class KeyplaneError(Exception):
    """Base class. The message must never contain a secret."""


class NotFound(KeyplaneError):
    """The named object does not exist (gRPC NOT_FOUND)."""


class AlreadyExists(KeyplaneError):
    """A unique name is taken (gRPC ALREADY_EXISTS)."""


class InvalidArgument(KeyplaneError):
    """The request is malformed (gRPC INVALID_ARGUMENT)."""


class Unavailable(KeyplaneError):
    """The store cannot be reached (gRPC UNAVAILABLE)."""


class Aborted(KeyplaneError):
    """A write's precondition failed: the object changed since the caller read
    it (stale etag). The caller should read it again and retry (gRPC ABORTED)."""


class FailedPrecondition(KeyplaneError):
    """The system is not in the state the call needs, e.g. a replica that has
    not yet picked up a new master key (gRPC FAILED_PRECONDITION)."""
