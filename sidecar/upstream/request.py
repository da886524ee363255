"""The request for one attempt: URL and headers per provider (pure, no I/O).

Every provider is spoken to through its OpenAI-compatible endpoints (the
endpoint's path under the base URL: ``/chat/completions``, ``/embeddings``...);
only the base URL and the credential header differ. Azure OpenAI has two
shapes: the v1 API (``{base_url}{path}`` with the base URL
``https://{resource}.openai.azure.com/openai/v1``, or a bare resource endpoint
to which ``/openai/v1`` is added) and, when the target names an api-version,
a classic deployment (``{resource endpoint}/openai/deployments/{deployment}
{path}?api-version=...``); both with the ``api-key`` header. The request
built here carries the provider secret, so it is never logged or repr'd.
"""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from keyplane.domain import Provider

from ..router import Attempt
from .errors import UpstreamConfigError

__all__ = [
    "CHAT_PATH",
    "DEFAULT_BASE_URLS",
    "FORWARDED_REQUEST_HEADERS",
    "JSON_TYPE",
    "RequestBody",
    "StreamedBody",
    "UpstreamRequest",
    "azure_url",
    "build_request",
    "origin_of",
]

DEFAULT_BASE_URLS: Mapping[Provider, str] = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com/v1",
    Provider.GEMINI: "https://generativelanguage.googleapis.com/v1beta/openai",
    Provider.OPENROUTER: "https://openrouter.ai/api/v1",
}

# The only app request headers passed upstream (lower case); the app's
# Authorization (its client key) and every hop-by-hop header stay behind.
# ``x-request-id`` is always set: the app's, or the one the sidecar made up.
FORWARDED_REQUEST_HEADERS: frozenset[str] = frozenset(
    {"accept", "user-agent", "x-request-id", "traceparent", "tracestate", "openai-beta"}
)


@functools.lru_cache(maxsize=1024)
def origin_of(url: str) -> str:
    """``scheme://host:port`` of an absolute URL: what the per-host cap counts by."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port or (443 if scheme == 'https' else 80)}"


class StreamedBody(Protocol):
    """A request body sent as it is read (an upload spooled to disk), never held whole.

    ``chunks()`` starts from the beginning on every call (one call per attempt)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]: ...


RequestBody = bytes | StreamedBody


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str] = field(repr=False)
    # GET and DELETE (a stored response: ``sidecar.stored_responses``) are sent without a body.
    method: str = "POST"


def _base_url(attempt: Attempt) -> str:
    key = attempt.key
    provider = attempt.target.provider
    if key is not None and key.base_url:
        return key.base_url
    if provider is Provider.VLLM:
        if attempt.node_url:
            return attempt.node_url
        raise UpstreamConfigError("vllm target has no node URL")
    default = DEFAULT_BASE_URLS.get(provider)
    if default is None:
        raise UpstreamConfigError(f"{provider.value} key {key.id if key else '-'} has no base_url")
    return default


# Forwarded app headers first, then the credential: the order ``build_request`` always had.
_FORWARDED_ORDER: tuple[str, ...] = tuple(sorted(FORWARDED_REQUEST_HEADERS))


@functools.lru_cache(maxsize=1024)
def _fixed_part(base_url: str, provider: Provider, secret: str, path: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The URL and credential header of (base URL, provider, secret, endpoint path); bounded
    cache, so a rotated secret ages out. Nothing here is logged or repr'd."""
    url = base_url.rstrip("/") + path
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or any(c in url for c in " \t\r\n"):
        raise UpstreamConfigError(f"base URL is not an absolute http(s) URL: {scheme[:10] or '?'}://...")
    if any(c in secret for c in "\r\n\0"):
        raise UpstreamConfigError("the key's secret holds a line break")
    credential: tuple[tuple[str, str], ...] = ()
    if secret:
        if provider is Provider.AZURE_OPENAI:
            credential = (("api-key", secret),)
        else:
            credential = (("authorization", f"Bearer {secret}"),)
    return url, credential


CHAT_PATH = "/chat/completions"
JSON_TYPE = "application/json"


def azure_url(base_url: str, api_version: str, deployment: str, path: str = CHAT_PATH) -> str:
    """Azure OpenAI's URL for ``path``: the v1 API (no ``api_version``), or a classic deployment."""
    base = base_url.rstrip("/")
    if not api_version:
        return base + (path if urllib.parse.urlsplit(base).path else "/openai/v1" + path)
    # The resource endpoint: a v1 base URL (or one ending in /openai) names it too.
    for suffix in ("/openai/v1", "/openai"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = urllib.parse.quote(deployment, safe="")
    query = urllib.parse.urlencode({"api-version": api_version})
    return f"{base}/openai/deployments/{name}{path}?{query}"


@functools.lru_cache(maxsize=1024)
def _azure_part(
    base_url: str, secret: str, api_version: str, deployment: str, path: str
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``_fixed_part`` for Azure OpenAI (its checks and credential), with Azure's URL."""
    _, credential = _fixed_part(base_url, Provider.AZURE_OPENAI, secret, path)
    return azure_url(base_url, api_version, deployment, path), credential


def build_request(
    attempt: Attempt, app_headers: Mapping[str, str], path: str = CHAT_PATH, content_type: str = JSON_TYPE
) -> UpstreamRequest:
    """URL and headers for one attempt. ``app_headers`` has lower-case names; ``path`` is
    the endpoint's, appended to the base URL; ``content_type`` the body's."""
    key = attempt.key
    target = attempt.target
    secret = key.secret if key is not None else ""
    if target.provider is Provider.AZURE_OPENAI:
        deployment = target.deployment or target.upstream_model
        url, credential = _azure_part(_base_url(attempt), secret, target.api_version, deployment, path)
    else:
        url, credential = _fixed_part(_base_url(attempt), target.provider, secret, path)
    headers = {"content-type": content_type}
    for name in _FORWARDED_ORDER:
        value = app_headers.get(name)
        if value and "\r" not in value and "\n" not in value:
            headers[name] = value
    for name, value in credential:
        headers[name] = value
    return UpstreamRequest(url=url, headers=headers)
