"""The handler of every OpenAI endpoint: from the app's request to the attempt loop, and back.

What differs per endpoint is in its ``sidecar.endpoints`` entry (upstream
path, body kind, streaming); a multipart body is read by ``sidecar.upload``,
then joins the JSON path in ``forward``. A request is planned around the
tenant's key and provider health (``sidecar.planning``), narrowed to the route's
targets serving the endpoint (unusable keys left out, degraded providers last), run
through the attempt loop under one deadline and answered (``sidecar.answering``:
the attempts, then ``sidecar.relay``). Every attempt is recorded in the local health book at once
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
import os
import re
from collections.abc import Callable

from . import errors
from .access_log import AccessEntry
from .affinity import Sticky, previous_response
from .answering import Dialect, Planned, answer
from .asgi import Receive, Scope, Send, send_error
from .book import RequestBook
from .chat_app import ChatApp
from .endpoints import CHAT_COMPLETIONS, BodyKind, Endpoint, SseErrors, StreamKind
from .planning import keys_of, plan_for
from .request_json import RequestJsonError, bodies_for, parse_request_json
from .rescue import Rescue, Sending
from .rescue_plan import APP_TIMEOUT_HEADER, rescue_for
from .router import Attempt
from .upload import content_type_of, read_upload
from .upstream import FORWARDED_REQUEST_HEADERS, JSON_TYPE, RequestBody
from .usage_stream import Metering, plan_metering

__all__ = [
    "ChatApp",
    "ClientGone",
    "authenticate",
    "book_for",
    "chat",
    "forward",
    "handle",
    "read_body",
    "read_headers",
    "request_id_for",
]

# How the OpenAI endpoints tell the app what went wrong (``sidecar.answering``).
_OPENAI = Dialect()
_TYPED = Dialect(typed_errors=True)  # the Responses API's typed ``event: error``

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


def book_for(
    app: ChatApp, tenant: str, model: str, headers: dict[str, str], token: str | None, access: AccessEntry | None
) -> RequestBook:
    """The request's book: under its id (``request_id_for``), for the client key of ``token``."""
    return RequestBook(
        app, tenant, request_id_for(headers), access, client_key_id=app.state.client_key_id(token), model=model
    )


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
    pinned = previous_response(payload) if endpoint.sticky else None
    return await forward(
        self,
        endpoint,
        tenant,
        model,
        bodies_for(payload, model, own),
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
    ctx = book_for(self, tenant, model, headers, _bearer(headers), access)
    ctx.metering = metering
    deadline = asyncio.get_running_loop().time() + self.request_timeout
    health = ctx.health
    sticky: Sticky | None = None
    plan: list[Attempt] | None = None
    if endpoint.sticky:
        sticky = Sticky(self.affinity, tenant, model, stored=bool(endpoint.served_by))
        if pinned is not None:
            now = self.state.wall_clock()
            found = sticky.pin(
                pinned,
                served,
                keys_of(self.state, tenant),
                lambda t, k: health.key_block_reason(k.id, t.upstream_model, now),
            )
            if isinstance(found, errors.ErrorResponse):
                return await send_error(send, found, ctx.headers(attempts=0))
            plan = found
    if plan is None:
        plan = plan_for(self, health, tenant, served, ctx.excluded)
        if self.state.nodes_of(tenant) is not None:  # a tenant with self-hosted nodes
            plan = await self.node_affinity.plan(tenant, _bearer(headers), served, plan, self.max_attempts)
    # Built only should no key be able to serve (``sidecar.rescue``); a continuation
    # pinned to the key that created its response has nowhere else to go.
    rescue: Callable[[], Rescue] | None = None
    if sticky is None or pinned is None:
        rescue = functools.partial(rescue_for, self, health, tenant, model, served, headers, deadline)
    sending = sending or Sending(endpoint.upstream_path, content_type)
    planned = Planned(plan, body_for, headers, stream, deadline, sending, rescue)
    dialect = _TYPED if endpoint.sse_errors is SseErrors.TYPED else _OPENAI
    return await answer(self, ctx, planned, receive, send, dialect, None if sticky is None else sticky.created)
