"""Request bytes that do not parse as the method's request message are
INVALID_ARGUMENT, not grpc.aio's UNKNOWN ("Unexpected DecodeError") with a
traceback in the log.

grpc.aio runs a method's ``request_deserializer`` before (unary requests) or
while (streamed requests) the handler runs, and turns a parse error into
UNKNOWN. ``DecodeGuardInterceptor`` wraps the deserializer of keyplane's
services so it returns an ``Undecodable`` marker instead of raising, and the
handler so it aborts with INVALID_ARGUMENT when it meets one: at once for a
unary request, when the handler reaches it for a streamed one (what came
before it in the stream has been handled). Install it after (inside) the
``AuthInterceptor``, so an unauthenticated caller is still told that first.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from control_plane.auth import ADMIN_SERVICE_PREFIX, SIDECAR_SERVICE_PREFIX

__all__ = ["DecodeGuardInterceptor", "Undecodable", "guard_handler"]

log = logging.getLogger(__name__)

_GUARDED_PREFIXES = (ADMIN_SERVICE_PREFIX, SIDECAR_SERVICE_PREFIX)


class Undecodable:
    """Stands in for a request message that failed to parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "the request message"


def _guarded_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything else the parser raises
            return Undecodable(type(exc).__name__)

    return deserialize


async def _reject(context: aio.ServicerContext[Any, Any], method: str, message: str, bad: Undecodable) -> None:
    log.info("%s: undecodable request message (%s)", method, bad.error)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message} message")


def guard_handler(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with a deserializer that never raises and a behaviour that
    rejects what it could not parse. Unchanged if its shape is not one this
    wraps: no deserializer, a synchronous behaviour, or streams both ways."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    message = _message_name(deserializer)
    request_des = _guarded_deserializer(deserializer)
    response_ser = handler.response_serializer

    if not handler.request_streaming:
        if not handler.response_streaming:
            unary_unary = handler.unary_unary
            if not inspect.iscoroutinefunction(unary_unary):
                return handler

            async def unary_unary_guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await _reject(context, method, message, request)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary_guarded, request_des, response_ser)

        unary_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(unary_stream):
            return handler

        async def unary_stream_guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _reject(context, method, message, request)
            responses = unary_stream(request, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(unary_stream_guarded, request_des, response_ser)

    stream_unary = handler.stream_unary
    if handler.response_streaming or not inspect.iscoroutinefunction(stream_unary):
        return handler

    async def checked(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _reject(context, method, message, request)
            yield request

    async def stream_unary_guarded(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
        return await stream_unary(checked(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(stream_unary_guarded, request_des, response_ser)


class DecodeGuardInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Guards the methods of keyplane's own services (see the module doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_GUARDED_PREFIXES):
            return handler
        return guard_handler(handler, method)
