"""HealthBook: an exhausted key is benched key-wide, for a long and growing period."""

from __future__ import annotations

from keyplane.domain import HealthState, Provider
from keyplane.health import (
    Classification,
    ErrorClass,
    HealthBook,
    HealthChange,
    HealthPolicy,
    KeyScope,
    Outcome,
    Verdict,
    classify_response,
)
from tests.health import bodies

T0 = 1_700_000_000.0
EXHAUSTED = HealthState.EXHAUSTED
REASON = "402 insufficient balance: Insufficient Balance"


def exhausted(model: str = "deepseek-chat", key: str = "k1") -> Outcome:
    return Outcome(
        key_id=key,
        provider=Provider.OPENAI_COMPATIBLE,
        model=model,
        classification=classify_response(402, {}, bodies.DEEPSEEK_INSUFFICIENT_BALANCE, now=T0),
        provider_final=False,
    )


def success(model: str = "deepseek-chat", key: str = "k1") -> Outcome:
    return Outcome(key, Provider.OPENAI_COMPATIBLE, model, Classification(ErrorClass.SUCCESS, 200, "200 ok"), False)


def test_one_exhausted_answer_benches_the_key_for_every_model() -> None:
    book = HealthBook(HealthPolicy(exhausted_bench=300.0))
    changes = book.record(exhausted(), T0)
    assert changes == [HealthChange(KeyScope("k1", ""), Verdict(EXHAUSTED, T0 + 300.0, REASON))]
    for model in ("deepseek-chat", "deepseek-reasoner", "anything"):
        assert not book.key_usable("k1", model, T0 + 299.0)
    assert book.key_usable("k2", "deepseek-chat", T0 + 1.0)
    # A success on one model (an attempt that began earlier) does not end a key-wide bench.
    assert book.record(success(), T0 + 1.0) == []
    assert not book.key_usable("k1", "deepseek-chat", T0 + 2.0)
    assert [c.scope for c in book.unhealthy(T0 + 2.0)] == [KeyScope("k1", "")]


def test_attempts_in_flight_do_not_extend_the_bench() -> None:
    book = HealthBook(HealthPolicy(exhausted_bench=300.0))
    book.record(exhausted(), T0)
    assert book.record(exhausted("deepseek-reasoner"), T0 + 5.0) == []
    assert book.verdict(KeyScope("k1", ""), T0 + 6.0).until == T0 + 300.0


def test_each_bench_after_an_expired_one_doubles_up_to_the_cap() -> None:
    book = HealthBook(HealthPolicy(exhausted_bench=300.0, exhausted_max_bench=1000.0))
    now = T0
    lengths = []
    for _ in range(4):
        (change,) = book.record(exhausted(), now)
        assert change.verdict.until is not None
        lengths.append(change.verdict.until - now)
        now = change.verdict.until + 1.0  # the bench ran out, then the key failed again
    assert lengths == [300.0, 600.0, 1000.0, 1000.0]


def test_growth_carries_over_a_bench_learnt_from_elsewhere() -> None:
    book = HealthBook(HealthPolicy(exhausted_bench=300.0))
    book.record(exhausted(key="other"), T0)  # the book's clock is T0
    book.apply(HealthChange(KeyScope("k1", ""), Verdict(EXHAUSTED, T0 + 1200.0, REASON)))
    (change,) = book.record(exhausted(), T0 + 1300.0)
    assert change.verdict.until == T0 + 1300.0 + 2400.0


def test_a_credential_failure_outranks_exhaustion_and_a_reset_clears_both() -> None:
    book = HealthBook()
    credential = Outcome("k1", Provider.OPENAI, "m", Classification(ErrorClass.CREDENTIAL, 401, "401 x"), False)
    book.record(credential, T0)
    assert book.record(exhausted(), T0 + 1.0) == []
    assert book.verdict(KeyScope("k1", ""), T0 + 2.0).state is HealthState.UNHEALTHY
    book.reset_key("k1")
    book.record(exhausted(), T0 + 3.0)
    assert book.verdict(KeyScope("k1", ""), T0 + 4.0).state is EXHAUSTED
    (healthy,) = book.reset_key("k1")
    assert healthy.verdict.state is HealthState.HEALTHY
    assert book.key_usable("k1", "m", T0 + 5.0)
