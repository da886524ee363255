"""Exhausted keys: out of credits or quota (pure: no I/O, no clock of its own).

A key whose account ran out of money or quota cannot serve any model until
someone pays (or the quota period turns), so it is benched key-wide, for a
long and growing period, instead of cooled per (key, model) for seconds.
This module holds what that needs and nothing else:

- the providers' wordings that mean "exhausted" (``EXHAUSTION_MARKERS``),
  matched against the error fields of a body by ``classify_response``;
- ``provider_reason``: the provider's message made fit for a health reason
  (``keyplane health show``): anything that looks like a key, a masked key
  fragment or a long opaque id is cut out, and the text is bounded;
- ``bench_period``: how long a (re-)bench lasts, doubling from an initial
  period up to a cap;
- ``probe_due``: whether the control plane's background recovery probe
  should try a benched key now.
"""

from __future__ import annotations

import re

__all__ = [
    "EXHAUSTION_MARKERS",
    "MAX_PROVIDER_REASON",
    "bench_period",
    "probe_due",
    "provider_reason",
]

# (needle, label): needles are matched case-insensitively against the JSON
# error fields of a 4xx body (or its raw text). The sources, as the providers
# send them (see tests/health/bodies.py):
EXHAUSTION_MARKERS: tuple[tuple[str, str], ...] = (
    # OpenAI 429 {"type": "insufficient_quota", "code": "insufficient_quota"} ("You exceeded your
    # current quota, please check your plan and billing details."); Azure OpenAI passes it on.
    ("insufficient_quota", "insufficient_quota"),
    # OpenAI 400 {"code": "billing_hard_limit_reached", "message": "Billing hard limit has been reached"}.
    ("billing_hard_limit_reached", "billing hard limit"),
    ("billing hard limit has been reached", "billing hard limit"),
    # Anthropic 400 invalid_request_error "Your credit balance is too low to access the Anthropic API. ..."
    ("credit balance is too low", "credit balance too low"),
    # OpenRouter 402 "Insufficient credits. Add more using https://openrouter.ai/settings/credits" and
    # "This request requires more credits, or fewer max_tokens. ..." / "More credits are required ...".
    ("insufficient credits", "insufficient credits"),
    ("requires more credits", "insufficient credits"),
    ("more credits are required", "insufficient credits"),
    # DeepSeek 402 {"message": "Insufficient Balance", "type": "unknown_error", ...}.
    ("insufficient balance", "insufficient balance"),
    # Together 402 {"type": "credit_limit", "message": "Credit limit exceeded. ..."}. Its 429 rate
    # limit carries type credit_limit too, so the message decides, not the type.
    ("credit limit exceeded", "credit limit exceeded"),
    # Gemini "Your prepayment credits are depleted. Please go to AI Studio ..." (429 RESOURCE_EXHAUSTED).
    ("prepayment credits are depleted", "prepayment credits depleted"),
    # Azure AI services gateway 403 "Out of call volume quota. Quota will be replenished in 5.03:23:11".
    ("out of call volume quota", "out of call volume quota"),
    # xAI (OpenAI-compatible) 429/403 "Your team ... has either used all available credits or reached
    # its monthly spending limit. ..."
    ("used all available credits", "credits used up"),
    ("reached its monthly spending limit", "monthly spending limit"),
)

MAX_PROVIDER_REASON = 160  # characters of the provider's message kept in a reason

# Cut out of provider messages: anything with a '*' (masked keys: "sk-abc***wxyz"), key-like
# tokens (sk-..., gsk_..., xai-..., AIza...), and long opaque runs (org/team/request ids, keys).
_SECRETISH = re.compile(
    r"\S*\*\S*"
    r"|\b(?:sk|pk|rk|gsk|xai|csk|key)[-_][A-Za-z0-9_\-]{6,}"
    r"|\bAIza[0-9A-Za-z_\-]{10,}"
    r"|[A-Za-z0-9_\-]{24,}"
)
_SPACES = re.compile(r"\s+")


def provider_reason(message: str | None) -> str:
    """The provider's message fit for a health reason: no key material, no
    long ids, printable, one line, at most MAX_PROVIDER_REASON characters.
    Empty when there is nothing left."""
    if not message:
        return ""
    text = message[: MAX_PROVIDER_REASON * 4]
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = _SECRETISH.sub("[redacted]", text)
    text = _SPACES.sub(" ", text).strip()
    if len(text) > MAX_PROVIDER_REASON:
        text = text[: MAX_PROVIDER_REASON - 3].rstrip() + "..."
    return text


def bench_period(previous: float | None, initial: float, maximum: float) -> float:
    """How long a bench lasts: ``initial`` the first time; each bench that
    follows one that ended without recovery doubles the ``previous`` one,
    never beyond ``maximum``."""
    if previous is None or not previous > 0:
        return min(initial, maximum)
    return min(max(previous * 2.0, initial), maximum)


def probe_due(until: float | None, now: float, lead: float) -> bool:
    """A key benched until ``until`` is probed from ``lead`` seconds before
    the bench ends, so that a failed probe extends the bench before any
    app traffic would try the key again."""
    return until is not None and now >= until - lead
