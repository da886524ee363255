"""Calls to upstream providers over one shared, pooled HTTP client (``http_client``).

Every provider is spoken to through its OpenAI-compatible chat completions
endpoint; only the base URL and the credential header differ. The request
built here carries the provider secret, so it is never logged or repr'd.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field

from keyplane.domain import Provider

from .http_client import HttpClient, HttpResponse
from .router import Attempt

__all__ = [
    "DEFAULT_BASE_URLS",
    "FORWARDED_REQUEST_HEADERS",
    "UpstreamClient",
    "UpstreamConfigError",
    "UpstreamRequest",
    "build_request",
]

DEFAULT_BASE_URLS: Mapping[Provider, str] = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com/v1",
    Provider.GEMINI: "https://generativelanguage.googleapis.com/v1beta/openai",
    Provider.OPENROUTER: "https://openrouter.ai/api/v1",
}

# The only app request headers passed upstream; the app's Authorization (its
# client key) and every hop-by-hop header stay behind.
FORWARDED_REQUEST_HEADERS: frozenset[str] = frozenset({"accept", "user-agent"})


class UpstreamConfigError(Exception):
    """The attempt cannot be sent: its key or target lacks a base URL."""


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str] = field(repr=False)


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
_FORWARDED_ORDER: tuple[str, ...] = tuple(FORWARDED_REQUEST_HEADERS)


@functools.lru_cache(maxsize=1024)
def _fixed_part(base_url: str, provider: Provider, secret: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The URL and credential header of (base URL, provider, secret); bounded cache,
    so a rotated secret ages out. Nothing here is logged or repr'd."""
    url = base_url.rstrip("/") + "/chat/completions"
    credential: tuple[tuple[str, str], ...] = ()
    if secret:
        if provider is Provider.AZURE_OPENAI:
            credential = (("api-key", secret),)
        else:
            credential = (("authorization", f"Bearer {secret}"),)
    return url, credential


def build_request(attempt: Attempt, app_headers: Mapping[str, str]) -> UpstreamRequest:
    """URL and headers for one attempt. ``app_headers`` has lower-case names."""
    key = attempt.key
    url, credential = _fixed_part(_base_url(attempt), attempt.target.provider, key.secret if key is not None else "")
    headers = {"content-type": "application/json"}
    for name in _FORWARDED_ORDER:
        value = app_headers.get(name)
        if value:
            headers[name] = value
    for name, value in credential:
        headers[name] = value
    return UpstreamRequest(url=url, headers=headers)


class UpstreamClient:
    """One pooled HTTP client for every provider; ``start`` before use, ``close`` after."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        total_timeout: float | None = 600.0,
        limit_per_host: int = 256,
        keepalive_timeout: float = 60.0,
        trust_env: bool = False,
        ca_file: str | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._limit_per_host = limit_per_host
        self._keepalive_timeout = keepalive_timeout
        self._trust_env = trust_env
        self._ca_file = ca_file
        self._http: HttpClient | None = None

    async def start(self) -> None:
        if self._http is not None:
            return
        self._http = HttpClient(
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            limit_per_host=self._limit_per_host,
            keepalive_timeout=self._keepalive_timeout,
            trust_env=self._trust_env,
            ca_file=self._ca_file,
        )

    async def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def chat_completion(
        self,
        attempt: Attempt,
        body: bytes,
        app_headers: Mapping[str, str],
        *,
        time_left: float | None = None,
    ) -> Awaitable[HttpResponse]:
        """Send one chat completion; the awaitable returns once the upstream's headers are in.

        ``time_left`` caps the whole attempt, reading its body included (what is
        left of the request's deadline); None keeps the client's total timeout.
        The caller owns the response: read or stream its body, then ``release()``.
        Raises ``UpstreamConfigError`` at once; the awaitable raises
        ``UpstreamError`` or ``TimeoutError``.
        """
        http = self._http
        if http is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        request = build_request(attempt, app_headers)
        try:
            return http.post(
                request.url, request.headers, body, timeout=self._total_timeout if time_left is None else time_left
            )
        except ValueError as exc:  # an unusable URL, or a header value with a line break
            key = attempt.key.id if attempt.key is not None else "-"
            raise UpstreamConfigError(f"{attempt.target.provider.value} key {key}: {exc}") from None
