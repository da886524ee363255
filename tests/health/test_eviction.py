"""Bounded memory: idle eviction and the hard cap."""

from __future__ import annotations

from keyplane.domain import HealthState, Provider
from keyplane.health import Classification, ErrorClass, HealthBook, HealthPolicy, KeyScope, Outcome, ProviderScope

T0 = 1_700_000_000.0


def fail(key: str, model: str = "m", kind: ErrorClass = ErrorClass.UPSTREAM_ERROR, final: bool = False) -> Outcome:
    retry_after = 1000.0 if kind is ErrorClass.RATE_LIMITED else None
    return Outcome(key, Provider.OPENAI, model, Classification(kind, 0, kind.value, retry_after), final)


def test_hard_cap_bounds_memory_under_10x_distinct_scopes() -> None:
    max_entries = 50
    book = HealthBook(HealthPolicy(max_entries=max_entries))
    for i in range(10 * max_entries):
        book.record(fail(f"k{i}", f"m{i % 7}", final=i % 3 == 0), T0 + i * 0.001)
        assert len(book) <= max_entries
    assert book.evict(T0 + 1) == 0
    assert len(book) <= max_entries


def test_idle_healthy_entries_are_evicted_after_idle_ttl() -> None:
    book = HealthBook(HealthPolicy(idle_ttl=900.0))
    book.record(fail("idle"), T0)  # below threshold: tracked, healthy
    book.record(fail("busy"), T0)
    book.record(fail("busy"), T0 + 800)  # touched again later
    assert len(book) == 2
    assert book.evict(T0 + 899) == 0
    assert book.evict(T0 + 900) == 1
    assert book.verdict(KeyScope("busy", "m"), T0 + 900).state is HealthState.HEALTHY
    assert len(book) == 1
    assert book.evict(T0 + 1700) == 1
    assert len(book) == 0


def test_idle_eviction_keeps_unhealthy_and_unexpired_cooldowns() -> None:
    book = HealthBook(HealthPolicy(idle_ttl=10.0, provider_threshold=1))
    book.record(fail("dead", kind=ErrorClass.CREDENTIAL), T0)
    book.record(fail("slow", kind=ErrorClass.RATE_LIMITED), T0)  # cooldown until T0 + 1000
    book.record(fail("p", final=True), T0)  # provider DEGRADED until T0 + 30
    book.record(fail("idle"), T0)
    # At T0+100: the idle entry, the provider (cooldown over) and the key "p" entry go; the rest stays.
    assert book.evict(T0 + 100) == 3
    assert not book.key_usable("dead", "m", T0 + 100)
    assert not book.key_usable("slow", "m", T0 + 100)
    assert book.verdict(ProviderScope(Provider.OPENAI, "m"), T0 + 100).state is HealthState.HEALTHY
    # Once the cooldown is over, it is idle and healthy: evicted. UNHEALTHY never is by idleness.
    assert book.evict(T0 + 2000) == 1
    assert [c.scope for c in book.unhealthy(T0 + 2000)] == [KeyScope("dead", "")]


def test_cap_evicts_healthy_before_unhealthy_or_cooling() -> None:
    book = HealthBook(HealthPolicy(max_entries=10))
    for i in range(3):
        book.record(fail(f"dead{i}", kind=ErrorClass.CREDENTIAL), T0)
        book.record(fail(f"cool{i}", kind=ErrorClass.RATE_LIMITED), T0)
    for i in range(100):  # newer, but healthy
        book.record(fail(f"h{i}"), T0 + 1 + i)
        assert len(book) <= 10
    for i in range(3):
        assert not book.key_usable(f"dead{i}", "m", T0 + 200)
        assert not book.key_usable(f"cool{i}", "m", T0 + 200)


def test_cap_evicts_oldest_unhealthy_when_nothing_else_is_left() -> None:
    book = HealthBook(HealthPolicy(max_entries=10))
    for i in range(25):
        book.record(fail(f"dead{i}", kind=ErrorClass.CREDENTIAL), T0 + i)
        assert len(book) <= 10
    alive = {c.scope for c in book.unhealthy(T0 + 100)}
    assert KeyScope("dead24", "") in alive  # the newest survive
    assert KeyScope("dead0", "") not in alive
    # The per-key index follows evictions: an evicted key has nothing to reset.
    assert book.reset_key("dead0") == []


def test_touching_an_entry_protects_it_from_lru_eviction() -> None:
    # A high threshold keeps "keep" healthy (so evictable) while it counts errors; it only trips if
    # it was never evicted, because eviction would have thrown its count away.
    book = HealthBook(HealthPolicy(max_entries=100, error_threshold=502, error_window=10_000.0))
    book.record(fail("keep"), T0)
    for i in range(500):
        book.record(fail(f"h{i}"), T0 + 1 + i)
        assert book.record(fail("keep"), T0 + 1 + i + 0.5) == []
        assert len(book) <= 100
    (change,) = book.record(fail("keep"), T0 + 502)
    assert change.scope == KeyScope("keep", "m")
    assert change.verdict.state is HealthState.COOLDOWN
