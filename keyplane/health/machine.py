"""The health state machine: outcomes in, verdict transitions out.

Pure and deterministic: every method that depends on time takes ``now`` (wall-clock
epoch seconds); nothing here does I/O or reads a clock. One ``HealthBook`` per tenant.

Scopes:
- ``KeyScope(key_id, "")``: key-wide: credential failures (UNHEALTHY until reset_key) and
  exhausted credits or quota (EXHAUSTED until ``until``, growing; see ``health.exhaustion``).
- ``KeyScope(key_id, model)``: rate limits, upstream errors and broken streams (COOLDOWN).
- ``ProviderScope(provider, model)``: end-to-end failures only (DEGRADED).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keyplane.domain import HealthState, Provider
from keyplane.health._entries import Entry, EntryTable
from keyplane.health.classify import Classification, ErrorClass
from keyplane.health.exhaustion import bench_period

__all__ = [
    "HealthBook",
    "HealthChange",
    "HealthPolicy",
    "KeyScope",
    "Outcome",
    "ProviderScope",
    "Scope",
    "Verdict",
]

_WINDOWED = frozenset({ErrorClass.UPSTREAM_ERROR, ErrorClass.STREAM_BROKEN})


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    error_window: float = 60.0  # sliding window for upstream errors per (key, model)
    error_threshold: int = 3  # errors in the window that trip a cooldown
    base_cooldown: float = 10.0  # first cooldown after errors; doubles per consecutive trip
    max_cooldown: float = 300.0
    rate_limit_default: float = 5.0  # 429 without Retry-After: doubles per consecutive 429, capped
    provider_window: float = 60.0  # end-to-end failures per (provider, model)
    provider_threshold: int = 3  # -> DEGRADED for provider_cooldown (doubling, capped), then half-open
    provider_cooldown: float = 30.0
    idle_ttl: float = 900.0  # entries untouched this long and healthy are evicted
    max_entries: int = 100_000  # hard cap: evict least recently touched healthy entries, then oldest
    exhausted_bench: float = 300.0  # first key-wide bench of an exhausted key; doubles per re-bench
    exhausted_max_bench: float = 3600.0  # cap on the doubling benches

    def __post_init__(self) -> None:
        for name in (
            "error_window",
            "base_cooldown",
            "max_cooldown",
            "rate_limit_default",
            "provider_window",
            "provider_cooldown",
            "idle_ttl",
            "exhausted_bench",
            "exhausted_max_bench",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"HealthPolicy.{name} must be > 0")
        for name in ("error_threshold", "provider_threshold", "max_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"HealthPolicy.{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One upstream attempt, as the sidecar reports it (mirror of the proto Outcome)."""

    key_id: str
    provider: Provider
    model: str  # upstream model
    classification: Classification
    provider_final: bool  # last attempt on this provider in the request
    recovered: bool = False  # a later attempt on the same provider recovered the request


@dataclass(frozen=True, slots=True)
class Verdict:
    """The current health of one scope."""

    state: HealthState
    until: float | None  # epoch seconds; None for HEALTHY/UNHEALTHY
    reason: str

    def active(self, now: float) -> bool:
        """Not healthy at ``now`` (a COOLDOWN/DEGRADED past ``until`` is over)."""
        return self.state is not HealthState.HEALTHY and (self.until is None or self.until > now)


HEALTHY = Verdict(HealthState.HEALTHY, None, "")
_HALF_OPEN = Verdict(HealthState.HEALTHY, None, "half-open")


@dataclass(frozen=True, slots=True)
class KeyScope:
    key_id: str
    model: str  # "" = key-wide


@dataclass(frozen=True, slots=True)
class ProviderScope:
    provider: Provider
    model: str


Scope = KeyScope | ProviderScope


@dataclass(frozen=True, slots=True)
class HealthChange:
    scope: Scope
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class _TripRule:
    """How a sliding-window breaker trips: (key, model) -> COOLDOWN, (provider, model) -> DEGRADED."""

    window: float
    threshold: int
    base_cooldown: float
    state: HealthState


def _backoff(base: float, exponent: int, cap: float) -> float:
    return min(base * (2.0 ** min(max(exponent, 0), 64)), cap)


class HealthBook:
    """Health of one tenant's keys and providers. Mutable, pure, deterministic given ``now``."""

    def __init__(self, policy: HealthPolicy = HealthPolicy()) -> None:
        self.policy = policy
        self._entries: EntryTable[Scope] = EntryTable(policy.max_entries)
        self._by_key: dict[str, set[KeyScope]] = {}
        self._clock = float("-inf")  # latest ``now`` seen; apply() has none of its own

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def verdict(self, scope: Scope, now: float) -> Verdict:
        """The scope's verdict at ``now``; an expired COOLDOWN/DEGRADED reads HEALTHY (half-open)."""
        entry = self._entries.get(scope)
        if entry is None or entry.state is HealthState.HEALTHY:
            return HEALTHY
        verdict = Verdict(entry.state, entry.until, entry.reason)
        return verdict if verdict.active(now) else _HALF_OPEN

    def key_usable(self, key_id: str, model: str, now: float) -> bool:
        """False if the key is bad key-wide or (key, model) is in an unexpired cooldown."""
        if not self._entries:
            return True  # the common case on the request path: nothing known against anything
        if self.verdict(KeyScope(key_id, ""), now).active(now):
            return False
        return not (model and self.verdict(KeyScope(key_id, model), now).active(now))

    def since(self, scope: Scope) -> float | None:
        """When the scope's current state was set (its last trip), if the book holds it."""
        entry = self._entries.get(scope)
        return entry.since if entry is not None else None

    def provider_degraded(self, provider: Provider, model: str, now: float) -> bool:
        if not self._entries:
            return False
        return self.verdict(ProviderScope(provider, model), now).active(now)

    def unhealthy(self, now: float) -> list[HealthChange]:
        """Every scope that is not healthy at ``now``, in a stable order."""
        found = [
            HealthChange(scope, self.verdict(scope, now))
            for scope, entry in self._entries.items()
            if entry.verdict_active(now)
        ]
        return sorted(found, key=_sort_key)

    # -- writing ---------------------------------------------------------------------------

    def record(self, outcome: Outcome, now: float, *, started: float | None = None) -> list[HealthChange]:
        """Fold one attempt in; return the transitions it caused (state or until changed).

        ``started``: when the attempt began (epoch seconds), if known. A success
        that began before a scope went into its current cooldown (or degraded
        state) does not end it: it answers a question asked before the 429 or
        the errors, so it says nothing about now, and the provider's
        Retry-After is honoured. (Several sidecars report the same key: a
        request that started just before another one's 429 often succeeds
        just after it.)"""
        self._clock = max(self._clock, now)
        changes: list[HealthChange] = []
        cls = outcome.classification
        kind = cls.error_class
        if kind is ErrorClass.CLIENT_ERROR:
            return changes
        if kind is ErrorClass.SUCCESS:
            # A success only clears what is known (and the entry with it: a healthy
            # entry holds nothing a missing one does not), so it never adds entries.
            if self._entries:
                if outcome.key_id in self._by_key:
                    self._succeed(KeyScope(outcome.key_id, outcome.model), now, started, changes)
                # Any success proves the provider serves the model.
                self._succeed(ProviderScope(outcome.provider, outcome.model), now, started, changes)
            return changes
        key_model = KeyScope(outcome.key_id, outcome.model)
        if kind is ErrorClass.CREDENTIAL:
            key_wide = KeyScope(outcome.key_id, "")
            entry = self._entry(key_wide, now, create=True)
            assert entry is not None
            self._set(key_wide, entry, HealthState.UNHEALTHY, None, cls.reason or "credential", now, changes)
        elif kind is ErrorClass.EXHAUSTED:
            self._exhaust(KeyScope(outcome.key_id, ""), cls, now, changes)
        elif kind is ErrorClass.RATE_LIMITED:
            self._rate_limit(key_model, cls, now, changes)
        elif kind in _WINDOWED:
            self._error(key_model, cls.reason or kind.value, now, changes)
        self._provider(outcome, now, changes)
        self._entries.enforce_cap(now, slack=True, on_evict=self._unindex)
        return changes

    def reset_key(self, key_id: str) -> list[HealthChange]:
        """Forget everything learnt about a key (admin re-enable/rotate/reset)."""
        changes = [
            HealthChange(scope, HEALTHY)
            for scope in self._by_key.get(key_id, set())
            if (entry := self._entries.get(scope)) is not None and entry.state is not HealthState.HEALTHY
        ]
        self.forget_key(key_id)
        return sorted(changes, key=_sort_key)

    def forget_key(self, key_id: str) -> None:
        """The key was deleted: drop all its entries silently."""
        for scope in self._by_key.pop(key_id, set()):
            self._entries.pop(scope)

    def apply(self, change: HealthChange) -> None:
        """Adopt a verdict learnt elsewhere (pushed by the control plane, or loaded from the store)."""
        scope, verdict = change.scope, change.verdict
        if verdict.state is HealthState.HEALTHY:
            if self._entries.pop(scope) is not None and isinstance(scope, KeyScope):
                self._unindex(scope)
            return
        entry = self._entry(scope, self._clock, create=True)
        assert entry is not None
        if entry.state is not verdict.state or entry.until != verdict.until:
            entry.since = self._clock
        entry.state, entry.until, entry.reason = verdict.state, verdict.until, verdict.reason

    def evict(self, now: float) -> int:
        """Drop entries idle for ``idle_ttl`` that are healthy now, then enforce ``max_entries``."""
        self._clock = max(self._clock, now)
        dropped = self._entries.drop_idle(now, now - self.policy.idle_ttl, on_evict=self._unindex)
        return dropped + self._entries.enforce_cap(now, slack=False, on_evict=self._unindex)

    # -- internals -------------------------------------------------------------------------

    def _unindex(self, scope: Scope) -> None:
        if isinstance(scope, KeyScope):
            scopes = self._by_key.get(scope.key_id)
            if scopes is not None:
                scopes.discard(scope)
                if not scopes:
                    del self._by_key[scope.key_id]

    def _entry(self, scope: Scope, now: float, *, create: bool) -> Entry | None:
        entry = self._entries.touch(scope, now, create=create)
        if entry is not None and isinstance(scope, KeyScope):
            self._by_key.setdefault(scope.key_id, set()).add(scope)
        return entry

    @staticmethod
    def _set(
        scope: Scope,
        entry: Entry,
        state: HealthState,
        until: float | None,
        reason: str,
        now: float,
        changes: list[HealthChange],
    ) -> None:
        changed = entry.state is not state or entry.until != until
        entry.state, entry.until, entry.reason = state, until, reason
        if changed:
            entry.since = now
            changes.append(HealthChange(scope, Verdict(state, until, reason)))

    def _succeed(self, scope: Scope, now: float, started: float | None, changes: list[HealthChange]) -> None:
        """Back to healthy: the transition if it was not, and the entry goes (its
        failure window, trips and rate-limit count all start over anyway) --
        unless the success began before the scope's active state was set."""
        entry = self._entries.get(scope)
        if entry is None:
            return
        if started is not None and started < entry.since and entry.verdict_active(now):
            return
        self._entries.pop(scope)
        self._unindex(scope)
        self._set(scope, entry, HealthState.HEALTHY, None, "", now, changes)

    def _rate_limit(self, scope: KeyScope, cls: Classification, now: float, changes: list[HealthChange]) -> None:
        policy = self.policy
        entry = self._entry(scope, now, create=True)
        assert entry is not None
        if cls.retry_after is not None:
            wait = max(cls.retry_after, 0.0)
        else:
            wait = _backoff(policy.rate_limit_default, entry.rate_limits, policy.max_cooldown)
        entry.rate_limits += 1
        until = now + wait
        if entry.state is HealthState.COOLDOWN and entry.until is not None and entry.until >= until:
            return  # already out for at least as long
        self._set(scope, entry, HealthState.COOLDOWN, until, cls.reason or "rate limited", now, changes)

    def _exhaust(self, scope: KeyScope, cls: Classification, now: float, changes: list[HealthChange]) -> None:
        """Bench the key for every model; a bench that follows an expired one doubles it."""
        entry = self._entry(scope, now, create=True)
        assert entry is not None
        if entry.state is HealthState.UNHEALTHY:
            return  # a credential failure outranks it (and lasts until an admin acts)
        previous: float | None = None
        if entry.state is HealthState.EXHAUSTED and entry.until is not None:
            if entry.until > now:
                return  # already benched: attempts that were in flight do not extend it
            if math.isfinite(entry.since):
                previous = entry.until - entry.since
        policy = self.policy
        until = now + bench_period(previous, policy.exhausted_bench, policy.exhausted_max_bench)
        self._set(scope, entry, HealthState.EXHAUSTED, until, cls.reason or "exhausted", now, changes)

    def _error(self, scope: KeyScope, reason: str, now: float, changes: list[HealthChange]) -> None:
        policy = self.policy
        entry = self._entry(scope, now, create=True)
        assert entry is not None
        rule = _TripRule(policy.error_window, policy.error_threshold, policy.base_cooldown, HealthState.COOLDOWN)
        self._trip(scope, entry, rule, reason, now, changes)

    def _provider(self, outcome: Outcome, now: float, changes: list[HealthChange]) -> None:
        scope = ProviderScope(outcome.provider, outcome.model)
        kind = outcome.classification.error_class
        if not outcome.provider_final or outcome.recovered:
            return  # a same-provider retry recovered it (or may still): never the provider's fault
        entry = self._entry(scope, now, create=True)
        assert entry is not None
        policy = self.policy
        reason = outcome.classification.reason or kind.value
        rule = _TripRule(
            policy.provider_window, policy.provider_threshold, policy.provider_cooldown, HealthState.DEGRADED
        )
        self._trip(scope, entry, rule, reason, now, changes)

    def _trip(
        self, scope: Scope, entry: Entry, rule: _TripRule, reason: str, now: float, changes: list[HealthChange]
    ) -> None:
        """Count a failure in the sliding window; trip (or re-trip when half-open) the scope."""
        state = rule.state
        if entry.state is state and entry.until is not None and entry.until > now:
            return  # already tripped: attempts that were in flight do not extend it
        half_open = entry.state is state and entry.trips > 0
        entry.record_failure(now, rule.window, rule.threshold)
        if not half_open and len(entry.failures) < rule.threshold:
            return
        entry.trips += 1
        entry.failures.clear()
        until = now + _backoff(rule.base_cooldown, entry.trips - 1, self.policy.max_cooldown)
        self._set(scope, entry, state, until, reason, now, changes)


def _sort_key(change: HealthChange) -> tuple[int, str, str]:
    scope = change.scope
    if isinstance(scope, KeyScope):
        return (0, scope.key_id, scope.model)
    return (1, scope.provider.value, scope.model)
