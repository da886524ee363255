"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's own API, for apps on the Anthropic SDK.

The app's request goes, unchanged but for the model name, to the route's
targets that serve the ``messages`` endpoint (``sidecar.endpoints.MESSAGES``:
every ``anthropic`` target unless its endpoints leave it out; no other
provider speaks this API; a route with none gets 404), through
the same attempt loop as chat (``sidecar.proxy``): key rotation and failover
between anthropic keys, health and outcome reporting. Upstream it is
``{base_url}/messages`` with the key in ``x-api-key`` and the app's
``anthropic-version``/``anthropic-beta`` (``sidecar.upstream.anthropic``). The
answer is relayed as it came, a stream event by event (``message_start``,
``content_block_*``, ``ping``, ``message_delta``, ``message_stop``,
``error``). Anthropic's errors are classified by ``keyplane.health`` like any
other (529 overloaded and 5xx: upstream_error; 429 rate_limit_error with
``retry-after`` and ``anthropic-ratelimit-*-reset``: rate_limited; 401
authentication_error and 403 permission_error: credential; 400 "credit
balance is too low": taken out like an exhausted quota), and what the sidecar answers itself has
Anthropic's error shape (``sidecar.anthropic_errors``).

The app authenticates with its keyplane client key, as ``x-api-key`` (how
the Anthropic SDK sends an ``api_key``) or ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import functools

from keyplane.domain import Provider

from . import anthropic_errors, errors
from .access_log import AccessEntry
from .answering import Dialect, Planned, answer
from .asgi import Receive, Scope, Send, send_error
from .chat import ClientGone, book_for, read_body
from .chat_app import ChatApp
from .endpoints import MESSAGES
from .model import Route
from .planning import plan_for
from .request_json import RequestJsonError, bodies_for, parse_request_json
from .rescue import Sending
from .rescue_plan import rescue_for
from .upstream.anthropic import (
    ANTHROPIC_FORWARDED_HEADERS,
    COUNT_TOKENS_PATH,
    MESSAGES_PATH,
    messages_request_builder,
)
from .usage_stream import Metering

__all__ = ["COUNT_TOKENS_ROUTE", "MESSAGES_ROUTE", "messages"]

MESSAGES_ROUTE = "/v1/messages"
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"

_BUILD_MESSAGES = messages_request_builder(MESSAGES_PATH)
_BUILD_COUNT_TOKENS = messages_request_builder(COUNT_TOKENS_PATH)

# How Anthropic's API tells the app what went wrong (``sidecar.answering``).
_ANTHROPIC = Dialect(
    error=anthropic_errors.from_openai,
    broken_event=anthropic_errors.BROKEN_STREAM_EVENT,
    cut_event=anthropic_errors.CUT_STREAM_EVENT,
    watch=anthropic_errors.ErrorEventWatch,
)

_READ_HEADERS: dict[bytes, str] = {
    name.encode("latin-1"): name
    for name in ("authorization", "x-api-key", "content-length", *ANTHROPIC_FORWARDED_HEADERS)
}


def _read_headers(scope: Scope) -> dict[str, str]:
    wanted = _READ_HEADERS
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = wanted.get(name) or wanted.get(name.lower())
        if key is not None:
            out[key] = value.decode("latin-1")
    return out


def _client_token(headers: dict[str, str]) -> str | None:
    token = headers.get("x-api-key", "").strip()
    if token:
        return token
    scheme, _, bearer = headers.get("authorization", "").partition(" ")
    return bearer.strip() or None if scheme.lower() == "bearer" else None


def _authenticate(app: ChatApp, headers: dict[str, str]) -> str | errors.ErrorResponse:
    if not app.state.is_ready:
        return anthropic_errors.from_openai(errors.not_ready())
    token = _client_token(headers)
    if token is None:
        return anthropic_errors.missing_api_key()
    found = app.state.identify(token)
    if found is None:
        return errors.ErrorResponse(401, anthropic_errors.error_body("authentication_error", "invalid x-api-key"))
    if app.limiter is not None and (refused := app.limiter.admit(*found)) is not None:
        shaped = anthropic_errors.from_openai(refused)
        return errors.ErrorResponse(shaped.status, shaped.body, refused.headers)
    return found[0]


def _native(route: Route) -> Route | None:
    """The route as far as the Messages API can take it: its targets that serve it
    (``sidecar.endpoints.MESSAGES``: anthropic targets by default, and only those)."""
    served = route.for_endpoint(MESSAGES.name)
    if served is None:
        return None
    if all(t.provider is Provider.ANTHROPIC for t in served.targets):
        return served
    # Only anthropic targets may list it (the admin API refuses others); never send another provider this shape.
    targets = tuple(t for t in served.targets if t.provider is Provider.ANTHROPIC)
    return Route(route.id, route.public_model, targets) if targets else None


async def messages(
    app: ChatApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    count_tokens: bool = False,
    access: AccessEntry | None = None,
) -> int:
    """One Messages API request; the status answered (499: the app hung up)."""
    headers = _read_headers(scope)
    tenant = _authenticate(app, headers)
    if isinstance(tenant, errors.ErrorResponse):
        return await send_error(send, tenant)
    if access is not None:
        access.tenant = tenant
    try:
        raw = await read_body(app, headers, receive)
    except ClientGone:
        app.metrics.client_disconnects.inc()
        return 499
    if raw is None:
        return await send_error(send, anthropic_errors.from_openai(errors.body_too_large(app.max_body_bytes)))
    try:
        payload = parse_request_json(raw)
    except RequestJsonError as exc:
        return await send_error(send, anthropic_errors.from_openai(errors.invalid_request(str(exc))))
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return await send_error(
            send,
            errors.ErrorResponse(400, anthropic_errors.error_body("invalid_request_error", "model: Field required")),
        )
    if access is not None:
        access.model = model
    found = app.state.route(tenant, model)
    if found is None:
        return await send_error(send, anthropic_errors.from_openai(errors.model_not_found(model)))
    route = _native(found)
    if route is None:
        return await send_error(send, anthropic_errors.from_openai(errors.endpoint_not_served(model, MESSAGES_ROUTE)))
    book = book_for(app, tenant, model, headers, _client_token(headers), access)
    plan = plan_for(app, book.health, tenant, route, book.excluded)
    deadline = asyncio.get_running_loop().time() + app.request_timeout
    # Built only should no key be able to serve (``sidecar.rescue``).
    rescue = functools.partial(rescue_for, app, book.health, tenant, model, route, headers, deadline)
    if app.usage_accounting and not count_tokens:
        book.metering = Metering(input_bytes=len(raw), anthropic=True)
    stream = not count_tokens and payload.get("stream") is True
    sending = Sending(build=_BUILD_COUNT_TOKENS if count_tokens else _BUILD_MESSAGES)
    planned = Planned(plan, bodies_for(payload, model, raw), headers, stream, deadline, sending, rescue)
    return await answer(app, book, planned, receive, send, _ANTHROPIC)
