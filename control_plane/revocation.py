"""Streams that end when the managed token that opened them is revoked.

The ``AuthInterceptor`` wraps the streaming sidecar handlers (Watch,
ReportOutcomes) of a call authenticated by a managed sidecar token: when the
token registry learns of the revocation, a Watch stream stops waiting for its
next message and a ReportOutcomes stream stops reading reports (a batch
being folded is finished first); either call then ends with UNAUTHENTICATED.
Bootstrap tokens (token file, env) cannot be revoked and are not wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from control_plane.token_registry import TokenRegistry

__all__ = ["REVOKED_DETAILS", "end_on_revocation"]

REVOKED_DETAILS = "the sidecar token was revoked"

Context = aio.ServicerContext[Any, Any]


class _Revoked:
    """An event set when the token is revoked; ``close()`` stops listening."""

    def __init__(self, registry: TokenRegistry, token_id: str) -> None:
        self.event = asyncio.Event()
        self._cancel: Callable[[], None] = registry.on_revoke(token_id, self.event.set)

    def close(self) -> None:
        self._cancel()


async def _next_or_revoked(iterator: AsyncIterator[Any], revoked: asyncio.Event) -> tuple[bool, Any]:
    """(True, item) for the iterator's next item, (False, None) when it ended
    or the token was revoked first (the pending read is then cancelled)."""
    step: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
    step.add_done_callback(_retrieve)  # also when the caller is cancelled meanwhile
    waiter = asyncio.ensure_future(revoked.wait())
    try:
        await asyncio.wait((step, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
    if step.cancelled():
        return False, None
    try:
        return True, step.result()
    except StopAsyncIteration:
        return False, None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _guard_unary_stream(inner: Callable[..., AsyncGenerator[Any, None]], registry: TokenRegistry, token_id: str) -> Any:
    async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
        revoked = _Revoked(registry, token_id)
        stream = inner(request, context)
        try:
            while True:
                ok, item = await _next_or_revoked(stream, revoked.event)
                if not ok:
                    break
                yield item
        finally:
            revoked.close()
            await stream.aclose()  # runs the handler's own clean-up
        if revoked.event.is_set():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)

    return guarded


def _guard_stream_unary(inner: Callable[..., Any], registry: TokenRegistry, token_id: str) -> Any:
    async def guarded(request_iterator: AsyncIterator[Any], context: Context) -> Any:
        revoked = _Revoked(registry, token_id)

        async def requests() -> AsyncIterator[Any]:
            while True:
                ok, item = await _next_or_revoked(request_iterator, revoked.event)
                if not ok:
                    return
                yield item

        try:
            response = await inner(requests(), context)
        finally:
            revoked.close()
        if revoked.event.is_set():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
        return response

    return guarded


def end_on_revocation(
    handler: grpc.RpcMethodHandler[Any, Any], registry: TokenRegistry, token_id: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, ending with UNAUTHENTICATED once ``token_id`` is revoked
    (unary calls are short and left as they are)."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and not handler.response_streaming and handler.stream_unary is not None:
        guarded = _guard_stream_unary(handler.stream_unary, registry, token_id)
        return grpc.stream_unary_rpc_method_handler(guarded, des, ser)
    if (
        handler.response_streaming
        and not handler.request_streaming
        and handler.unary_stream is not None
        and inspect.isasyncgenfunction(handler.unary_stream)
    ):
        guarded = _guard_unary_stream(handler.unary_stream, registry, token_id)
        return grpc.unary_stream_rpc_method_handler(guarded, des, ser)
    return handler
