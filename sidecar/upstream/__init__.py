"""Calls to upstream providers over one pooled ``aiohttp.ClientSession``.

This package owns the sidecar's HTTP client (STYLE.md item 10): aiohttp's
``ClientSession`` and its connector, tuned once when the sidecar starts, and
a narrow interface for the attempt loop (``UpstreamClient.send`` ->
``UpstreamResponse``). Nothing of aiohttp leaks past it: callers see our
own response type and our own ``UpstreamError`` classes.

Modules: ``request`` (URL and headers per provider, pure), ``client`` (the
session and its answers), ``errors`` (what can go wrong), ``host_gate`` (the
first-come-first-served per-host cap in front of aiohttp's connector).

What the tuning guarantees (each tested through real sockets in
tests/sidecar/test_upstream_client.py):

- a POST is written at most once per call: aiohttp retries a request on a
  reused connection the server closed only for idempotent methods, so a
  dead keep-alive connection fails the attempt and the attempt loop decides
  (the GETs and DELETEs of a stored response, ``UpstreamRequest.method``,
  are idempotent and sent without a body);
- a connection goes back to the pool only with its answer read to the end
  and nothing else waiting on it (aiohttp's ``should_close``);
- response heads are bounded (``max_line_size``, ``max_field_size``,
  ``max_headers``), and ``read(limit)`` refuses a body over ``limit``;
- at most ``limit_per_host`` connections per host, waiters served in order;
- TLS verified against the system's CAs plus ``ca_file`` (or ``ca_file`` only).
"""

from .client import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    UpstreamClient,
    UpstreamResponse,
    make_ssl_context,
)
from .errors import (
    UpstreamAnswerCut,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTooLarge,
)
from .request import (
    CHAT_PATH,
    DEFAULT_BASE_URLS,
    FORWARDED_REQUEST_HEADERS,
    JSON_TYPE,
    RequestBody,
    StreamedBody,
    UpstreamRequest,
    build_request,
)

__all__ = [
    "CHAT_PATH",
    "DEFAULT_BASE_URLS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "FORWARDED_REQUEST_HEADERS",
    "JSON_TYPE",
    "RequestBody",
    "StreamedBody",
    "UpstreamAnswerCut",
    "UpstreamClient",
    "UpstreamConfigError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamMalformed",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamTlsError",
    "UpstreamTooLarge",
    "build_request",
    "make_ssl_context",
]
