"""Why a key is out, as the rescue reads it from both health books (pure, no servers)."""

from __future__ import annotations

from keyplane.domain import HealthState, Provider
from keyplane.health.classify import Classification, ErrorClass
from keyplane.health.machine import HealthChange, HealthPolicy, KeyScope, Outcome, Verdict
from keyplane.health.panic import Block
from sidecar.health import TenantHealth
from sidecar.rescue import key_block

NOW = 1_000_000.0
MODEL = "gpt-4o-mini"


def failure(cls: ErrorClass, reason: str, retry_after: float | None = None) -> Outcome:
    return Outcome("k1", Provider.OPENAI, MODEL, Classification(cls, 0, reason, retry_after), provider_final=False)


def test_usable_key_has_no_block() -> None:
    assert key_block(TenantHealth("t", HealthPolicy()), "k1", MODEL, NOW) is None


def test_errors_cool_the_key_with_the_time_of_the_trip() -> None:
    health = TenantHealth("t", HealthPolicy(error_threshold=1, base_cooldown=10))
    health.record(failure(ErrorClass.UPSTREAM_ERROR, "500 upstream error"), NOW)
    assert key_block(health, "k1", MODEL, NOW + 1) == (Block.COOLING, NOW + 10, NOW)
    assert key_block(health, "k1", MODEL, NOW + 10) is None  # over


def test_the_later_end_of_both_books_decides() -> None:
    health = TenantHealth("t", HealthPolicy(error_threshold=1, base_cooldown=10))
    health.record(failure(ErrorClass.UPSTREAM_ERROR, "500 upstream error"), NOW)
    pushed = HealthChange(KeyScope("k1", MODEL), Verdict(HealthState.COOLDOWN, NOW + 30, "429 rate limited"))
    health.apply_pushed(pushed)
    assert key_block(health, "k1", MODEL, NOW + 1) == (Block.RATE_LIMITED, NOW + 30, NOW)


def test_key_wide_verdicts_win() -> None:
    health = TenantHealth("t", HealthPolicy())
    health.record(failure(ErrorClass.CREDENTIAL, "401 invalid_api_key"), NOW)
    assert key_block(health, "k1", MODEL, NOW)[0] is Block.CREDENTIALS  # type: ignore[index]
    other = TenantHealth("t", HealthPolicy())
    exhausted = HealthChange(KeyScope("k1", ""), Verdict(HealthState.COOLDOWN, NOW + 3600, "402 payment required"))
    other.apply_pushed(exhausted)
    assert key_block(other, "k1", MODEL, NOW)[0] is Block.EXHAUSTED  # type: ignore[index]


def test_a_quota_429_is_exhaustion_not_a_rate_limit() -> None:
    health = TenantHealth("t", HealthPolicy())
    health.record(failure(ErrorClass.RATE_LIMITED, "429 insufficient_quota", 5.0), NOW)
    assert key_block(health, "k1", MODEL, NOW)[0] is Block.EXHAUSTED  # type: ignore[index]
