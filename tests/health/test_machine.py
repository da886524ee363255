"""HealthBook rules, each as a table or a scenario with an explicit clock."""

from __future__ import annotations

import pytest

from keyplane.domain import HealthState, Provider
from keyplane.health import (
    Classification,
    ErrorClass,
    HealthBook,
    HealthChange,
    HealthPolicy,
    KeyScope,
    Outcome,
    ProviderScope,
    Verdict,
)

OPENAI = Provider.OPENAI
GEMINI = Provider.GEMINI
T0 = 1_700_000_000.0

HEALTHY = HealthState.HEALTHY
COOLDOWN = HealthState.COOLDOWN
UNHEALTHY = HealthState.UNHEALTHY
DEGRADED = HealthState.DEGRADED

_REASONS = {
    ErrorClass.SUCCESS: "200 ok",
    ErrorClass.CREDENTIAL: "400 API key not valid",
    ErrorClass.RATE_LIMITED: "429 rate limited",
    ErrorClass.UPSTREAM_ERROR: "500 upstream error",
    ErrorClass.CLIENT_ERROR: "400 context_length_exceeded",
    ErrorClass.STREAM_BROKEN: "stream broken",
}


def outcome(
    kind: ErrorClass,
    key: str = "k1",
    model: str = "A",
    *,
    provider: Provider = OPENAI,
    final: bool = False,
    recovered: bool = False,
    retry_after: float | None = None,
) -> Outcome:
    return Outcome(
        key_id=key,
        provider=provider,
        model=model,
        classification=Classification(kind, 0, _REASONS[kind], retry_after),
        provider_final=final,
        recovered=recovered,
    )


def key_change(key: str, model: str, state: HealthState, until: float | None, reason: str) -> HealthChange:
    return HealthChange(KeyScope(key, model), Verdict(state, until, reason))


def provider_change(
    provider: Provider, model: str, state: HealthState, until: float | None, reason: str
) -> HealthChange:
    return HealthChange(ProviderScope(provider, model), Verdict(state, until, reason))


# -- credential ------------------------------------------------------------------------------


def test_credential_is_key_wide_and_lasts_until_reset() -> None:
    book = HealthBook()
    changes = book.record(outcome(ErrorClass.CREDENTIAL, model="A"), T0)
    assert changes == [key_change("k1", "", UNHEALTHY, None, "400 API key not valid")]
    for model in ("A", "B", ""):
        assert not book.key_usable("k1", model, T0)
    assert book.key_usable("k2", "A", T0)
    # Time does not heal it, nor a success that slipped through, nor a repeat (no duplicate change).
    later = T0 + 10 * 86400
    assert book.record(outcome(ErrorClass.SUCCESS, model="A"), later) == []
    assert book.record(outcome(ErrorClass.CREDENTIAL, model="B"), later) == []
    assert not book.key_usable("k1", "B", later)
    assert book.verdict(KeyScope("k1", ""), later) == Verdict(UNHEALTHY, None, "400 API key not valid")
    # Only an admin reset heals it.
    assert book.reset_key("k1") == [key_change("k1", "", HEALTHY, None, "")]
    assert book.key_usable("k1", "A", later)
    assert book.reset_key("k1") == []


# -- rate limits -----------------------------------------------------------------------------


def test_rate_limit_is_per_model_and_ends_after_retry_after() -> None:
    book = HealthBook()
    changes = book.record(outcome(ErrorClass.RATE_LIMITED, model="A", retry_after=2.0), T0)
    assert changes == [key_change("k1", "A", COOLDOWN, T0 + 2, "429 rate limited")]
    assert not book.key_usable("k1", "A", T0 + 1.9)
    assert book.key_usable("k1", "B", T0 + 0.1)  # model B untouched
    assert book.verdict(KeyScope("k1", ""), T0) == Verdict(HEALTHY, None, "")  # never key-wide
    assert book.key_usable("k1", "A", T0 + 2.0)  # cooldown over
    assert book.verdict(KeyScope("k1", "A"), T0 + 2.0).state is HEALTHY


@pytest.mark.parametrize(
    ("retry_afters", "expected_waits"),
    [
        ([None, None, None, None], [5.0, 10.0, 20.0, 40.0]),
        ([None] * 8, [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]),  # capped at max_cooldown
        ([3.0, None, 7.0], [3.0, 10.0, 7.0]),  # Retry-After wins; the default still doubles underneath
        ([0.0], [0.0]),
    ],
)
def test_rate_limit_default_doubles_per_consecutive_429(
    retry_afters: list[float | None], expected_waits: list[float]
) -> None:
    book = HealthBook()
    now = T0
    for retry_after, wait in zip(retry_afters, expected_waits, strict=True):
        changes = book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=retry_after), now)
        assert changes == [key_change("k1", "A", COOLDOWN, now + wait, "429 rate limited")]
        now += wait + 1  # the next 429 comes after the cooldown


def test_success_resets_the_rate_limit_backoff() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.RATE_LIMITED), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED), T0 + 6)  # 10 s
    assert book.record(outcome(ErrorClass.SUCCESS), T0 + 20) == [key_change("k1", "A", HEALTHY, None, "")]
    assert book.record(outcome(ErrorClass.RATE_LIMITED), T0 + 30) == [
        key_change("k1", "A", COOLDOWN, T0 + 35, "429 rate limited")
    ]


def test_success_drops_what_it_clears_and_leaves_the_rest() -> None:
    """A success empties its scopes out of the book (a healthy entry holds nothing
    a missing one does not), so a healthy fleet's book stays empty; other keys,
    models and key-wide verdicts stay."""
    book = HealthBook()
    book.record(outcome(ErrorClass.RATE_LIMITED, "k1", "A"), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED, "k2", "A"), T0)
    book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k1", "B", final=True), T0)
    book.record(outcome(ErrorClass.CREDENTIAL, "k3", "A"), T0)
    entries = len(book)
    assert book.record(outcome(ErrorClass.SUCCESS, "k9", "C"), T0 + 1) == []  # nothing known of k9 or C
    assert len(book) == entries
    assert book.record(outcome(ErrorClass.SUCCESS, "k3", "A"), T0 + 1) == []  # a key-wide verdict stays
    assert not book.key_usable("k3", "A", T0 + 1)
    assert book.record(outcome(ErrorClass.SUCCESS, "k1", "A"), T0 + 1) == [key_change("k1", "A", HEALTHY, None, "")]
    assert len(book) == entries - 1
    assert not book.key_usable("k2", "A", T0 + 1)  # another key of the same model keeps its cooldown
    # k1/B and the provider's window for B: a success on B clears both, silently (neither had tripped).
    assert book.record(outcome(ErrorClass.SUCCESS, "k1", "B"), T0 + 1) == []
    assert len(book) == entries - 3
    book.record(outcome(ErrorClass.SUCCESS, "k2", "A"), T0 + 1)
    assert [c.scope for c in book.unhealthy(T0 + 1)] == [KeyScope("k3", "")]
    assert len(book) == 1
    book.reset_key("k3")
    assert len(book) == 0


def test_a_success_that_began_before_a_cooldown_does_not_end_it() -> None:
    """Retry-After is honoured: a request that started before another one's 429
    and succeeded after it says nothing about the key now."""
    book = HealthBook()
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=30), T0 + 1.0)
    # Began 0.5 s before the 429 was folded in: the cooldown stands, nothing changes.
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 1.2, started=T0 + 0.5) == []
    assert not book.key_usable("k1", "A", T0 + 1.2)
    # A success that began after it (a probe, or a sidecar that had not heard yet) ends it.
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 2.0, started=T0 + 1.5) == [
        key_change("k1", "A", HEALTHY, None, "")
    ]
    assert book.key_usable("k1", "A", T0 + 2.0)
    # Without a start time a success ends it, as before (older sidecars send none).
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=30), T0 + 3.0)
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 3.1) == [key_change("k1", "A", HEALTHY, None, "")]


def test_a_longer_429_moves_the_line_and_an_expired_cooldown_ends_with_any_success() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=10), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=20), T0 + 5.0)  # extends: set again at T0 + 5
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 6.0, started=T0 + 4.0) == []
    # Past ``until`` (half-open) even an old success ends it: nothing is active to honour.
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 26.0, started=T0 + 4.0) == [
        key_change("k1", "A", HEALTHY, None, "")
    ]


def test_a_degraded_provider_is_not_healed_by_a_success_that_began_before() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1))
    [degraded] = [
        c for c in book.record(outcome(ErrorClass.UPSTREAM_ERROR, final=True), T0) if isinstance(c.scope, ProviderScope)
    ]
    assert degraded.verdict.state is DEGRADED
    changes = book.record(outcome(ErrorClass.SUCCESS, key="k2", final=True), T0 + 0.1, started=T0 - 0.2)
    assert changes == []
    assert book.provider_degraded(OPENAI, "A", T0 + 0.1)
    changes = book.record(outcome(ErrorClass.SUCCESS, key="k2", final=True), T0 + 0.3, started=T0 + 0.2)
    assert changes == [provider_change(OPENAI, "A", HEALTHY, None, "")]


def test_apply_sets_the_line_at_the_latest_time_seen() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.SUCCESS), T0 + 10.0)  # the clock the book has seen
    book.apply(key_change("k1", "A", COOLDOWN, T0 + 60.0, "429 rate limited"))
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 11.0, started=T0 + 9.0) == []
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0 + 12.0, started=T0 + 10.5) == [
        key_change("k1", "A", HEALTHY, None, "")
    ]


def test_shorter_rate_limit_never_shortens_a_cooldown() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=30.0), T0)
    assert book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=1.0), T0 + 1) == []
    assert not book.key_usable("k1", "A", T0 + 29)
    assert book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=60.0), T0 + 2) == [
        key_change("k1", "A", COOLDOWN, T0 + 62, "429 rate limited")
    ]


# -- upstream errors: window, threshold, cooldown, half-open ----------------------------------


@pytest.mark.parametrize("kind", [ErrorClass.UPSTREAM_ERROR, ErrorClass.STREAM_BROKEN])
def test_error_threshold_cooldown_half_open_and_heal(kind: ErrorClass) -> None:
    book = HealthBook()  # window 60 s, threshold 3, base 10 s
    reason = _REASONS[kind]
    assert book.record(outcome(kind), T0) == []
    assert book.record(outcome(kind), T0 + 1) == []
    assert book.key_usable("k1", "A", T0 + 1)  # below threshold: nothing
    # At the threshold: cooldown for base_cooldown.
    assert book.record(outcome(kind), T0 + 2) == [key_change("k1", "A", COOLDOWN, T0 + 12, reason)]
    assert not book.key_usable("k1", "A", T0 + 11.9)
    assert book.key_usable("k1", "B", T0 + 5)
    assert book.key_usable("k1", "", T0 + 5)  # key-wide untouched
    # Failures still in flight during the cooldown do not extend it.
    assert book.record(outcome(kind), T0 + 5) == []
    # After `until`: half-open, usable again, reads HEALTHY.
    assert book.key_usable("k1", "A", T0 + 12)
    assert book.verdict(KeyScope("k1", "A"), T0 + 12) == Verdict(HEALTHY, None, "half-open")
    assert book.unhealthy(T0 + 12) == []
    # The probe fails: re-trip at once with the doubled cooldown.
    assert book.record(outcome(kind), T0 + 13) == [key_change("k1", "A", COOLDOWN, T0 + 33, reason)]
    # Next probe fails again: doubled again.
    assert book.record(outcome(kind), T0 + 34) == [key_change("k1", "A", COOLDOWN, T0 + 74, reason)]
    # The next probe succeeds: HEALTHY, and the doubling starts over.
    assert book.record(outcome(ErrorClass.SUCCESS), T0 + 75) == [key_change("k1", "A", HEALTHY, None, "")]
    assert book.record(outcome(kind), T0 + 80) == []
    assert book.record(outcome(kind), T0 + 81) == []
    assert book.record(outcome(kind), T0 + 82) == [key_change("k1", "A", COOLDOWN, T0 + 92, reason)]


def test_error_cooldown_is_capped() -> None:
    book = HealthBook(HealthPolicy(error_threshold=1, base_cooldown=100.0, max_cooldown=250.0))
    now = T0
    untils = []
    for _ in range(4):
        (change,) = book.record(outcome(ErrorClass.UPSTREAM_ERROR), now)
        assert change.verdict.until is not None
        untils.append(change.verdict.until - now)
        now = change.verdict.until + 1
    assert untils == [100.0, 200.0, 250.0, 250.0]


def test_errors_outside_the_sliding_window_do_not_trip() -> None:
    book = HealthBook()  # window 60 s, threshold 3
    for t in (0, 30, 61, 92, 123):  # never 3 within 60 s
        assert book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0 + t) == []
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0 + 124) == [
        key_change("k1", "A", COOLDOWN, T0 + 134, "500 upstream error")
    ]


def test_success_clears_the_error_window() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0)
    book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0 + 1)
    assert book.record(outcome(ErrorClass.SUCCESS), T0 + 2) == []  # was healthy: no transition
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0 + 3) == []
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0 + 4) == []


def test_errors_are_per_key_and_model() -> None:
    book = HealthBook()
    for i, (key, model) in enumerate([("k1", "A"), ("k1", "B"), ("k2", "A"), ("k1", "A"), ("k1", "B"), ("k2", "A")]):
        assert book.record(outcome(ErrorClass.UPSTREAM_ERROR, key, model), T0 + i) == []
    assert book.key_usable("k1", "A", T0 + 6)


# -- client errors ---------------------------------------------------------------------------


def test_client_error_changes_nothing() -> None:
    book = HealthBook(HealthPolicy(error_threshold=1, provider_threshold=1))
    for final in (False, True):
        assert book.record(outcome(ErrorClass.CLIENT_ERROR, final=final), T0) == []
    assert len(book) == 0
    assert book.key_usable("k1", "A", T0)
    assert not book.provider_degraded(OPENAI, "A", T0)
    # Nor does it heal or reset anything.
    book.record(outcome(ErrorClass.UPSTREAM_ERROR), T0)
    assert book.record(outcome(ErrorClass.CLIENT_ERROR, final=True), T0 + 1) == []
    assert not book.key_usable("k1", "A", T0 + 1)


# -- provider health -------------------------------------------------------------------------


def test_same_provider_recovery_never_touches_provider_health() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1))
    for i in range(20):
        now = T0 + i
        # key 1 fails, key 2 of the same provider recovers the request.
        changes = book.record(outcome(ErrorClass.UPSTREAM_ERROR, f"k{i}", final=False, recovered=True), now)
        assert all(isinstance(c.scope, KeyScope) for c in changes)
        book.record(outcome(ErrorClass.SUCCESS, "good", final=True), now)
    assert not book.provider_degraded(OPENAI, "A", T0 + 20)
    assert book.verdict(ProviderScope(OPENAI, "A"), T0 + 20) == Verdict(HEALTHY, None, "")


def test_provider_counts_only_final_failures_then_degrades_half_opens_and_heals() -> None:
    book = HealthBook()  # provider window 60, threshold 3, cooldown 30
    scope_reason = "500 upstream error"
    # Non-final failures are ignored however many.
    for i in range(5):
        book.record(outcome(ErrorClass.UPSTREAM_ERROR, f"x{i}", model="M", final=False), T0)
    assert not book.provider_degraded(OPENAI, "M", T0)
    # Final failures count (any penalising class).
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k1", "M", final=True), T0 + 1) == []
    assert book.record(outcome(ErrorClass.RATE_LIMITED, "k2", "M", final=True, retry_after=1), T0 + 2) == [
        key_change("k2", "M", COOLDOWN, T0 + 3, "429 rate limited")
    ]
    changes = book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k3", "M", final=True), T0 + 3)
    assert changes == [provider_change(OPENAI, "M", DEGRADED, T0 + 33, scope_reason)]
    assert book.provider_degraded(OPENAI, "M", T0 + 32)
    assert not book.provider_degraded(OPENAI, "other-model", T0 + 5)
    assert not book.provider_degraded(GEMINI, "M", T0 + 5)
    # Half-open after until; the next final failure re-trips with the doubled cooldown.
    assert not book.provider_degraded(OPENAI, "M", T0 + 33)
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k4", "M", final=True), T0 + 40) == [
        provider_change(OPENAI, "M", DEGRADED, T0 + 100, scope_reason)
    ]
    # Any success heals it, even one that is not the request's last attempt on the provider.
    assert book.record(outcome(ErrorClass.SUCCESS, "k5", "M", final=False), T0 + 50) == [
        provider_change(OPENAI, "M", HEALTHY, None, "")
    ]
    assert not book.provider_degraded(OPENAI, "M", T0 + 50)


def test_credential_failure_at_the_end_counts_for_the_provider() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1))
    changes = book.record(outcome(ErrorClass.CREDENTIAL, final=True), T0)
    assert changes == [
        key_change("k1", "", UNHEALTHY, None, "400 API key not valid"),
        provider_change(OPENAI, "A", DEGRADED, T0 + 30, "400 API key not valid"),
    ]


def test_recovered_flag_wins_over_provider_final() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1))
    assert book.record(outcome(ErrorClass.UPSTREAM_ERROR, final=True, recovered=True), T0) == []
    assert not book.provider_degraded(OPENAI, "A", T0)


def test_provider_cooldown_is_capped() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1, provider_cooldown=200.0, max_cooldown=300.0))
    (first,) = book.record(outcome(ErrorClass.UPSTREAM_ERROR, final=True), T0)
    assert first.verdict.until == T0 + 200
    (second,) = book.record(outcome(ErrorClass.UPSTREAM_ERROR, final=True), T0 + 201)
    assert second.verdict.until == T0 + 201 + 300


# -- transitions only ------------------------------------------------------------------------


def test_only_transitions_are_returned() -> None:
    book = HealthBook()
    assert book.record(outcome(ErrorClass.SUCCESS, final=True), T0) == []  # healthy stays healthy
    assert len(book) == 0  # and costs no memory
    book.record(outcome(ErrorClass.CREDENTIAL), T0)
    assert book.record(outcome(ErrorClass.CREDENTIAL), T0 + 1) == []
    book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=10), T0)
    assert book.record(outcome(ErrorClass.RATE_LIMITED, retry_after=10), T0) == []  # same until


# -- apply / unhealthy / reset / forget ------------------------------------------------------


def test_apply_adopts_external_verdicts() -> None:
    book = HealthBook()
    book.apply(key_change("k1", "", UNHEALTHY, None, "401 invalid_api_key"))
    book.apply(key_change("k2", "A", COOLDOWN, T0 + 5, "429 rate limited"))
    book.apply(provider_change(GEMINI, "g", DEGRADED, T0 + 30, "500 upstream error"))
    assert not book.key_usable("k1", "anything", T0)
    assert not book.key_usable("k2", "A", T0 + 4)
    assert book.key_usable("k2", "B", T0)
    assert book.key_usable("k2", "A", T0 + 5)
    assert book.provider_degraded(GEMINI, "g", T0 + 29)
    # A local finding that agrees with an adopted verdict is not a new transition.
    assert book.record(outcome(ErrorClass.CREDENTIAL, "k1"), T0) == []
    # Adopting HEALTHY clears the scope.
    book.apply(key_change("k1", "", HEALTHY, None, ""))
    assert book.key_usable("k1", "A", T0)
    book.apply(provider_change(GEMINI, "g", HEALTHY, None, ""))
    assert not book.provider_degraded(GEMINI, "g", T0)
    assert [c.scope for c in book.unhealthy(T0)] == [KeyScope("k2", "A")]
    book.apply(key_change("k2", "A", HEALTHY, None, ""))
    assert len(book) == 0


def test_unhealthy_lists_the_bad_scopes_in_a_stable_order() -> None:
    book = HealthBook(HealthPolicy(provider_threshold=1))
    book.record(outcome(ErrorClass.RATE_LIMITED, "k2", "A", retry_after=5), T0)
    book.record(outcome(ErrorClass.CREDENTIAL, "k1", "A", provider=GEMINI, final=True), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED, "k3", "A", retry_after=1), T0)
    assert book.unhealthy(T0 + 2) == [
        key_change("k1", "", UNHEALTHY, None, "400 API key not valid"),
        key_change("k2", "A", COOLDOWN, T0 + 5, "429 rate limited"),
        provider_change(GEMINI, "A", DEGRADED, T0 + 30, "400 API key not valid"),
    ]
    assert book.unhealthy(T0 + 100) == [key_change("k1", "", UNHEALTHY, None, "400 API key not valid")]


def test_reset_key_clears_every_scope_of_the_key_only() -> None:
    book = HealthBook(HealthPolicy(error_threshold=1))
    book.record(outcome(ErrorClass.CREDENTIAL, "k1", "A"), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED, "k1", "B", retry_after=60), T0)
    book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k1", "C"), T0)
    book.record(outcome(ErrorClass.RATE_LIMITED, "k2", "B", retry_after=60), T0)
    assert book.reset_key("k1") == [
        key_change("k1", "", HEALTHY, None, ""),
        key_change("k1", "B", HEALTHY, None, ""),
        key_change("k1", "C", HEALTHY, None, ""),
    ]
    assert book.key_usable("k1", "B", T0 + 1)
    assert not book.key_usable("k2", "B", T0 + 1)
    assert len(book) == 1


def test_forget_key_drops_silently() -> None:
    book = HealthBook()
    book.record(outcome(ErrorClass.CREDENTIAL, "k1"), T0)
    book.record(outcome(ErrorClass.UPSTREAM_ERROR, "k1", "B"), T0)
    book.forget_key("k1")
    book.forget_key("never-seen")
    assert len(book) == 0
    assert book.reset_key("k1") == []


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="error_threshold"):
        HealthPolicy(error_threshold=0)
    with pytest.raises(ValueError, match="base_cooldown"):
        HealthPolicy(base_cooldown=0)
    with pytest.raises(ValueError, match="max_entries"):
        HealthPolicy(max_entries=0)


def test_deterministic_given_the_same_inputs() -> None:
    events = [
        (outcome(ErrorClass.UPSTREAM_ERROR, f"k{i % 3}", f"m{i % 2}", final=i % 4 == 0), T0 + i) for i in range(40)
    ]
    runs = []
    for _ in range(2):
        book = HealthBook()
        runs.append([book.record(o, t) for o, t in events] + [book.unhealthy(T0 + 40)])
    assert runs[0] == runs[1]
