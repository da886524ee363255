"""Exceptions -> gRPC status, in one place for every servicer.

Known errors keep their message (they never contain a secret); store
connection errors become UNAVAILABLE; anything else is logged server-side
and answered with INTERNAL and a generic message.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import asyncpg
import grpc
from grpc import aio

from control_plane.auth import PermissionDenied
from keyplane.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable

__all__ = ["map_errors", "status_for"]

log = logging.getLogger(__name__)

_STORE_DOWN = "the store is unavailable; try again later"
_INTERNAL = "internal error; see the control plane's log"
_STORE_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection whose backend was killed
    ConnectionError,
    TimeoutError,
    OSError,
)

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for a known error, or None for an unexpected one."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AlreadyExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, Aborted):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or _STORE_DOWN
    if isinstance(exc, _STORE_CONNECTION_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, _STORE_DOWN
    return None


def map_errors(method: _F) -> _F:
    """Decorate an async unary servicer method ``(self, request, context)``."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            mapped = status_for(exc)
            if mapped is None:
                # The traceback names code and types, never request values.
                log.exception("%s failed with %s", method.__name__, type(exc).__name__)
                await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)
            elif mapped[0] is grpc.StatusCode.UNAVAILABLE:
                log.warning("%s: store unavailable (%s)", method.__name__, type(exc).__name__)
            await context.abort(*mapped)

    return cast(_F, wrapper)
