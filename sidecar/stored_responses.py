"""A stored response's own calls: GET / DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items.

A response lives in the upstream account of the key that created it
(``sidecar.affinity``): these calls go to that key only, through the route the
response was made through (remembered with the key), one attempt, its answer
passed through; they never rotate to another key (whose account cannot see
the response). An id this sidecar did not make (or forgot) is answered with
OpenAI's 404 for an unknown response; a creating key that cannot be used now
with a 409 ``response_unavailable``. Otherwise they are served like any
endpoint, by ``sidecar.chat.forward`` (auth, limits, health, outcome reports):
there is no body to read but the query string, which is passed on (``stream``,
``include``, ``starting_after``, ``after``, ``limit``, ``order``...).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable, Mapping

from . import errors
from .access_log import AccessEntry, AccessLog
from .asgi import Receive, Scope, Send, send_error
from .chat import ClientGone, authenticate, forward, read_body, read_headers
from .chat_app import ChatApp
from .endpoints import (
    RESPONSES,
    RESPONSES_CANCEL,
    RESPONSES_DELETE,
    RESPONSES_INPUT_ITEMS,
    RESPONSES_RETRIEVE,
    Endpoint,
    StreamKind,
)
from .rescue import Sending
from .router import Attempt
from .upstream import JSON_TYPE, UpstreamRequest, build_request

__all__ = ["OTHER", "PREFIX", "match", "request_builder", "serve"]

PREFIX = "/v1/responses/"

# (sub-path after the id) -> method -> endpoint.
_CALLS: Mapping[str, Mapping[str, Endpoint]] = {
    "": {"GET": RESPONSES_RETRIEVE, "DELETE": RESPONSES_DELETE},
    "cancel": {"POST": RESPONSES_CANCEL},
    "input_items": {"GET": RESPONSES_INPUT_ITEMS},
}
# The label of a request under PREFIX that names no call (metrics).
OTHER = "responses_other"


def match(path: str, method: str) -> tuple[Endpoint, str] | errors.ErrorResponse:
    """The call ``method`` + ``path`` (under ``PREFIX``) makes and the response id it names,
    or the error to answer (404 unknown URL, 405)."""
    response_id, _, tail = path[len(PREFIX) :].partition("/")
    calls = _CALLS.get(tail)
    if not response_id or calls is None:
        return errors.not_found(path)
    endpoint = calls.get(method)
    if endpoint is None:
        return errors.method_not_allowed(method, path)
    return endpoint, response_id


def _query(scope: Scope) -> str | None:
    """The request's query string, or None when it holds characters not to be sent on."""
    raw: bytes = scope.get("query_string", b"")
    if any(b <= 0x20 or b >= 0x7F for b in raw):
        return None
    return raw.decode("ascii")


def _streams(endpoint: Endpoint, query: str) -> bool:
    if endpoint.stream is not StreamKind.FLAG or not query:
        return False
    return urllib.parse.parse_qs(query).get("stream", [""])[-1] == "true"


def request_builder(
    endpoint: Endpoint, response_id: str, query: str
) -> Callable[[Attempt, Mapping[str, str]], UpstreamRequest]:
    """Each attempt's request: the Responses API's URL for the key (Azure's too), with the
    id, the call's tail and the app's query (before Azure's ``api-version``)."""
    tail = endpoint.upstream_path.replace("{id}", urllib.parse.quote(response_id, safe=""))[
        len(RESPONSES.upstream_path) :
    ]
    method = endpoint.method

    def build(attempt: Attempt, app_headers: Mapping[str, str]) -> UpstreamRequest:
        made = build_request(attempt, app_headers, RESPONSES.upstream_path)
        base, _, theirs = made.url.partition("?")
        url = base + tail
        queries = "&".join(q for q in (query, theirs) if q)
        if queries:
            url += "?" + queries
        headers = made.headers
        if method != "POST":
            headers = {k: v for k, v in headers.items() if k != "content-type"}
        return UpstreamRequest(url=url, headers=headers, method=method)

    return build


def _no_body(_model: str) -> bytes:
    return b""


async def serve(
    app: ChatApp, scope: Scope, receive: Receive, send: Send, method: str, path: str, log: AccessLog | None
) -> tuple[str, int]:
    """One request under ``PREFIX``: (its metrics label, the status answered)."""
    found = match(path, method)
    if isinstance(found, errors.ErrorResponse):
        return OTHER, await send_error(send, found)
    endpoint, response_id = found
    if log is None:
        return endpoint.name, await _call(app, endpoint, response_id, scope, receive, send, None)
    access = AccessEntry(asyncio.get_running_loop().time())
    status = 500
    try:
        status = await _call(app, endpoint, response_id, scope, receive, send, access)
    finally:
        log.write(access, status, asyncio.get_running_loop().time())
    return endpoint.name, status


async def _call(
    app: ChatApp,
    endpoint: Endpoint,
    response_id: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    access: AccessEntry | None,
) -> int:
    headers = read_headers(scope)
    tenant = authenticate(app, headers)
    if isinstance(tenant, errors.ErrorResponse):
        return await send_error(send, tenant)
    if access is not None:
        access.tenant = tenant
    try:
        body = await read_body(app, headers, receive)  # none is expected; a cancel may send "{}"
    except ClientGone:
        app.metrics.client_disconnects.inc()
        return 499
    if body is None:
        return await send_error(send, errors.body_too_large(app.max_body_bytes))
    query = _query(scope)
    if query is None:
        return await send_error(send, errors.invalid_request("The query string holds characters not allowed."))
    made = app.affinity.find(tenant, response_id)
    if made is None:
        return await send_error(send, errors.response_not_found(response_id))
    _key_id, model = made
    if app.state.route(tenant, model) is None:
        why = "the model it was made with is no longer configured"
        return await send_error(send, errors.response_unavailable(response_id, why))
    sending = Sending(endpoint.upstream_path, JSON_TYPE, request_builder(endpoint, response_id, query))
    stream = _streams(endpoint, query)
    return await forward(
        app,
        endpoint,
        tenant,
        model,
        _no_body,
        headers,
        stream,
        receive,
        send,
        access,
        pinned=response_id,
        sending=sending,
    )
