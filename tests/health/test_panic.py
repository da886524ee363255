"""The panic policy as tables: no servers, no clock (keyplane.health.panic)."""

from __future__ import annotations

import pytest

from keyplane.domain import Provider
from keyplane.health.panic import (
    Block,
    Candidate,
    NoUsableKey,
    PanicPolicy,
    Probe,
    RateLimited,
    WaitForProbe,
    WaitForRecovery,
    block_from_reason,
    decide,
    honest_answer,
)

NOW = 1_000_000.0
POLICY = PanicPolicy(probe_wait=2.0, max_rate_limit_wait=10.0, min_attempt_budget=0.5)
OPENAI, ANTHROPIC = Provider.OPENAI, Provider.ANTHROPIC


def cand(
    key: str,
    block: Block | None,
    until: float | None = None,
    since: float = float("-inf"),
    provider: Provider = OPENAI,
    model: str = "m",
) -> Candidate:
    return Candidate(provider, key, model, block, NOW + until if until is not None else None, since)


def run(
    candidates: list[Candidate],
    *,
    time_left: float = 30.0,
    probing: tuple[tuple[str, str], ...] = (),
    tried: tuple[tuple[str, str], ...] = (),
    probe_wait_left: float = POLICY.probe_wait,
    rate_limit_wait_left: float = POLICY.max_rate_limit_wait,
    policy: PanicPolicy = POLICY,
) -> object:
    return decide(
        candidates,
        now=NOW,
        time_left=time_left,
        probing=set(probing),
        tried=set(tried),
        probe_wait_left=probe_wait_left,
        rate_limit_wait_left=rate_limit_wait_left,
        policy=policy,
    )


@pytest.mark.parametrize(
    ("state", "reason", "block"),
    [
        ("cooldown", "500 upstream error", Block.COOLING),
        ("cooldown", "timeout", Block.COOLING),
        ("cooldown", "stream broken: cut", Block.COOLING),
        ("cooldown", "529 overloaded", Block.COOLING),
        ("cooldown", "429 rate limited", Block.RATE_LIMITED),
        ("cooldown", "rate limited", Block.RATE_LIMITED),
        ("unhealthy", "401 invalid_api_key", Block.CREDENTIALS),
        ("exhausted", "402 payment required", Block.EXHAUSTED),
        ("cooldown", "402 payment required", Block.EXHAUSTED),
        ("cooldown", "429 insufficient_quota", Block.EXHAUSTED),
        ("cooldown", "400 credit balance too low", Block.EXHAUSTED),
    ],
)
def test_block_from_reason(state: str, reason: str, block: Block) -> None:
    assert block_from_reason(state, reason) is block


def test_probe_goes_to_the_earliest_cooldown_end() -> None:
    decision = run([cand("a", Block.COOLING, until=8), cand("b", Block.COOLING, until=3)])
    assert decision == Probe(cand("b", Block.COOLING, until=3))


def test_equal_ends_probe_the_least_recently_failed() -> None:
    old = cand("old", Block.COOLING, until=5, since=NOW - 50)
    new = cand("new", Block.COOLING, until=5, since=NOW - 1)
    assert run([new, old]) == Probe(old)


def test_one_probe_per_key_and_model_then_the_next_candidate() -> None:
    a, b = cand("a", Block.COOLING, until=1), cand("b", Block.COOLING, until=2)
    assert run([a, b], probing=(a.slot,)) == Probe(b)


def test_every_candidate_probed_elsewhere_waits_for_a_probe_within_the_deadline() -> None:
    a = cand("a", Block.COOLING, until=1)
    assert run([a], probing=(a.slot,)) == WaitForProbe((a.slot,), 2.0)
    # The deadline (minus the budget an attempt needs) bounds the wait.
    assert run([a], probing=(a.slot,), time_left=1.5) == WaitForProbe((a.slot,), 1.0)


def test_waiting_spent_or_no_time_left_gives_the_honest_answer() -> None:
    a = cand("a", Block.COOLING, until=4)
    # No Retry-After: cooling keys are probed all along, the next request may find one recovered.
    expected = NoUsableKey(Block.COOLING, ((OPENAI, Block.COOLING),))
    assert run([a], probing=(a.slot,), probe_wait_left=0.0) == expected
    assert run([a], time_left=0.4) == expected


def test_a_key_this_request_already_tried_is_not_probed_again() -> None:
    a = cand("a", Block.COOLING, until=4)
    assert run([a], tried=(a.slot,)) == NoUsableKey(Block.COOLING, ((OPENAI, Block.COOLING),))


def test_panic_off_answers_at_once_with_the_cooldowns_end() -> None:
    a = cand("a", Block.COOLING, until=4)
    assert run([a], policy=PanicPolicy(enabled=False)) == NoUsableKey(Block.COOLING, ((OPENAI, Block.COOLING),), 4.0)


@pytest.mark.parametrize("block", [Block.CREDENTIALS, Block.EXHAUSTED, Block.DISABLED])
def test_permanent_blocks_are_never_probed_or_waited_for(block: Block) -> None:
    decision = run([cand("a", block), cand("b", block)])
    assert decision == NoUsableKey(block, ((OPENAI, block),))
    assert isinstance(decision, NoUsableKey) and not decision.retryable


def test_rate_limited_waits_for_the_earliest_recovery_inside_the_budget() -> None:
    decision = run([cand("a", Block.RATE_LIMITED, until=7), cand("b", Block.RATE_LIMITED, until=3)])
    assert decision == WaitForRecovery(3.0)


def test_rate_limited_beyond_the_budget_or_deadline_is_a_429_with_the_earliest_recovery() -> None:
    limited = [cand("a", Block.RATE_LIMITED, until=20), cand("b", Block.RATE_LIMITED, until=12)]
    assert run(limited) == RateLimited(12.0, (OPENAI,))
    soon = [cand("a", Block.RATE_LIMITED, until=3)]
    assert run(soon, time_left=3.2) == RateLimited(3.0, (OPENAI,))  # 3 + 0.5 to spare > 3.2
    assert run(soon, rate_limit_wait_left=2.0) == RateLimited(3.0, (OPENAI,))
    assert run(soon, policy=PanicPolicy(max_rate_limit_wait=0.0), rate_limit_wait_left=0.0) == RateLimited(
        3.0, (OPENAI,)
    )


def test_a_mix_probes_the_cooling_key_before_waiting_for_the_rate_limited_one() -> None:
    cooling = cand("c", Block.COOLING, until=30)
    limited = cand("r", Block.RATE_LIMITED, until=2)
    assert run([limited, cooling, cand("x", Block.CREDENTIALS)]) == Probe(cooling)
    assert run([limited, cooling], tried=(cooling.slot,)) == WaitForRecovery(2.0)


def test_honest_answer_names_every_provider_with_its_own_reason() -> None:
    answer = honest_answer(
        [
            cand("o1", Block.CREDENTIALS),
            cand("o2", Block.DISABLED),
            cand("a1", Block.EXHAUSTED, provider=ANTHROPIC),
            cand("", Block.NO_KEYS, provider=Provider.GEMINI),
        ],
        now=NOW,
    )
    assert answer == NoUsableKey(
        Block.CREDENTIALS,
        ((OPENAI, Block.CREDENTIALS), (ANTHROPIC, Block.EXHAUSTED), (Provider.GEMINI, Block.NO_KEYS)),
    )


def test_honest_answer_prefers_the_temporary_block_that_ends_first() -> None:
    limited_first = honest_answer(
        [cand("o1", Block.RATE_LIMITED, until=5), cand("a1", Block.COOLING, until=9, provider=ANTHROPIC)], now=NOW
    )
    assert limited_first == RateLimited(5.0, (OPENAI,))
    cooling_first = honest_answer(
        [cand("o1", Block.RATE_LIMITED, until=9), cand("a1", Block.COOLING, until=5, provider=ANTHROPIC)], now=NOW
    )
    assert cooling_first == NoUsableKey(Block.COOLING, ((OPENAI, Block.RATE_LIMITED), (ANTHROPIC, Block.COOLING)), 5.0)


def test_a_provider_with_a_usable_key_is_not_named() -> None:
    answer = honest_answer([cand("o1", None), cand("a1", Block.CREDENTIALS, provider=ANTHROPIC)], now=NOW)
    assert answer == NoUsableKey(Block.CREDENTIALS, ((ANTHROPIC, Block.CREDENTIALS),))


def test_policy_rejects_negative_times() -> None:
    with pytest.raises(ValueError):
        PanicPolicy(probe_wait=-1)
