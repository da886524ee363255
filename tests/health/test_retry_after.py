"""parse_retry_after: Retry-After (seconds, HTTP-date), retry-after-ms, OpenAI and Anthropic reset headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keyplane.health import parse_retry_after
from keyplane.health._retry_after import parse_duration

# 2023-11-14T22:13:20Z
NOW = 1_700_000_000.0
NOW_ISO = datetime.fromtimestamp(NOW, UTC)

CASES: list[tuple[str, dict[str, str], float | None]] = [
    ("nothing", {}, None),
    ("retry-after-seconds", {"Retry-After": "2"}, 2.0),
    ("retry-after-fraction", {"retry-after": "1.5"}, 1.5),
    ("retry-after-http-date", {"Retry-After": "Tue, 14 Nov 2023 22:13:50 GMT"}, 30.0),
    ("retry-after-http-date-past", {"Retry-After": "Tue, 14 Nov 2023 22:00:00 GMT"}, 0.0),
    ("retry-after-garbage", {"Retry-After": "soon"}, None),
    ("retry-after-negative", {"Retry-After": "-5"}, None),
    ("retry-after-nan", {"Retry-After": "nan"}, None),
    ("retry-after-huge-clamped", {"Retry-After": "86400"}, 3600.0),
    ("retry-after-ms", {"retry-after-ms": "250"}, 0.25),
    ("retry-after-ms-wins", {"retry-after-ms": "1500", "Retry-After": "2"}, 1.5),
    ("retry-after-ms-garbage-falls-back", {"retry-after-ms": "x", "Retry-After": "2"}, 2.0),
    # OpenAI reset headers: Go durations.
    ("openai-1s", {"x-ratelimit-reset-requests": "1s"}, 1.0),
    ("openai-6m0s", {"x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    ("openai-20ms", {"x-ratelimit-reset-requests": "20ms"}, 0.02),
    ("openai-1h2m3.5s-clamped", {"x-ratelimit-reset-tokens": "1h2m3.5s"}, 3600.0),
    ("openai-2m3.5s", {"x-ratelimit-reset-tokens": "2m3.5s"}, 123.5),
    ("openai-largest", {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
    (
        "openai-exhausted-limit-wins",
        {
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-tokens": "6m0s",
            "x-ratelimit-remaining-tokens": "149984",
        },
        1.0,
    ),
    ("openai-garbage", {"x-ratelimit-reset-requests": "1 second"}, None),
    ("openai-one-garbage-one-good", {"x-ratelimit-reset-requests": "abc", "x-ratelimit-reset-tokens": "2s"}, 2.0),
    ("retry-after-beats-reset", {"Retry-After": "3", "x-ratelimit-reset-tokens": "6m0s"}, 3.0),
    # Anthropic reset headers: RFC 3339.
    ("anthropic-requests-reset", {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25Z"}, 5.0),
    (
        "anthropic-offset",
        {"anthropic-ratelimit-tokens-reset": "2023-11-14T23:13:30+01:00"},
        10.0,
    ),
    (
        "anthropic-largest",
        {
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25Z",
            "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:14:20Z",
            "anthropic-ratelimit-output-tokens-reset": "2023-11-14T22:13:40Z",
        },
        60.0,
    ),
    (
        "anthropic-exhausted-limit-wins",
        {
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25Z",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:20Z",
            "anthropic-ratelimit-tokens-remaining": "79500",
        },
        5.0,
    ),
    ("anthropic-past", {"anthropic-ratelimit-requests-reset": "2023-11-14T22:00:00Z"}, 0.0),
    ("anthropic-naive-rejected", {"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25"}, None),
    ("anthropic-garbage", {"anthropic-ratelimit-tokens-reset": "tomorrow"}, None),
    (
        "retry-after-beats-anthropic",
        {"retry-after": "7", "anthropic-ratelimit-tokens-reset": "2023-11-14T22:14:20Z"},
        7.0,
    ),
]


@pytest.mark.parametrize(("headers", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("1.574s", 1.574),
        ("250us", 0.00025),
        ("3", 3.0),
        ("", None),
        ("s", None),
        ("1x", None),
        ("1s 2s", None),
        ("-1s", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    got = parse_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


def test_now_is_the_only_clock() -> None:
    headers = {"anthropic-ratelimit-requests-reset": NOW_ISO.isoformat()}
    assert parse_retry_after(headers, now=NOW) == 0.0
    assert parse_retry_after(headers, now=NOW - 42) == pytest.approx(42.0)
