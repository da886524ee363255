"""Requests to Anthropic's own Messages API (pure, no I/O).

``POST {base_url}/messages`` and ``{base_url}/messages/count_tokens`` (the
default base URL ``https://api.anthropic.com/v1``), with the key in
``x-api-key`` and the app's ``anthropic-version`` (``2023-06-01`` when it sent
none: the API refuses a request without one) and ``anthropic-beta`` passed
through. The request built here carries the provider secret, so it is never
logged or repr'd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from keyplane.domain import Provider

from ..router import Attempt
from .errors import UpstreamConfigError
from .request import DEFAULT_BASE_URLS, FORWARDED_REQUEST_HEADERS, UpstreamRequest

__all__ = [
    "ANTHROPIC_FORWARDED_HEADERS",
    "COUNT_TOKENS_PATH",
    "DEFAULT_ANTHROPIC_VERSION",
    "MESSAGES_PATH",
    "messages_request_builder",
]

MESSAGES_PATH = "/messages"
COUNT_TOKENS_PATH = "/messages/count_tokens"
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# The app's headers passed upstream on these paths (lower case): the usual ones and Anthropic's own.
ANTHROPIC_FORWARDED_HEADERS: frozenset[str] = (FORWARDED_REQUEST_HEADERS - {"openai-beta"}) | {
    "anthropic-version",
    "anthropic-beta",
}
_ORDER: tuple[str, ...] = tuple(sorted(ANTHROPIC_FORWARDED_HEADERS))


@functools.lru_cache(maxsize=1024)
def _fixed_part(base_url: str, path: str, secret: str) -> tuple[str, str]:
    """URL and checked secret; bounded cache, so a rotated secret ages out."""
    url = base_url.rstrip("/") + path
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or any(c in url for c in " \t\r\n?#"):
        raise UpstreamConfigError(f"base URL is not an absolute http(s) URL: {scheme[:10] or '?'}://...")
    if any(c in secret for c in "\r\n\0"):
        raise UpstreamConfigError("the key's secret holds a line break")
    return url, secret


def messages_request_builder(path: str) -> Callable[[Attempt, Mapping[str, str]], UpstreamRequest]:
    """The request builder for ``path`` (``MESSAGES_PATH`` or ``COUNT_TOKENS_PATH``)."""

    def build(attempt: Attempt, app_headers: Mapping[str, str]) -> UpstreamRequest:
        key = attempt.key
        if attempt.target.provider is not Provider.ANTHROPIC or key is None:
            raise UpstreamConfigError("the Messages API is served by anthropic keys only")
        url, secret = _fixed_part(key.base_url or DEFAULT_BASE_URLS[Provider.ANTHROPIC], path, key.secret)
        headers = {"content-type": "application/json"}
        for name in _ORDER:
            value = app_headers.get(name)
            if value and "\r" not in value and "\n" not in value:
                headers[name] = value
        headers.setdefault("anthropic-version", DEFAULT_ANTHROPIC_VERSION)
        if secret:
            headers["x-api-key"] = secret
        return UpstreamRequest(url=url, headers=headers)

    return build
