"""Table-driven classification of real provider responses."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from keyplane.health import Classification, ErrorClass, classify_exception, classify_response, stream_broken
from tests.health import bodies

NOW = 1_700_000_000.0

C = ErrorClass.CREDENTIAL
R = ErrorClass.RATE_LIMITED
U = ErrorClass.UPSTREAM_ERROR
X = ErrorClass.CLIENT_ERROR
S = ErrorClass.SUCCESS

# (id, status, headers, body, class, reason, retry_after)
CASES: list[tuple[str, int, dict[str, str], bytes, ErrorClass, str, float | None]] = [
    ("ok", 200, {}, b'{"id":"chatcmpl-1"}', S, "200 ok", None),
    ("ok-201", 201, {}, b"", S, "201 ok", None),
    # OpenAI
    ("openai-401-invalid_api_key", 401, {}, bodies.OPENAI_INVALID_API_KEY, C, "401 invalid_api_key", None),
    (
        "openai-429-rate_limit_exceeded",
        429,
        {
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "18.642s",
            "x-ratelimit-remaining-tokens": "0",
        },
        bodies.OPENAI_RATE_LIMIT_EXCEEDED,
        R,
        "429 rate limited",
        18.642,
    ),
    (
        "openai-429-insufficient_quota",
        429,
        {},
        bodies.OPENAI_INSUFFICIENT_QUOTA,
        ErrorClass.EXHAUSTED,
        "429 insufficient_quota: You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, read the docs: https://platform.openai.com/d...",
        None,
    ),
    (
        "openai-400-context_length_exceeded",
        400,
        {},
        bodies.OPENAI_CONTEXT_LENGTH_EXCEEDED,
        X,
        "400 context_length_exceeded",
        None,
    ),
    # Anthropic
    (
        "anthropic-401-authentication_error",
        401,
        {},
        bodies.ANTHROPIC_AUTHENTICATION_ERROR,
        C,
        "401 authentication_error",
        None,
    ),
    (
        "anthropic-429-rate_limit_error",
        429,
        {"retry-after": "7", "anthropic-ratelimit-requests-reset": "2023-11-14T22:20:00Z"},
        bodies.ANTHROPIC_RATE_LIMIT_ERROR,
        R,
        "429 rate limited",
        7.0,
    ),
    ("anthropic-529-overloaded_error", 529, {}, bodies.ANTHROPIC_OVERLOADED_ERROR, U, "529 overloaded", None),
    (
        "anthropic-400-invalid_request_error",
        400,
        {},
        bodies.ANTHROPIC_PROMPT_TOO_LONG,
        X,
        "400 invalid_request_error",
        None,
    ),
    ("anthropic-404-not_found_error", 404, {}, bodies.ANTHROPIC_NOT_FOUND, X, "404 not_found_error", None),
    # Gemini: the invalid key hides in a 400.
    ("gemini-400-API_KEY_INVALID", 400, {}, bodies.GEMINI_API_KEY_INVALID, C, "400 API key not valid", None),
    ("gemini-400-API-Key-not-found", 400, {}, bodies.GEMINI_API_KEY_NOT_FOUND, C, "400 API key not valid", None),
    (
        "gemini-400-reason-only",
        400,
        {},
        bodies.GEMINI_API_KEY_INVALID_REASON_ONLY,
        C,
        "400 API key not valid",
        None,
    ),
    (
        "gemini-429-RESOURCE_EXHAUSTED-retryDelay",
        429,
        {},
        bodies.GEMINI_RESOURCE_EXHAUSTED,
        R,
        "429 rate limited",
        26.0,
    ),
    ("gemini-429-RESOURCE_EXHAUSTED", 429, {}, bodies.GEMINI_RESOURCE_EXHAUSTED_SHORT, R, "429 rate limited", None),
    (
        "gemini-403-RESOURCE_EXHAUSTED",
        403,
        {},
        bodies.GEMINI_RESOURCE_EXHAUSTED_SHORT,
        R,
        "403 RESOURCE_EXHAUSTED",
        None,
    ),
    ("gemini-400-INVALID_ARGUMENT", 400, {}, bodies.GEMINI_INVALID_ARGUMENT, X, "400 INVALID_ARGUMENT", None),
    # Azure OpenAI
    (
        "azure-401-invalid-subscription-key",
        401,
        {},
        bodies.AZURE_INVALID_SUBSCRIPTION_KEY,
        C,
        "401 invalid subscription key",
        None,
    ),
    # OpenRouter
    ("openrouter-401-no-auth", 401, {}, bodies.OPENROUTER_NO_AUTH, C, "401 no auth credentials", None),
    ("openrouter-401-user-not-found", 401, {}, bodies.OPENROUTER_USER_NOT_FOUND, C, "401 user not found", None),
    # Invalid-key markers under other 4xx codes are still credential failures.
    ("openai-invalid_api_key-under-404", 404, {}, bodies.OPENAI_INVALID_API_KEY, C, "404 invalid_api_key", None),
    ("gemini-invalid-key-under-422", 422, {}, bodies.GEMINI_API_KEY_INVALID, C, "422 API key not valid", None),
    (
        "quota-under-400",
        400,
        {},
        bodies.OPENAI_INSUFFICIENT_QUOTA_CODE_NULL,
        ErrorClass.EXHAUSTED,
        "400 insufficient_quota: You exceeded your current quota, please check your plan and billing details.",
        None,
    ),
    ("402-payment-required", 402, {"retry-after": "60"}, b"{}", ErrorClass.EXHAUSTED, "402 payment required", 60.0),
    # Bare statuses
    ("401-empty", 401, {}, b"", C, "401 unauthorized", None),
    ("403-html", 403, {}, b"<html>Forbidden</html>", C, "403 forbidden", None),
    (
        "500",
        500,
        {},
        b'{"error":{"message":"The server had an error","type":"server_error"}}',
        U,
        "500 upstream error",
        None,
    ),
    ("502-html", 502, {}, b"<html><body>Bad Gateway</body></html>", U, "502 upstream error", None),
    ("503-retry-after", 503, {"Retry-After": "3"}, b"", U, "503 upstream error", 3.0),
    ("429-no-body", 429, {}, b"", R, "429 rate limited", None),
    ("422-plain", 422, {}, b"unprocessable", X, "422 client error", None),
    ("413-html", 413, {}, b"<html>Request Entity Too Large</html>", X, "413 client error", None),
    ("302-redirect", 302, {}, b"", U, "302 unexpected status", None),
]


@pytest.mark.parametrize(
    ("status", "headers", "body", "error_class", "reason", "retry_after"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify_response_table(
    status: int,
    headers: dict[str, str],
    body: bytes,
    error_class: ErrorClass,
    reason: str,
    retry_after: float | None,
) -> None:
    got = classify_response(status, headers, body, now=NOW)
    assert got.error_class is error_class
    assert got.status == status
    assert got.reason == reason
    if retry_after is None:
        assert got.retry_after is None
    else:
        assert got.retry_after == pytest.approx(retry_after)


def test_reason_never_echoes_the_body() -> None:
    got = classify_response(401, {}, bodies.OPENAI_INVALID_API_KEY, now=NOW)
    assert "sk-" not in got.reason and "wjh3" not in got.reason
    secret_code = b'{"error":{"code":"sk-live-abcdefghijklmnop","message":"nope"}}'
    assert "sk-" not in classify_response(418, {}, secret_code, now=NOW).reason
    mixed_case_key = b'{"error":{"code":"AIzaSyD3adBeefCafe0123456789abcdefghij","message":"bad"}}'
    assert classify_response(400, {}, mixed_case_key, now=NOW).reason == "400 client error"


def test_headers_case_insensitive_dict_and_multidict() -> None:
    for headers in (
        {"RETRY-AFTER": "4"},
        {"Retry-After": "4"},
        CIMultiDictProxy(CIMultiDict([("Retry-After", "4")])),
    ):
        assert classify_response(429, headers, b"", now=NOW).retry_after == 4.0


def test_body_scan_is_capped_at_64_kib() -> None:
    padding = b" " * (64 * 1024)
    assert classify_response(400, {}, padding + b"invalid_api_key", now=NOW).error_class is X
    assert classify_response(400, {}, b"invalid_api_key" + padding, now=NOW).error_class is C


def test_truncated_or_non_json_body_falls_back_to_raw_text() -> None:
    truncated = bodies.GEMINI_API_KEY_INVALID[:120]
    assert classify_response(400, {}, truncated, now=NOW).error_class is C
    assert classify_response(400, {}, b"\xff\xfe not utf-8 API key not valid", now=NOW).error_class is C
    assert classify_response(400, {}, b"[1, 2", now=NOW).error_class is X


def test_context_length_never_penalises() -> None:
    got = classify_response(400, {}, bodies.OPENAI_CONTEXT_LENGTH_EXCEEDED, now=NOW)
    assert not got.penalises and not got.retry_same_provider


@pytest.mark.parametrize(
    ("error_class", "retry_same_provider", "penalises"),
    [
        (S, False, False),
        (C, True, True),
        (R, True, True),
        (U, True, True),
        (X, False, False),
        (ErrorClass.STREAM_BROKEN, False, True),
        (ErrorClass.EXHAUSTED, True, True),
    ],
)
def test_classification_properties(error_class: ErrorClass, retry_same_provider: bool, penalises: bool) -> None:
    got = Classification(error_class, 0, "x")
    assert got.retry_same_provider is retry_same_provider
    assert got.penalises is penalises


def test_exceptions_and_broken_streams() -> None:
    assert classify_exception("timeout") == Classification(U, 0, "timeout")
    assert classify_exception("connect") == Classification(U, 0, "connect error")
    # Each way of getting no usable answer keeps its own reason (distinct in reports).
    reasons = {kind: classify_exception(kind).reason for kind in ("tls", "malformed", "cut", "too_large")}
    assert reasons == {
        "tls": "tls error",
        "malformed": "malformed answer",
        "cut": "answer cut off",
        "too_large": "answer too large",
    }
    assert stream_broken() == Classification(ErrorClass.STREAM_BROKEN, 0, "stream broken")
    assert stream_broken("peer closed").reason == "peer closed"


def test_text_outside_the_error_fields_never_marks_a_key_invalid() -> None:
    # An OpenAI-compatible server echoing the request back: the prompt text is not an error field.
    echoed = (
        b'{"error":{"message":"Invalid value for \'temperature\'","type":"invalid_request_error",'
        b'"param":"temperature","code":"invalid_value"},"echo":{"prompt":"why is my API key not valid?"}}'
    )
    got = classify_response(400, {}, echoed, now=NOW)
    assert got.error_class is X
    assert got.reason == "400 invalid_value"


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":"Invalid API key"}',
        b'{"detail":"Invalid API key"}',
        b'{"detail":[{"loc":["header","authorization"],"msg":"invalid api key","type":"value_error"}]}',
        b'{"message":"API key not valid. Please pass a valid API key."}',
    ],
    ids=["error-string", "fastapi-detail", "fastapi-detail-list", "top-level-message"],
)
def test_other_json_shapes_of_invalid_keys(body: bytes) -> None:
    assert classify_response(400, {}, body, now=NOW).error_class is C


def test_401_is_always_credential_even_with_quota_words() -> None:
    got = classify_response(401, {}, b'{"error":{"message":"insufficient_quota"}}', now=NOW)
    assert got.error_class is C
    assert got.reason == "401 unauthorized"


def test_a_nodes_own_failures_do_not_count_against_the_key() -> None:
    from keyplane.health.classify import counts_against_key

    for error_class in ErrorClass:
        on_key = counts_against_key(error_class, on_node=False)
        on_node = counts_against_key(error_class, on_node=True)
        assert on_key, error_class  # without a node, everything is the key's
        # On a node: connect errors, timeouts, 5xx and cut streams are the node's;
        # credentials, rate limits, exhaustion and client errors stay the key's.
        assert on_node is (error_class not in (ErrorClass.UPSTREAM_ERROR, ErrorClass.STREAM_BROKEN)), error_class
