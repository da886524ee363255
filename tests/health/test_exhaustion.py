"""Exhausted keys: every provider's real "out of credits or quota" answer is
EXHAUSTED (and their look-alike rate limits are not), reasons carry the
provider's words without key material, and benches grow to a cap."""

from __future__ import annotations

import pytest

from keyplane.health import ErrorClass, classify_response
from keyplane.health.exhaustion import MAX_PROVIDER_REASON, bench_period, probe_due, provider_reason
from tests.health import bodies

NOW = 1_700_000_000.0
E = ErrorClass.EXHAUSTED
R = ErrorClass.RATE_LIMITED

# (id, status, headers, body, class, reason)
CASES: list[tuple[str, int, dict[str, str], bytes, ErrorClass, str]] = [
    (
        "openai-429-insufficient_quota-code-null",
        429,
        {"x-request-id": "req_1"},
        bodies.OPENAI_INSUFFICIENT_QUOTA_CODE_NULL,
        E,
        "429 insufficient_quota: You exceeded your current quota, please check your plan and billing details.",
    ),
    (
        "openai-400-billing_hard_limit_reached",
        400,
        {},
        bodies.OPENAI_BILLING_HARD_LIMIT,
        E,
        "400 billing hard limit: Billing hard limit has been reached",
    ),
    (
        "anthropic-400-credit-balance-too-low",
        400,
        {"request-id": "req_011CbrFTcXhtiMzr3s6EocF7"},
        bodies.ANTHROPIC_CREDIT_BALANCE_TOO_LOW,
        E,
        "400 credit balance too low: Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits.",
    ),
    (
        "gemini-429-prepayment-credits-depleted",
        429,
        {},
        bodies.GEMINI_PREPAYMENT_CREDITS_DEPLETED,
        E,
        "429 prepayment credits depleted: Your prepayment credits are depleted. Please go to AI Studio at "
        "https://ai.studio/projects to manage your project and billing.",
    ),
    (
        "azure-403-out-of-call-volume-quota",
        403,
        {},
        bodies.AZURE_OUT_OF_CALL_VOLUME_QUOTA,
        E,
        "403 out of call volume quota: Out of call volume quota. Quota will be replenished in 22.14:18:12.",
    ),
    (
        "azure-429-insufficient_quota",
        429,
        {"x-ms-region": "East US"},
        bodies.OPENAI_INSUFFICIENT_QUOTA,
        E,
        "429 insufficient_quota: You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, read the docs: https://platform.openai.com/d...",
    ),
    (
        "openrouter-402-never-purchased",
        402,
        {},
        bodies.OPENROUTER_INSUFFICIENT_CREDITS,
        E,
        "402 insufficient credits: Insufficient credits. This account never purchased credits. Make sure your key "
        "is on the correct account or org, and if so, purchase more at https://openrout...",
    ),
    (
        "openrouter-402-metadata",
        402,
        {},
        bodies.OPENROUTER_INSUFFICIENT_CREDITS_METADATA,
        E,
        "402 insufficient credits: Insufficient credits. Add more using https://openrouter.ai/settings/credits",
    ),
    (
        "openrouter-402-max-tokens",
        402,
        {},
        bodies.OPENROUTER_MORE_CREDITS_FOR_MAX_TOKENS,
        E,
        "402 insufficient credits: This request requires more credits, or fewer max_tokens. You requested up to "
        "65536 tokens, but can only afford 3395. To increase, visit https://openrouter.ai...",
    ),
    (
        "together-402-credit-limit",
        402,
        {},
        bodies.TOGETHER_CREDIT_LIMIT_EXCEEDED,
        E,
        "402 credit limit exceeded: Credit limit exceeded. Please navigate to "
        "https://api.together.xyz/settings/billing to add credit or upgrade your plan.",
    ),
    (
        "deepseek-402-insufficient-balance",
        402,
        {},
        bodies.DEEPSEEK_INSUFFICIENT_BALANCE,
        E,
        "402 insufficient balance: Insufficient Balance",
    ),
    (
        "xai-429-credits-used-up",
        429,
        {},
        bodies.XAI_CREDITS_USED_UP,
        E,
        "429 credits used up: Your team [redacted] has either used all available credits or reached its monthly "
        "spending limit. To continue making API requests, please purchase more credi...",
    ),
    # Look-alikes that are rate limits: a cooldown honouring the wait, never a long key-wide bench.
    ("gemini-429-resource-exhausted", 429, {}, bodies.GEMINI_RESOURCE_EXHAUSTED, R, "429 rate limited"),
    ("azure-429-token-rate-limit", 429, {"retry-after": "7"}, bodies.AZURE_TOKEN_RATE_LIMIT, R, "429 rate limited"),
    ("groq-429-tokens-per-day", 429, {"retry-after": "578"}, bodies.GROQ_TOKENS_PER_DAY, R, "429 rate limited"),
    (
        "together-429-credit_limit-type",
        429,
        {},
        bodies.TOGETHER_RATE_LIMITED_CREDIT_LIMIT_TYPE,
        R,
        "429 rate limited",
    ),
    ("mistral-429-rate-limited", 429, {}, bodies.MISTRAL_RATE_LIMITED, R, "429 rate limited"),
    ("mistral-429-service-tier-capacity", 429, {}, bodies.MISTRAL_SERVICE_TIER_CAPACITY, R, "429 rate limited"),
]


@pytest.mark.parametrize(
    ("status", "headers", "body", "error_class", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_provider_wordings(
    status: int, headers: dict[str, str], body: bytes, error_class: ErrorClass, reason: str
) -> None:
    got = classify_response(status, headers, body, now=NOW)
    assert got.error_class is error_class
    assert got.reason == reason
    assert len(got.reason) <= 200  # what a report may carry (keyplane.convert.MAX_REASON_CHARS)
    if error_class is E:
        assert got.retry_same_provider and got.penalises


def test_waits_are_kept_for_rate_limits_and_exhaustion() -> None:
    assert classify_response(429, {"retry-after": "578"}, bodies.GROQ_TOKENS_PER_DAY, now=NOW).retry_after == 578.0
    assert classify_response(402, {"retry-after": "60"}, b"{}", now=NOW).retry_after == 60.0


def test_credential_failures_outrank_billing_words() -> None:
    body = b'{"error":{"message":"Incorrect API key provided: sk-ab***yz. Insufficient credits."}}'
    assert classify_response(401, {}, body, now=NOW).error_class is ErrorClass.CREDENTIAL
    assert classify_response(400, {}, body, now=NOW).error_class is ErrorClass.CREDENTIAL


def test_402_without_a_known_wording_and_non_json_bodies() -> None:
    got = classify_response(402, {}, b'{"error":{"message":"Payment Required","code":402}}', now=NOW)
    assert (got.error_class, got.reason) == (E, "402 payment required: Payment Required")
    got = classify_response(402, {}, b"402 Insufficient Balance", now=NOW)
    assert (got.error_class, got.reason) == (E, "402 insufficient balance: 402 Insufficient Balance")


@pytest.mark.parametrize(
    ("message", "kept", "gone"),
    [
        ("Incorrect API key provided: sk-VKMIs*******wjh3. Insufficient credits", "Insufficient credits", "wjh3"),
        ("key sk-proj-abcdefgh12345678 has no credits", "has no credits", "abcdefgh"),
        ("key AIzaSyD3adBeefCafe0123456789abcdefghij has no credits", "has no credits", "AIza"),
        ("org org-XXXXXXXXXXXXXXXXXXXXXXXX is out of credits", "out of credits", "XXXXXXXX"),
        ("team c03b3526-bed4-49ed-8bd7-f20ef8830383 spent it all", "spent it all", "c03b3526"),
        ("gsk_0123456789abcdef out of quota", "out of quota", "gsk_"),
    ],
)
def test_provider_reason_cuts_key_material(message: str, kept: str, gone: str) -> None:
    got = provider_reason(message)
    assert kept in got and gone not in got and "[redacted]" in got


def test_provider_reason_is_one_bounded_printable_line() -> None:
    got = provider_reason("Out of credits.\n\x00Top up: " + "word " * 200)
    assert got.startswith("Out of credits. Top up: word") and got.endswith("...")
    assert len(got) == MAX_PROVIDER_REASON and got.isprintable()
    assert provider_reason(None) == provider_reason("") == provider_reason(" \n ") == ""


def test_bench_period_doubles_to_the_cap() -> None:
    periods = [bench_period(None, 300.0, 3600.0)]
    for _ in range(6):
        periods.append(bench_period(periods[-1], 300.0, 3600.0))
    assert periods == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0]
    assert bench_period(1.0, 300.0, 3600.0) == 300.0  # never shorter than the first bench
    assert bench_period(None, 300.0, 60.0) == 60.0  # the cap wins over the initial period
    assert bench_period(0.0, 300.0, 3600.0) == 300.0


def test_probe_is_due_from_the_lead_before_the_bench_ends() -> None:
    assert not probe_due(NOW + 100.0, NOW, 15.0)
    assert probe_due(NOW + 15.0, NOW, 15.0)
    assert probe_due(NOW - 1.0, NOW, 15.0)
    assert not probe_due(None, NOW, 15.0)
