"""A fake Anthropic Messages API (a real aiohttp server on 127.0.0.1).

``POST /v1/messages`` (a Message, or with ``stream: true`` the typed SSE
events: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta, message_stop) and ``POST
/v1/messages/count_tokens`` (``{"input_tokens": n}``), in the shapes of
Anthropic's API as anthropic-sdk-python parses them. It wants ``x-api-key``
(401 ``authentication_error`` without) and ``anthropic-version`` (400
without), and can be programmed per key, like ``FakeUpstream``, with
Anthropic's real error bodies and headers (below), or to send an ``error``
event in the middle of a stream (``stream_error_after``) or cut it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from .upstream import FakeUpstream, RecordedRequest, Reply, _json

__all__ = [
    "ANTHROPIC_CREDIT_TOO_LOW",
    "ANTHROPIC_INVALID_KEY",
    "ANTHROPIC_OVERLOADED",
    "ANTHROPIC_PERMISSION",
    "ANTHROPIC_RATE_LIMITED",
    "FakeAnthropic",
    "anthropic_error",
]


def anthropic_error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


ANTHROPIC_OVERLOADED = Reply(529, anthropic_error("overloaded_error", "Overloaded"))
ANTHROPIC_INVALID_KEY = Reply(401, anthropic_error("authentication_error", "invalid x-api-key"))
ANTHROPIC_PERMISSION = Reply(
    403, anthropic_error("permission_error", "Your API key does not have permission to use the specified resource.")
)
ANTHROPIC_CREDIT_TOO_LOW = Reply(
    400,
    anthropic_error(
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
        "purchase credits.",
    ),
)
ANTHROPIC_RATE_LIMITED = Reply(
    429,
    anthropic_error(
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (a1b2c3) of 50 requests per minute. "
        "For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for "
        "current usage. Please reduce the prompt length or the maximum tokens requested, or try again later.",
    ),
    {
        "retry-after": "17",
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:17Z",
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-remaining": "29000",
        "x-should-retry": "true",
    },
)
_VERSION_REQUIRED = anthropic_error("invalid_request_error", "anthropic-version: header is required")
_KEY_REQUIRED = anthropic_error("authentication_error", "x-api-key header is required")
_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class FakeAnthropic(FakeUpstream):
    """``async with FakeAnthropic() as up:``; anthropic keys point at ``up.base_url``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # When set, a stream sends an ``error`` event (overloaded) after this many text deltas.
        self.stream_error_after: int | None = None

    async def __aenter__(self) -> FakeAnthropic:
        await super().__aenter__()
        return self

    def messages_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/messages"]

    def api_keys(self, since: int = 0) -> list[str | None]:
        """The ``x-api-key`` of every Messages API request from index ``since`` on."""
        return [r.headers.get("x-api-key") for r in self.requests[since:] if r.path in _PATHS]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.path, headers, body, time.monotonic()))
        if request.method != "POST" or request.path not in _PATHS:
            return _json(404, anthropic_error("not_found_error", "Not Found"))
        api_key = headers.get("x-api-key")
        if not api_key:
            return _json(401, _KEY_REQUIRED)
        if "anthropic-version" not in headers:
            return _json(400, _VERSION_REQUIRED)
        model = body.get("model") if isinstance(body, dict) else None
        canned = self._reply_for(api_key, model if isinstance(model, str) else None)
        break_after = self.break_after
        if canned is not None:
            if canned.delay:
                await asyncio.sleep(canned.delay)
            if canned.body is not None:
                return _json(canned.status, canned.body, {"request-id": "req_fake", **canned.headers})
            if canned.break_after is not None:
                break_after = canned.break_after
        if not isinstance(body, dict) or not isinstance(model, str):
            return _json(400, anthropic_error("invalid_request_error", "model: Field required"))
        ok = {"request-id": "req_fake", "anthropic-ratelimit-requests-remaining": "49"}
        if request.path.endswith("/count_tokens"):
            return _json(200, {"input_tokens": 14}, ok)
        if body.get("stream") is True:
            return await self._stream_messages(request, model, break_after, ok)
        return _json(200, self._message(model), ok)

    def _message(self, model: str) -> dict[str, Any]:
        return {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(self.chunks)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 12,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": len(self.chunks),
                "service_tier": "standard",
            },
        }

    async def _stream_messages(
        self, request: web.Request, model: str, break_after: int | None, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", **headers},
        )
        await response.prepare(request)
        start = self._message(model) | {"content": [], "stop_reason": None}
        start["usage"] = start["usage"] | {"output_tokens": 1}
        try:
            await response.write(_event("message_start", {"type": "message_start", "message": start}))
            block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
            await response.write(_event("content_block_start", block))
            await response.write(_event("ping", {"type": "ping"}))
            for index, text in enumerate(self.chunks):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
                await response.write(_event("content_block_delta", delta))
                if self.stream_error_after is not None and index + 1 >= self.stream_error_after:
                    await response.write(_event("error", anthropic_error("overloaded_error", "Overloaded")))
                    await response.write_eof()
                    return response
                if break_after is not None and index + 1 >= break_after:
                    assert request.transport is not None
                    request.transport.abort()
                    self.stream_aborted.set()
                    return response
                if index == 0:
                    self.first_chunk_sent.set()
                    if self.stream_gate is not None:
                        await self.stream_gate.wait()
            await response.write(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            end = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(self.chunks)},
            }
            await response.write(_event("message_delta", end))
            await response.write(_event("message_stop", {"type": "message_stop"}))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_aborted.set()
            raise
        self.stream_finished.set()
        return response
