"""The sidecar's HTTP face: a raw ASGI app speaking the OpenAI API.

POST /v1/chat/completions, GET /v1/models[/{id}], GET /healthz, GET /metrics.
Every answer to a request is served from ``SidecarState`` (no network hop
besides the upstream call); errors have the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from typing import Any, TypeVar

import aiohttp

from . import errors
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import SidecarMetrics, status_class
from .proxy import AttemptsFailed, UpstreamReply, run_attempts
from .router import Attempt, Balancer, plan_attempts
from .state import SidecarState
from .upstream import UpstreamClient

__all__ = ["Message", "Receive", "Scope", "Send", "SidecarApp"]

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_T = TypeVar("_T")

_JSON = b"application/json"
ATTEMPTS_HEADER = b"x-keyplane-attempts"
# Upstream response headers the app may see (besides the status and body).
_PASSED_RESPONSE_HEADERS = frozenset(
    {"content-type", "retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms", "cache-control"}
)
_PASSED_RESPONSE_PREFIXES = ("x-ratelimit-",)


class _ClientGone(Exception):
    """The app disconnected while its request body was being read."""


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def _upstream_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in response.headers.items():
        lower = name.lower()
        if lower in _PASSED_RESPONSE_HEADERS or lower.startswith(_PASSED_RESPONSE_PREFIXES):
            out.append((lower.encode("latin-1"), value.encode("latin-1")))
    return out


async def _send_bytes(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = _JSON,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> int:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


async def _send_error(send: Send, error: errors.ErrorResponse, extra: Iterable[tuple[bytes, bytes]] = ()) -> int:
    return await _send_bytes(send, error.status, error.body, extra=extra)


async def _send_json(send: Send, status: int, payload: object) -> int:
    return await _send_bytes(send, status, json.dumps(payload, separators=(",", ":")).encode())


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, _T]) -> tuple[bool, _T | None]:
    """Run ``work`` but cancel it if the app hangs up; returns (finished, result)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False, None
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


class SidecarApp:
    """ASGI application; every dependency is handed in."""

    def __init__(
        self,
        state: SidecarState,
        upstream: UpstreamClient,
        *,
        metrics: SidecarMetrics | None = None,
        balancer: Balancer | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
        max_attempts: int = 8,
        stale_after: float = 300.0,
    ) -> None:
        self.state = state
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else SidecarMetrics(state)
        self.balancer = balancer if balancer is not None else Balancer()
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.stale_after = stale_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if len(path) > 1:
            path = path.rstrip("/")
        method: str = scope["method"]
        endpoint = "other"
        status = 500
        try:
            if path == "/v1/chat/completions":
                endpoint = "chat_completions"
                if method != "POST":
                    status = await _send_error(send, errors.method_not_allowed(method, path))
                else:
                    status = await self._chat(scope, receive, send)
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                endpoint = "models"
                if method != "GET":
                    status = await _send_error(send, errors.method_not_allowed(method, path))
                else:
                    status = await self._models(scope, send, path[len("/v1/models/") :] or None)
            elif path == "/healthz":
                endpoint = "healthz"
                status = await self._healthz(send)
            elif path == "/metrics":
                endpoint = "metrics"
                status = await _send_bytes(send, 200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE.encode())
            else:
                status = await _send_error(send, errors.not_found(path))
        finally:
            self.metrics.requests.labels(endpoint, status_class(status)).inc()

    # --- endpoints ----------------------------------------------------------------------

    def _authenticate(self, headers: dict[str, str]) -> str | errors.ErrorResponse:
        if not self.state.is_ready:
            return errors.not_ready()
        token = _bearer(headers)
        if not token:
            return errors.missing_api_key()
        tenant = self.state.authenticate(token)
        if tenant is None:
            return errors.invalid_api_key()
        return tenant

    async def _models(self, scope: Scope, send: Send, model_id: str | None) -> int:
        tenant = self._authenticate(_headers(scope))
        if isinstance(tenant, errors.ErrorResponse):
            return await _send_error(send, tenant)
        models = self.state.models(tenant)
        if model_id is None:
            data = [_model_entry(m) for m in models]
            return await _send_json(send, 200, {"object": "list", "data": data})
        if self.state.route(tenant, model_id) is None:
            return await _send_error(send, errors.model_not_found(model_id))
        return await _send_json(send, 200, _model_entry(model_id))

    async def _healthz(self, send: Send) -> int:
        state = self.state
        if not state.is_ready:
            return await _send_json(
                send,
                503,
                {"status": "unavailable", "reason": "no snapshot from the control plane yet", "version": 0},
            )
        age = state.age()
        if age is not None and age > self.stale_after:
            return await _send_json(
                send,
                503,
                {
                    "status": "stale",
                    "reason": f"no contact with the control plane for {int(age)}s",
                    "version": state.version,
                },
            )
        return await _send_json(send, 200, {"status": "ok", "version": state.version})

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        """The request body, or None when it exceeds the cap."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> int:
        headers = _headers(scope)
        tenant = self._authenticate(headers)
        if isinstance(tenant, errors.ErrorResponse):
            return await _send_error(send, tenant)
        try:
            raw = await self._read_body(headers, receive)
        except _ClientGone:
            self.metrics.client_disconnects.inc()
            return 499
        if raw is None:
            return await _send_error(send, errors.body_too_large(self.max_body_bytes))
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return await _send_error(send, errors.invalid_request("We could not parse the JSON body of your request."))
        if not isinstance(payload, dict):
            return await _send_error(send, errors.invalid_request("The request body must be a JSON object."))
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return await _send_error(send, errors.invalid_request("you must provide a model parameter", param="model"))
        route = self.state.route(tenant, model)
        if route is None:
            return await _send_error(send, errors.model_not_found(model))
        plan = plan_attempts(
            tenant,
            route,
            lambda t: self.state.keys(tenant, t.provider, t.upstream_model),
            self.balancer,
            limit=self.max_attempts,
        )
        if not plan:
            return await _send_error(send, errors.no_usable_key(model))
        stream = payload.get("stream") is True
        encoded: dict[str, bytes] = {}

        def body_for(upstream_model: str) -> bytes:
            body = encoded.get(upstream_model)
            if body is None:
                payload["model"] = upstream_model
                body = encoded[upstream_model] = json.dumps(payload, separators=(",", ":")).encode()
            return body

        finished, status = await _unless_disconnected(receive, self._proxy(plan, body_for, headers, stream, send))
        if not finished or status is None:
            self.metrics.client_disconnects.inc()
            return 499
        return status

    async def _proxy(
        self,
        plan: list[Attempt],
        body_for: Callable[[str], bytes],
        headers: dict[str, str],
        stream: bool,
        send: Send,
    ) -> int:
        result = await run_attempts(
            self.upstream, plan, body_for, headers, stream=stream, on_attempt=self._record_attempt
        )
        if isinstance(result, AttemptsFailed):
            return await _send_error(send, result.error, [(ATTEMPTS_HEADER, str(result.attempts).encode())])
        try:
            return await self._relay(result, send)
        finally:
            if result.response.content.at_eof():
                result.response.release()
            else:
                result.response.close()

    async def _relay(self, reply: UpstreamReply, send: Send) -> int:
        response = reply.response
        extra = [*_upstream_headers(response), (ATTEMPTS_HEADER, str(reply.attempts).encode())]
        if not reply.streaming:
            headers = [(b"content-length", str(len(reply.head)).encode()), *extra]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.head, "more_body": False})
            return response.status
        await send({"type": "http.response.start", "status": response.status, "headers": extra})
        if reply.head:
            await send({"type": "http.response.body", "body": reply.head, "more_body": True})
        try:
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, aiohttp.ClientError) as exc:
            provider = reply.attempt.target.provider.value
            _log.warning("stream from %s broke after the first byte: %s", provider, type(exc).__name__)
            self.metrics.stream_errors.labels(provider).inc()
            if response.content_type == "text/event-stream":
                # Like OpenAI mid-stream: an error event, so the app knows the answer is cut
                # (the blank lines first terminate any event the upstream left half-sent).
                error = errors.error_body("The upstream stream broke off.", "upstream_error", code="stream_broken")
                await send({"type": "http.response.body", "body": b"\n\ndata: " + error + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return response.status

    def _record_attempt(self, attempt: Attempt, outcome: str, fell_back: bool) -> None:
        provider = attempt.target.provider.value
        self.metrics.upstream_attempts.labels(provider, outcome).inc()
        if fell_back:
            self.metrics.fallbacks.labels(provider).inc()


def _model_entry(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "keyplane"}
