"""ASGI types and the few answer helpers the sidecar's modules share."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from . import errors

__all__ = ["JSON", "Message", "Receive", "Scope", "Send", "send_bytes", "send_error", "send_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> int:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


async def send_error(send: Send, error: errors.ErrorResponse, extra: Iterable[tuple[bytes, bytes]] = ()) -> int:
    if error.headers:
        extra = (*error.headers, *extra)
    return await send_bytes(send, error.status, error.body, extra=extra)


async def send_json(send: Send, status: int, payload: object) -> int:
    return await send_bytes(send, status, json.dumps(payload, separators=(",", ":")).encode())
