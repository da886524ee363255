"""The sidecar's HTTP face: a raw ASGI app speaking the OpenAI API (the edge).

POST /v1/chat/completions, GET /v1/models[/{id}], GET /healthz, GET /metrics.
Every answer to a request is served from ``SidecarState`` (no network hop
besides the upstream call); errors have the OpenAI error shape.

A request walks one way (STYLE.md item 12): this edge routes it, the chat
handler (``sidecar.chat``) runs the attempt loop (``sidecar.proxy``) over the
upstream client (``sidecar.upstream``), and the answer goes back to the app
through ``sidecar.relay``. The edge never touches an upstream response.
"""

from __future__ import annotations

import asyncio

from . import errors
from .access_log import AccessEntry, AccessLog
from .asgi import Message, Receive, Scope, Send, send_bytes, send_error, send_json
from .chat import authenticate, chat, read_headers
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import LabelledChildren, SidecarMetrics, status_class
from .proxy import AttemptRecord
from .reporter import OutcomeReporter
from .router import Attempt, Balancer
from .shutdown import is_cut, shutting_down
from .state import SidecarState
from .upstream import UpstreamClient

__all__ = ["Message", "Receive", "Scope", "Send", "SidecarApp"]


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
        # Set when a shutdown began (``sidecar.shutdown``): /healthz answers 503 while requests are still served.
        self.draining = False
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
                    status = await send_error(send, errors.method_not_allowed(method, path))
                elif self.access_log is None:
                    status = await chat(self, scope, receive, send)
                else:
                    access = AccessEntry(asyncio.get_running_loop().time())
                    try:
                        status = await chat(self, scope, receive, send, access)
                    finally:
                        self.access_log.write(access, status, asyncio.get_running_loop().time())
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                endpoint = "models"
                if method != "GET":
                    status = await send_error(send, errors.method_not_allowed(method, path))
                else:
                    status = await self._models(scope, send, path[len("/v1/models/") :] or None)
            elif path == "/healthz":
                endpoint = "healthz"
                status = await self._healthz(send)
            elif path == "/metrics":
                endpoint = "metrics"
                status = await send_bytes(send, 200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE.encode())
            else:
                status = await send_error(send, errors.not_found(path))
        except asyncio.CancelledError as exc:
            if not is_cut(exc):
                raise
            status = await _answer_cut(send)
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

    async def _models(self, scope: Scope, send: Send, model_id: str | None) -> int:
        tenant = authenticate(self, read_headers(scope))
        if isinstance(tenant, errors.ErrorResponse):
            return await send_error(send, tenant)
        models = self.state.models(tenant)
        if model_id is None:
            data = [_model_entry(m) for m in models]
            return await send_json(send, 200, {"object": "list", "data": data})
        if self.state.route(tenant, model_id) is None:
            return await send_error(send, errors.model_not_found(model_id))
        return await send_json(send, 200, _model_entry(model_id))

    async def _healthz(self, send: Send) -> int:
        state = self.state
        if self.draining:
            return await send_json(
                send,
                503,
                {"status": "draining", "reason": "the sidecar is shutting down", "version": state.version},
            )
        if not state.is_ready:
            return await send_json(
                send,
                503,
                {"status": "unavailable", "reason": "no snapshot from the control plane yet", "version": 0},
            )
        age = state.age()
        if age is not None and age > self.stale_after:
            return await send_json(
                send,
                503,
                {
                    "status": "stale",
                    "reason": f"no contact with the control plane for {int(age)}s",
                    "version": state.version,
                },
            )
        return await send_json(send, 200, {"status": "ok", "version": state.version})

    # --- metrics of the chat handler's attempts ------------------------------------------

    def count_attempt(self, record: AttemptRecord) -> None:
        provider = record.attempt.target.provider.value
        self._attempts_count.get(provider, record.outcome).inc()
        self._classes_count.get(provider, record.classification.error_class.value).inc()
        if record.retried:
            self._fallbacks_count.get(provider).inc()

    def count_misconfigured(self, attempt: Attempt) -> None:
        self._attempts_count.get(attempt.target.provider.value, "config_error").inc()


async def _answer_cut(send: Send) -> int:
    """A request the shutdown cut: 503 when nothing was answered yet (else the answer just ends)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    try:
        return await send_error(send, shutting_down())
    except RuntimeError:  # the answer had begun: the server closes the connection
        return 503


def _model_entry(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "keyplane"}
