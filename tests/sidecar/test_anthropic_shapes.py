"""Anthropic's request and error shapes (pure)."""

from __future__ import annotations

import json

import pytest

from keyplane.domain import Provider
from sidecar import anthropic_errors, errors
from sidecar.model import Key, Target
from sidecar.router import Attempt
from sidecar.upstream import UpstreamConfigError
from sidecar.upstream.anthropic import COUNT_TOKENS_PATH, MESSAGES_PATH, messages_request_builder


def _attempt(provider: Provider = Provider.ANTHROPIC, base_url: str = "") -> Attempt:
    key = Key("k", provider, base_url, "sk-ant-secret", True, 1, frozenset(), "k")
    return Attempt(target=Target(provider, "claude", 0, 1, ()), key=key)


def test_messages_requests_carry_the_key_in_x_api_key_and_anthropic_headers() -> None:
    app = {
        "authorization": "Bearer kp-client",
        "x-api-key": "kp-client",
        "anthropic-beta": "prompt-caching-2024-07-31",
        "openai-beta": "assistants=v2",
        "x-request-id": "r1",
    }
    req = messages_request_builder(MESSAGES_PATH)(_attempt(), app)
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers == {
        "content-type": "application/json",
        "anthropic-beta": "prompt-caching-2024-07-31",
        "anthropic-version": "2023-06-01",  # the API refuses a request without one
        "x-request-id": "r1",
        "x-api-key": "sk-ant-secret",
    }
    assert "sk-ant-secret" not in repr(req)
    counted = messages_request_builder(COUNT_TOKENS_PATH)(
        _attempt(base_url="http://127.0.0.1:9/v1/"), {"anthropic-version": "2024-01-01"}
    )
    assert counted.url == "http://127.0.0.1:9/v1/messages/count_tokens"
    assert counted.headers["anthropic-version"] == "2024-01-01"


def test_only_anthropic_keys_serve_the_messages_api() -> None:
    with pytest.raises(UpstreamConfigError):
        messages_request_builder(MESSAGES_PATH)(_attempt(Provider.OPENAI), {})


@pytest.mark.parametrize(
    ("error", "status", "type_"),
    [
        (errors.invalid_request("bad JSON"), 400, "invalid_request_error"),
        (errors.invalid_api_key(), 401, "authentication_error"),
        (errors.model_not_found("m"), 404, "not_found_error"),
        (errors.method_not_allowed("GET", "/v1/messages"), 405, "invalid_request_error"),
        (errors.body_too_large(10), 413, "request_too_large"),
        (errors.bad_gateway(), 502, "api_error"),
        (errors.no_usable_key("m"), 503, "api_error"),
        (errors.upstream_timeout(), 504, "timeout_error"),
        (errors.not_ready(), 503, "api_error"),
    ],
)
def test_own_errors_in_anthropics_shape(error: errors.ErrorResponse, status: int, type_: str) -> None:
    shaped = anthropic_errors.from_openai(error)
    body = json.loads(shaped.body)
    assert shaped.status == status
    assert body == {"type": "error", "error": {"type": type_, "message": json.loads(error.body)["error"]["message"]}}


@pytest.mark.parametrize(
    ("chunks", "found"),
    [
        ([b'event: ping\ndata: {"type":"ping"}\n\n'], [None]),
        (
            [b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'],
            ["overloaded_error"],
        ),
        # Split across chunks, the type in the next one.
        (
            [b'data: {"type":"ping"}\n\neve', b'nt: error\ndata: {"type":"error","error":{"type":"api_error"}}'],
            [None, "api_error"],
        ),
        ([b"data: {}\n\nevent: error\n", b'data: {"type":"error","error":{"type":"api_error"}}\n\n'], ["error"]),
        # Text that merely mentions it is no event.
        ([b'data: {"delta":{"text":"an event: error here"}}\n\n'], [None]),
    ],
)
def test_error_events_are_spotted_in_a_stream(chunks: list[bytes], found: list[str | None]) -> None:
    watch = anthropic_errors.ErrorEventWatch()
    seen = []
    for chunk in chunks:
        told = watch.seen(chunk)
        seen.append(told)
        if told is not None:
            break
    assert seen == found
