"""The sidecar's HTTP face: a raw ASGI app speaking the OpenAI API.

POST /v1/chat/completions, GET /v1/models[/{id}], GET /healthz, GET /metrics.
Every answer to a request is served from ``SidecarState`` (no network hop
besides the upstream call); errors have the OpenAI error shape.

A chat completion is planned around the tenant's key and provider health
(unusable keys left out, degraded providers last), run through the attempt
loop (``sidecar.proxy``) under one deadline, and every attempt is recorded in
the local health book at once and queued for the control plane (never
awaited). The answer carries ``x-keyplane-attempts``, ``x-keyplane-provider``,
``x-keyplane-key`` (an id, never a secret), ``x-keyplane-excluded`` and
``x-keyplane-request-id``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from keyplane.health.classify import Classification, ErrorClass, stream_broken
from keyplane.health.machine import Outcome

from . import errors
from .access_log import AccessEntry, AccessLog
from .health import TenantHealth
from .http_client import HttpResponse, UpstreamError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import LabelledChildren, SidecarMetrics, status_class
from .model import Key, Target
from .proxy import (
    AttemptRecord,
    AttemptsFailed,
    UpstreamReply,
    classify_status,
    complete,
    describe,
    excluded_header,
    run_attempts,
)
from .reporter import OutcomeReporter
from .router import Attempt, Balancer, plan_attempts
from .state import SidecarState
from .upstream import FORWARDED_REQUEST_HEADERS, UpstreamClient

__all__ = ["Message", "Receive", "Scope", "Send", "SidecarApp"]

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = b"application/json"
ATTEMPTS_HEADER = b"x-keyplane-attempts"
PROVIDER_HEADER = b"x-keyplane-provider"
KEY_HEADER = b"x-keyplane-key"
EXCLUDED_HEADER = b"x-keyplane-excluded"
REQUEST_ID_HEADER = b"x-keyplane-request-id"
# Upstream response headers the app may see (besides the status and body).
_PASSED_RESPONSE_HEADERS = frozenset(
    {b"content-type", b"retry-after", b"retry-after-ms", b"x-request-id", b"openai-processing-ms", b"cache-control"}
)
_PASSED_RESPONSE_PREFIXES = (b"x-ratelimit-",)

# Request ids: 32 hex characters like a uuid4 hex, but a per-process random
# prefix plus a counter (no os.urandom call and no UUID object per request).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class _ClientGone(Exception):
    """The app disconnected while its request body was being read."""


# The app's request headers the sidecar reads (ASGI gives names in lower case):
# its credential, the declared body size and what is forwarded upstream.
_READ_HEADERS: dict[bytes, str] = {
    name.encode("latin-1"): name for name in ("authorization", "content-length", *FORWARDED_REQUEST_HEADERS)
}


def _headers(scope: Scope) -> dict[str, str]:
    """The headers the sidecar reads, by lower-case name; the rest are never decoded."""
    wanted = _READ_HEADERS
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = wanted.get(name)
        if key is None:
            key = wanted.get(name.lower())
            if key is None:
                continue
        out[key] = value.decode("latin-1")
    return out


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


def _upstream_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers the app may see, as raw bytes (never decoded)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in response.raw_headers:
        lower = name.lower()
        if lower in _PASSED_RESPONSE_HEADERS or lower.startswith(_PASSED_RESPONSE_PREFIXES):
            out.append((lower, value))
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


class DisconnectWatch:
    """Cancels the request's task if the app hangs up while it is being answered.

    Watching costs a task per request, so it starts only once the request has
    been in flight for ``after`` seconds: a hang-up is acted on within that
    time, and the many requests answered sooner (a cached or tiny completion)
    never pay for a watcher. ``close()`` before returning; ``gone`` says whether
    the watcher cancelled the task (the caller then ``uncancel()``s it).
    """

    __slots__ = ("_receive", "_task", "_timer", "_watcher", "gone")

    def __init__(self, receive: Receive, task: asyncio.Task[Any], after: float) -> None:
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.gone = False
        if after > 0:
            self._timer = task.get_loop().call_later(after, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        if not self._task.done():
            self._watcher = self._task.get_loop().create_task(self._watch())

    async def _watch(self) -> None:
        await _wait_for_disconnect(self._receive)
        self.gone = True
        self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        watcher = self._watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()


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
        request_timeout: float = 600.0,
        reporter: OutcomeReporter | None = None,
        disconnect_watch_after: float = 0.05,
        access_log: AccessLog | None = None,
    ) -> None:
        self.state = state
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else SidecarMetrics(state)
        self.balancer = balancer if balancer is not None else Balancer()
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.stale_after = stale_after
        self.request_timeout = request_timeout
        self.reporter = reporter
        self.access_log = access_log  # opt-in: one JSON line per chat request
        # Seconds a chat request runs before an app hang-up is watched for (``DisconnectWatch``).
        self.disconnect_watch_after = disconnect_watch_after
        m = self.metrics
        self._requests_count = LabelledChildren(m.requests)
        self._attempts_count = LabelledChildren(m.upstream_attempts)
        self._classes_count = LabelledChildren(m.attempt_classes)
        self._fallbacks_count = LabelledChildren(m.fallbacks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP is handled in this frame (one coroutine layer less on the hot path).
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
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
                elif self.access_log is None:
                    status = await self._chat(scope, receive, send)
                else:
                    access = AccessEntry(asyncio.get_running_loop().time())
                    try:
                        status = await self._chat(scope, receive, send, access)
                    finally:
                        self.access_log.write(access, status, asyncio.get_running_loop().time())
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
            self._requests_count.get(endpoint, status_class(status)).inc()

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
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

    async def _chat(self, scope: Scope, receive: Receive, send: Send, access: AccessEntry | None = None) -> int:
        headers = _headers(scope)
        tenant = self._authenticate(headers)
        if isinstance(tenant, errors.ErrorResponse):
            return await _send_error(send, tenant)
        if access is not None:
            access.tenant = tenant
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
        if access is not None:
            access.model = model
        route = self.state.route(tenant, model)
        if route is None:
            return await _send_error(send, errors.model_not_found(model))
        ctx = _Request(self, tenant, _request_id(), access)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        health = ctx.health
        now = self.state.wall_clock()

        def usable(target: Target, key: Key) -> bool:
            why = health.key_block_reason(key.id, target.upstream_model, now)
            if why is None:
                return True
            ctx.excluded.setdefault(key.id, why)
            return False

        plan = plan_attempts(
            tenant,
            route,
            lambda t: self.state.keys(tenant, t.provider, t.upstream_model),
            self.balancer,
            limit=self.max_attempts,
            usable=usable,
            demoted=lambda t: health.provider_degraded(t.provider, t.upstream_model, now),
        )
        if not plan:
            _log.warning(
                "request %s for %s: no usable key (excluded %s)", ctx.request_id, model, excluded_header(ctx.excluded)
            )
            return await _send_error(send, errors.no_usable_key(model), ctx.headers(attempts=0))
        stream = payload.get("stream") is True
        encoded: dict[str, bytes] = {}

        def body_for(upstream_model: str) -> bytes:
            if upstream_model == model:
                return raw  # pass-through: the app's bytes already name this model
            body = encoded.get(upstream_model)
            if body is None:
                payload["model"] = upstream_model
                body = encoded[upstream_model] = json.dumps(payload, separators=(",", ":")).encode()
            return body

        task = asyncio.current_task(loop)
        if task is None:  # pragma: no cover - uvicorn runs every request in a task
            raise RuntimeError("a chat request must run in a task")
        watch = DisconnectWatch(receive, task, self.disconnect_watch_after)
        status = 499
        try:
            status = await self._answer(ctx, model, plan, body_for, headers, stream, deadline, send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
        finally:
            watch.close()
            # Also when the app hung up mid-way: what was attempted is reported.
            ctx.flush()
        if watch.gone:
            # The watcher's cancellation (``_answer`` may have swallowed it): undo it,
            # but keep any cancellation requested by someone else (e.g. shutdown).
            if task.uncancel() > 0:
                raise asyncio.CancelledError
            self.metrics.client_disconnects.inc()
            return 499
        return status

    async def _answer(
        self,
        ctx: _Request,
        model: str,
        plan: list[Attempt],
        body_for: Callable[[str], bytes],
        headers: dict[str, str],
        stream: bool,
        deadline: float,
        send: Send,
    ) -> int:
        """Run the attempts and pass the answer (or the failure) to the app."""
        health = ctx.health
        wall_clock = self.state.wall_clock

        def blocked(attempt: Attempt) -> str | None:
            if attempt.key is None:
                return None
            return health.key_block_reason(attempt.key.id, attempt.target.upstream_model, wall_clock())

        result = await run_attempts(
            self.upstream,
            plan,
            body_for,
            headers,
            stream=stream,
            deadline=deadline,
            observer=ctx,
            blocked=blocked,
            excluded=ctx.excluded,
            wall_clock=wall_clock,
        )
        ctx.excluded = dict(result.excluded)
        if ctx.access is not None:
            ctx.access.answered(result.attempts, None if isinstance(result, AttemptsFailed) else result.attempt)
        if isinstance(result, AttemptsFailed):
            _log.warning(
                "request %s for %s failed after %d attempt(s); excluded %s",
                ctx.request_id,
                model,
                result.attempts,
                excluded_header(ctx.excluded) or "-",
            )
            return await _send_error(send, result.error, ctx.headers(attempts=result.attempts))
        if _log.isEnabledFor(logging.DEBUG):  # per request: DEBUG (an access log is ``--access-log``)
            _log.debug(
                "request %s for %s answered %d by %s after %d attempt(s)%s",
                ctx.request_id,
                model,
                result.response.status,
                describe(result.attempt),
                result.attempts,
                f"; excluded {excluded_header(ctx.excluded)}" if ctx.excluded else "",
            )
        response = result.response
        try:
            extra = [
                *_upstream_headers(response),
                *ctx.headers(attempts=result.attempts, answer=result.attempt.key, target=result.attempt.target),
            ]
            if result.streaming:
                # The failed attempts before it are reported now, not when the stream ends.
                ctx.flush()
                return await self._relay_stream(ctx, result, extra, send)
            head = result.head
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(b"content-length", str(len(head)).encode()), *extra],
                }
            )
            await send({"type": "http.response.body", "body": head, "more_body": False})
            return response.status
        finally:
            response.release()  # back to the pool only when the body was read to its end
            if result.record is not None:
                # The answer is on its way: now its bookkeeping (``_chat`` flushes the reports).
                ctx.attempted(result.record)

    async def _relay_stream(
        self, ctx: _Request, reply: UpstreamReply, extra: list[tuple[bytes, bytes]], send: Send
    ) -> int:
        """Pass a committed stream to the app chunk by chunk, then classify how it ended."""
        response = reply.response
        # Until the stream ends well, a cut (or the app hanging up) is how it ended.
        ending: Classification | None = None
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": extra})
            if reply.head:
                await send({"type": "http.response.body", "body": reply.head, "more_body": True})
            try:
                async for chunk in response.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (TimeoutError, UpstreamError) as exc:
                provider = reply.attempt.target.provider.value
                what = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                _log.warning(
                    "request %s: stream from %s broke after the first byte (%s); not retried",
                    ctx.request_id,
                    describe(reply.attempt),
                    what,
                )
                ending = stream_broken(f"stream broken: {what}"[:120])
                self.metrics.stream_errors.labels(provider).inc()
                if response.content_type == "text/event-stream":
                    # Like OpenAI mid-stream: an error event, so the app knows the answer is cut
                    # (the blank lines first terminate any event the upstream left half-sent).
                    error = errors.error_body("The upstream stream broke off.", "upstream_error", code="stream_broken")
                    await send(
                        {"type": "http.response.body", "body": b"\n\ndata: " + error + b"\n\n", "more_body": True}
                    )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if ending is None:
                # Complete, or the app went away: the upstream itself did its job.
                ending = classify_status(response.status, response.headers, b"", self.state.wall_clock)
            record = complete(reply, ending, now_loop=asyncio.get_running_loop().time())
            ctx.attempted(record)
            ctx.flush()
        return response.status

    def count_attempt(self, record: AttemptRecord) -> None:
        provider = record.attempt.target.provider.value
        self._attempts_count.get(provider, record.outcome).inc()
        self._classes_count.get(provider, record.classification.error_class.value).inc()
        if record.retried:
            self._fallbacks_count.get(provider).inc()


class _Request:
    """One chat request's book-keeping: the attempt observer, reports and answer headers."""

    __slots__ = ("access", "app", "excluded", "health", "request_id", "tenant", "unreported")

    def __init__(self, app: SidecarApp, tenant: str, request_id: str, access: AccessEntry | None = None) -> None:
        self.app = app
        self.tenant = tenant
        self.request_id = request_id
        self.access = access
        if access is not None:
            access.request_id = request_id
        self.health: TenantHealth = app.state.health(tenant)
        # key id -> class or health state
        self.excluded: dict[str, str] = {}
        # Attempts seen but not yet queued for the control plane.
        self.unreported: list[AttemptRecord] = []

    def attempted(self, record: AttemptRecord) -> None:
        """Metrics, and this sidecar's own health book at once (no round trip)."""
        app = self.app
        app.count_attempt(record)
        key = record.attempt.key
        if key is None:
            return  # keyless: nothing to attribute in the health book or the reports
        self.unreported.append(record)
        classification = record.classification
        if classification.error_class is ErrorClass.SUCCESS:
            # A plain success: the health book's fast path (no Outcome object).
            target = record.attempt.target
            self.health.record_success(
                key.id,
                target.provider,
                target.upstream_model,
                classification,
                provider_final=record.provider_final,
                recovered=record.recovered,
                now=app.state.wall_clock(),
                started=record.started,
            )
            return
        outcome = Outcome(
            key_id=key.id,
            provider=record.provider,
            model=record.model,
            classification=classification,
            provider_final=record.provider_final,
            recovered=record.recovered,
        )
        self.health.record(outcome, app.state.wall_clock())

    def misconfigured(self, attempt: Attempt) -> None:
        self.app._attempts_count.get(attempt.target.provider.value, "config_error").inc()

    def flush(self) -> None:
        """Queue the attempts seen so far for the control plane (never blocks)."""
        records = self.unreported
        if not records:
            return
        self.unreported = []
        reporter = self.app.reporter
        if reporter is None:
            return
        # Only keyed attempts are kept in ``unreported``.
        for record in records:
            reporter.enqueue_record(self.tenant, record, self.request_id)

    def headers(
        self, *, attempts: int, answer: Key | None = None, target: Target | None = None
    ) -> list[tuple[bytes, bytes]]:
        out = [(ATTEMPTS_HEADER, str(attempts).encode()), (REQUEST_ID_HEADER, self.request_id.encode())]
        if target is not None:
            out.append((PROVIDER_HEADER, target.provider.value.encode()))
        if answer is not None:
            out.append((KEY_HEADER, answer.id.encode("latin-1", "replace")))
        if self.excluded:
            out.append((EXCLUDED_HEADER, excluded_header(self.excluded).encode("latin-1", "replace")))
        return out


def _model_entry(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "keyplane"}
