"""The sidecar's HTTP face: a raw ASGI app speaking the OpenAI API (the edge).

The OpenAI endpoints of ``sidecar.endpoints`` (POST /v1/chat/completions,
/v1/completions, /v1/embeddings, /v1/responses, /v1/moderations,
/v1/images/generations, /v1/audio/transcriptions, /v1/audio/translations,
/v1/audio/speech; a stored response's GET and DELETE /v1/responses/{id},
POST .../cancel and GET .../input_items: ``sidecar.stored_responses``),
Anthropic's POST /v1/messages[/count_tokens] (``sidecar.anthropic_messages``),
GET /v1/models[/{id}], GET /livez, GET /readyz (and its alias /healthz; see
``sidecar.probes``), GET /metrics.
Every answer to a request is served from ``SidecarState`` (no network hop
besides the upstream call); errors have the OpenAI error shape (Anthropic's
on /v1/messages).

A request walks one way (STYLE.md item 12): this edge routes it, the chat
handler (``sidecar.chat``, the same for every endpoint) runs the attempt loop (``sidecar.proxy``) over the
upstream client (``sidecar.upstream``), and the answer goes back to the app
through ``sidecar.relay``. The edge never touches an upstream response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from keyplane import convert
from keyplane.health.panic import PanicPolicy

from . import anthropic_errors, errors, probes, stored_responses
from .access_log import AccessEntry, AccessLog
from .affinity import ResponseAffinity
from .anthropic_messages import COUNT_TOKENS_ROUTE, MESSAGES_ROUTE, messages
from .asgi import Message, Receive, Scope, Send, send_bytes, send_error, send_json
from .chat import authenticate, handle, read_headers
from .endpoints import BY_PATH, CHAT_COMPLETIONS
from .limits import Limiter
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import LabelledChildren, SidecarMetrics, status_class
from .node_affinity import NodeAffinity
from .pricing import PriceBook
from .proxy import AttemptRecord
from .reporter import OutcomeReporter
from .rescue import ProbeGate
from .router import Attempt, Balancer
from .shutdown import is_cut, shutting_down
from .state import SidecarState
from .upstream import UpstreamClient

__all__ = ["Message", "Receive", "Scope", "Send", "SidecarApp"]


class SidecarApp:
    """ASGI application; every dependency is handed in."""

    # Limits from the local leases (sidecar.limits); set by the sidecar when it leases quota.
    limiter: Limiter | None = None

    def __init__(
        self,
        state: SidecarState,
        upstream: UpstreamClient,
        *,
        metrics: SidecarMetrics | None = None,
        balancer: Balancer | None = None,
        max_body_bytes: int = 10 * 1024 * 1024,
        max_attempts: int = 8,
        max_snapshot_age: float | None = None,
        snapshot_age: Callable[[], float | None] | None = None,
        restored_version: Callable[[], int | None] | None = None,
        request_timeout: float = 600.0,
        reporter: OutcomeReporter | None = None,
        disconnect_watch_after: float = 0.05,
        access_log: AccessLog | None = None,
        panic_policy: PanicPolicy | None = None,
        node_affinity: NodeAffinity | None = None,
        usage_accounting: bool = True,
    ) -> None:
        self.state = state
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else SidecarMetrics(state)
        self.balancer = balancer if balancer is not None else Balancer()
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.max_snapshot_age = max_snapshot_age
        # How old the snapshot served is, and the persisted version it came from (sidecar.snapshot_keeper).
        self.snapshot_age = snapshot_age if snapshot_age is not None else state.age
        self.restored_version = restored_version
        self.request_timeout = request_timeout
        self.reporter = reporter
        self.access_log = access_log  # opt-in: one JSON line per chat request
        # Which key created each Responses API response: continuations stick to it.
        self.affinity = ResponseAffinity()
        # (client key, model) -> node bindings for routes with nodes (off: the normal strategy).
        self.node_affinity = (
            node_affinity if node_affinity is not None else NodeAffinity(state, enabled=False, metrics=self.metrics)
        )
        # Set when a shutdown began (``sidecar.shutdown``): /healthz answers 503 while requests are still served.
        self.draining = False
        # Seconds a chat request runs before an app hang-up is watched for (``DisconnectWatch``).
        self.disconnect_watch_after = disconnect_watch_after
        # What a request does when no key can serve it (keyplane.health.panic), and
        # the panic probes in flight (one per tenant, key and model).
        self.panic_policy = panic_policy if panic_policy is not None else PanicPolicy()
        self.probes = ProbeGate()
        # Token usage read from answers and reported (``sidecar.usage``).
        self.usage_accounting = usage_accounting
        # The tenants' prices, from the quota stream (``sidecar.pricing``): the cost counter's and the budgets'.
        self.prices = PriceBook()
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
        if self.draining:
            send = _closing(send)
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
                    status = await handle(self, CHAT_COMPLETIONS, scope, receive, send)
                else:
                    access = AccessEntry(asyncio.get_running_loop().time())
                    try:
                        status = await handle(self, CHAT_COMPLETIONS, scope, receive, send, access)
                    finally:
                        self.access_log.write(access, status, asyncio.get_running_loop().time())
            elif (found := BY_PATH.get(path)) is not None:
                endpoint = found.name
                if method != found.method:
                    status = await send_error(send, errors.method_not_allowed(method, path))
                elif self.access_log is None:
                    status = await handle(self, found, scope, receive, send)
                else:
                    access = AccessEntry(asyncio.get_running_loop().time())
                    try:
                        status = await handle(self, found, scope, receive, send, access)
                    finally:
                        self.access_log.write(access, status, asyncio.get_running_loop().time())
            elif path.startswith(stored_responses.PREFIX):
                endpoint, status = await stored_responses.serve(
                    self, scope, receive, send, method, path, self.access_log
                )
            elif path == MESSAGES_ROUTE or path == COUNT_TOKENS_ROUTE:
                count_tokens = path == COUNT_TOKENS_ROUTE
                endpoint = "messages_count_tokens" if count_tokens else "messages"
                status = await self._anthropic(scope, receive, send, method, path, count_tokens)
            elif path == "/v1/models" or path.startswith("/v1/models/"):
                endpoint = "models"
                if method != "GET":
                    status = await send_error(send, errors.method_not_allowed(method, path))
                else:
                    status = await self._models(scope, send, path[len("/v1/models/") :] or None)
            elif path == "/livez":
                endpoint = "livez"
                code, body = probes.liveness()
                status = await send_json(send, code, body)
            elif path in ("/readyz", "/healthz"):
                endpoint = path[1:]
                status = await self._readyz(send)
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

    async def _anthropic(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str, count_tokens: bool
    ) -> int:
        if method != "POST":
            return await send_error(send, anthropic_errors.from_openai(errors.method_not_allowed(method, path)))
        if self.access_log is None:
            return await messages(self, scope, receive, send, count_tokens=count_tokens)
        access = AccessEntry(asyncio.get_running_loop().time())
        status = 500
        try:
            status = await messages(self, scope, receive, send, count_tokens=count_tokens, access=access)
        finally:
            self.access_log.write(access, status, asyncio.get_running_loop().time())
        return status

    async def _models(self, scope: Scope, send: Send, model_id: str | None) -> int:
        tenant = authenticate(self, read_headers(scope), count=False)
        if isinstance(tenant, errors.ErrorResponse):
            return await send_error(send, tenant)
        models = self.state.models(tenant)
        if model_id is None:
            data = [_model_entry(m) for m in models]
            return await send_json(send, 200, {"object": "list", "data": data})
        if self.state.route(tenant, model_id) is None:
            return await send_error(send, errors.model_not_found(model_id))
        return await send_json(send, 200, _model_entry(model_id))

    async def _readyz(self, send: Send) -> int:
        restored = self.restored_version() if self.restored_version is not None else None
        code, body = probes.readiness(
            self.state,
            age=self.snapshot_age(),
            max_snapshot_age=self.max_snapshot_age,
            restored_version=restored,
            draining=self.draining,
        )
        return await send_json(send, code, body)

    # --- metrics of the chat handler's attempts ------------------------------------------

    def count_attempt(self, record: AttemptRecord, tenant: str) -> None:
        target = record.attempt.target
        provider = target.provider.value
        self._attempts_count.get(provider, record.outcome).inc()
        self._classes_count.get(provider, record.classification.error_class.value).inc()
        if record.retried:
            self._fallbacks_count.get(provider).inc()
        if (usage := record.usage) is not None:
            cost = self.prices.cost_picos(
                tenant, convert.provider_to_proto(target.provider), target.upstream_model, usage
            )
            self.metrics.usage.count(provider, usage, cost)

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


_CONNECTION_CLOSE = (b"connection", b"close")


def _closing(send: Send) -> Send:
    """``send`` with ``Connection: close`` on the answer: while the sidecar drains before
    it stops (``sidecar.shutdown``), every client leaves its keep-alive connection after
    its answer instead of reusing it as the listener closes (a request sent then would
    meet a closed connection)."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), _CONNECTION_CLOSE]}
        await send(message)

    return closing
