"""The handler of every OpenAI endpoint: from the app's request to the attempt loop, and back.

What differs per endpoint is in its ``sidecar.endpoints`` entry (upstream
path, body kind, streaming); a multipart body is read by ``sidecar.upload``,
then joins the JSON path in ``forward``. A request is planned around the
tenant's key and provider health, narrowed to the route's targets serving
the endpoint (unusable keys left out, degraded providers last), run through the attempt
loop (``sidecar.proxy``) under one deadline, and the answer handed to
``sidecar.relay``. Every attempt is recorded in the local health book at once
and queued for the control plane (never awaited). The answer carries
``x-keyplane-attempts``, ``x-keyplane-provider``, ``x-keyplane-key`` (an id,
never a secret), ``x-keyplane-excluded`` and ``x-keyplane-request-id``: the
app's ``x-request-id`` when it sent a usable one, else one made up here; the
same id is logged, reported and sent upstream as ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from . import errors
from .access_log import AccessEntry
from .affinity import Sticky, previous_response
from .asgi import Receive, Scope, Send, send_error
from .book import RequestBook
from .chat_app import ChatApp
from .endpoints import CHAT_COMPLETIONS, BodyKind, Endpoint, SseErrors, StreamKind
from .model import Key, Target
from .proxy import AttemptsFailed, UpstreamReply, describe, excluded_header
from .relay import relay
from .request_json import RequestJsonError, parse_request_json
from .rescue import Rescue, Sending, serve
from .rescue_plan import APP_TIMEOUT_HEADER, rescue_for
from .router import Attempt, plan_attempts
from .upload import content_type_of, read_upload
from .upstream import FORWARDED_REQUEST_HEADERS, JSON_TYPE, RequestBody
from .usage_stream import Metering, plan_metering

__all__ = [
    "ChatApp",
    "ClientGone",
    "DisconnectWatch",
    "attempt",
    "authenticate",
    "chat",
    "forward",
    "handle",
    "read_body",
    "read_headers",
    "request_id_for",
]

_log = logging.getLogger(__name__)


# Request ids: 32 hex characters like a uuid4 hex, but a per-process random
# prefix plus a counter (no os.urandom call and no UUID object per request).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)
# An app's own x-request-id is kept when it is 1-128 visible ASCII characters.
_USABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def request_id_for(headers: dict[str, str]) -> str:
    """The app's ``x-request-id`` if usable, else a new one; set in ``headers`` (sent upstream)."""
    given = headers.get("x-request-id")
    if given is not None and _USABLE_ID.fullmatch(given):
        return given
    made = headers["x-request-id"] = _request_id()
    return made


class ClientGone(Exception):
    """The app disconnected while its request body was being read."""


# The app's request headers the sidecar reads (ASGI gives names in lower case):
# its credential, the declared body size and what is forwarded upstream.
_READ_HEADERS: dict[bytes, str] = {
    name.encode("latin-1"): name
    for name in ("authorization", "content-length", APP_TIMEOUT_HEADER, *FORWARDED_REQUEST_HEADERS)
}


def read_headers(scope: Scope) -> dict[str, str]:
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


def authenticate(app: ChatApp, headers: dict[str, str], *, count: bool = True) -> str | errors.ErrorResponse:
    """The tenant of the app's client key, or the error to answer. With
    ``count`` the request is counted against its limits (before any upstream
    call) and refused when over one."""
    if not app.state.is_ready:
        return errors.not_ready()
    token = _bearer(headers)
    if not token:
        return errors.missing_api_key()
    found = app.state.identify(token)
    if found is None:
        return errors.invalid_api_key()
    limiter = app.limiter
    if count and limiter is not None:
        refused = limiter.admit(*found)
        if refused is not None:
            return refused
    return found[0]


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


async def read_body(self: ChatApp, headers: dict[str, str], receive: Receive) -> bytes | None:
    """The request body, or None when it exceeds the cap."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def chat(self: ChatApp, scope: Scope, receive: Receive, send: Send, access: AccessEntry | None = None) -> int:
    """POST /v1/chat/completions; the status answered (499: the app hung up)."""
    return await handle(self, CHAT_COMPLETIONS, scope, receive, send, access)


async def handle(
    self: ChatApp,
    endpoint: Endpoint,
    scope: Scope,
    receive: Receive,
    send: Send,
    access: AccessEntry | None = None,
) -> int:
    """One request to an OpenAI-shaped ``endpoint``; the status answered (499: the app hung up).

    ``access`` (the opt-in access log) is filled in on the way."""
    headers = read_headers(scope)
    tenant = authenticate(self, headers)
    if isinstance(tenant, errors.ErrorResponse):
        return await send_error(send, tenant)
    if access is not None:
        access.tenant = tenant
    if endpoint.body is BodyKind.MULTIPART:
        upload = await read_upload(receive, content_type_of(scope), self.max_body_bytes)
        if upload is None:
            self.metrics.client_disconnects.inc()
            return 499
        if isinstance(upload, errors.ErrorResponse):
            return await send_error(send, upload)
        stream = upload.stream or endpoint.stream is StreamKind.ALWAYS
        try:
            return await forward(
                self,
                endpoint,
                tenant,
                upload.model,
                upload.body_for,
                headers,
                stream,
                receive,
                send,
                access,
                content_type=upload.content_type,
            )
        finally:
            upload.close()
    try:
        raw = await read_body(self, headers, receive)
    except ClientGone:
        self.metrics.client_disconnects.inc()
        return 499
    if raw is None:
        return await send_error(send, errors.body_too_large(self.max_body_bytes))
    try:
        payload = parse_request_json(raw)
    except RequestJsonError as exc:
        return await send_error(send, errors.invalid_request(str(exc)))
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return await send_error(send, errors.invalid_request("you must provide a model parameter", param="model"))
    stream = endpoint.stream is StreamKind.ALWAYS or (
        endpoint.stream is StreamKind.FLAG and payload.get("stream") is True
    )
    metering: Metering | None = None
    own: bytes | None = raw
    if self.usage_accounting:
        metering, own = plan_metering(endpoint.name, payload, raw, stream)
    encoded: dict[str, bytes] = {}

    def body_for(upstream_model: str) -> bytes:
        if upstream_model == model and own is not None:
            return own  # pass-through: the app's bytes already name this model
        body = encoded.get(upstream_model)
        if body is None:
            payload["model"] = upstream_model
            body = encoded[upstream_model] = json.dumps(payload, separators=(",", ":")).encode()
        return body

    pinned = previous_response(payload) if endpoint.sticky else None
    return await forward(
        self,
        endpoint,
        tenant,
        model,
        body_for,
        headers,
        stream,
        receive,
        send,
        access,
        pinned=pinned,
        metering=metering,
    )


async def forward(
    self: ChatApp,
    endpoint: Endpoint,
    tenant: str,
    model: str,
    body_for: Callable[[str], RequestBody],
    headers: dict[str, str],
    stream: bool,
    receive: Receive,
    send: Send,
    access: AccessEntry | None,
    *,
    content_type: str = JSON_TYPE,
    pinned: str | None = None,
    metering: Metering | None = None,
    sending: Sending | None = None,
) -> int:
    """Plan, run and relay one request whose body is read: the part every endpoint shares.

    ``pinned``: a ``previous_response_id`` the request continues, or the stored response
    it calls (``sidecar.affinity``); ``sending``: how each attempt is sent, when not the
    endpoint's ``upstream_path`` (``sidecar.stored_responses``)."""
    if access is not None:
        access.model = model
    route = self.state.route(tenant, model)
    if route is None:
        return await send_error(send, errors.model_not_found(model))
    served = route.by_endpoint.get(endpoint.name)
    if served is None:
        return await send_error(send, errors.endpoint_not_served(model, endpoint.path))
    ctx = RequestBook(
        self,
        tenant,
        request_id_for(headers),
        access,
        client_key_id=self.state.client_key_id(_bearer(headers)),
        model=model,
    )
    ctx.metering = metering
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

    keys_for = lambda t: self.state.keys(tenant, t.provider, t.upstream_model)  # noqa: E731
    sticky: Sticky | None = None
    plan: list[Attempt] | None = None
    if endpoint.sticky:
        sticky = Sticky(self.affinity, tenant, model, stored=bool(endpoint.served_by))
        if pinned is not None:
            found = sticky.pin(
                pinned, served, keys_for, lambda t, k: health.key_block_reason(k.id, t.upstream_model, now)
            )
            if isinstance(found, errors.ErrorResponse):
                return await send_error(send, found, ctx.headers(attempts=0))
            plan = found
    if plan is None:
        plan = plan_attempts(
            tenant,
            served,
            keys_for,
            self.balancer,
            limit=self.max_attempts,
            usable=usable,
            demoted=lambda t: health.provider_degraded(t.provider, t.upstream_model, now),
        )
        if self.state.nodes_of(tenant) is not None:  # a tenant with self-hosted nodes
            plan = await self.node_affinity.plan(tenant, _bearer(headers), served, plan, self.max_attempts)
    # Built only should no key be able to serve (``sidecar.rescue``); a continuation
    # pinned to the key that created its response has nowhere else to go.
    rescue: Callable[[], Rescue] | None = None
    if sticky is None or pinned is None:
        rescue = functools.partial(rescue_for, self, health, tenant, model, served, headers, deadline)
    how = _How(endpoint, stream, content_type, sticky, sending)

    task = asyncio.current_task(loop)
    if task is None:  # pragma: no cover - uvicorn runs every request in a task
        raise RuntimeError("a chat request must run in a task")
    watch = DisconnectWatch(receive, task, self.disconnect_watch_after)
    status = 499
    try:
        status = await _answer(self, ctx, model, plan, body_for, headers, how, deadline, send, rescue)
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
    self: ChatApp,
    ctx: RequestBook,
    model: str,
    plan: list[Attempt],
    body_for: Callable[[str], RequestBody],
    headers: dict[str, str],
    how: _How,
    deadline: float,
    send: Send,
    rescue: Callable[[], Rescue] | None = None,
) -> int:
    """Run the attempts (``attempt``) and pass the answer (or the failure) to the app."""
    wall_clock = self.state.wall_clock
    sending = how.sending or Sending(how.endpoint.upstream_path, how.content_type)
    result = await attempt(
        self, ctx, plan, body_for, headers, stream=how.stream, deadline=deadline, sending=sending, rescue=rescue
    )
    if isinstance(result, AttemptsFailed):
        _log.warning(
            "request %s for %s failed after %d attempt(s); excluded %s",
            ctx.request_id,
            model,
            result.attempts,
            excluded_header(ctx.excluded) or "-",
        )
        return await send_error(send, result.error, ctx.headers(attempts=result.attempts))
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
    if how.sticky is not None:
        how.sticky.created(result)
    own = ctx.headers(attempts=result.attempts, answer=result.attempt.key, target=result.attempt.target)
    typed = how.endpoint.sse_errors is SseErrors.TYPED
    return await relay(
        ctx, result, own, send, metrics=self.metrics, wall_clock=wall_clock, typed_errors=typed, metering=ctx.metering
    )


async def attempt(
    self: ChatApp,
    ctx: RequestBook,
    plan: list[Attempt],
    body_for: Callable[[str], RequestBody],
    headers: dict[str, str],
    *,
    stream: bool,
    deadline: float,
    sending: Sending,
    rescue: Callable[[], Rescue] | None,
) -> UpstreamReply | AttemptsFailed:
    """The attempts of one request, whatever its endpoint: ``sidecar.rescue.serve`` (the
    plan, then panic probes, waits or an honest answer when no key could serve), with
    the request's book brought up to date."""
    health = ctx.health
    wall_clock = self.state.wall_clock

    def blocked(attempt: Attempt) -> str | None:
        if attempt.key is None:
            return None
        return health.key_block_reason(attempt.key.id, attempt.target.upstream_model, wall_clock())

    result = await serve(
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
        rescue=rescue,
        sending=sending,
    )
    ctx.excluded = dict(result.excluded)
    if ctx.access is not None:
        ctx.access.answered(result.attempts, None if isinstance(result, AttemptsFailed) else result.attempt)
    return result


class _How:
    """How one request is sent and answered, besides its plan and body."""

    __slots__ = ("content_type", "endpoint", "sending", "sticky", "stream")

    def __init__(
        self, endpoint: Endpoint, stream: bool, content_type: str, sticky: Sticky | None, sending: Sending | None
    ) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.content_type = content_type
        self.sticky = sticky
        self.sending = sending
