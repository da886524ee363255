"""Bounded LRU table of mutable per-scope health entries (private to the machine)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from keyplane.domain import HealthState

__all__ = ["Entry", "EntryTable"]

S = TypeVar("S", bound=Hashable)


@dataclass(slots=True)
class Entry:
    """Mutable working state of one scope. Never leaves the HealthBook."""

    touched: float
    state: HealthState = HealthState.HEALTHY
    until: float | None = None
    reason: str = ""
    failures: deque[float] = field(default_factory=deque)  # recent failure times, at most `threshold`
    trips: int = 0  # consecutive error trips (drives the doubling and the half-open re-trip)
    rate_limits: int = 0  # consecutive 429s without Retry-After doubling
    since: float = float("-inf")  # when the current state (or its ``until``) was set

    def verdict_active(self, now: float) -> bool:
        """Not healthy at ``now``."""
        return self.state is not HealthState.HEALTHY and (self.until is None or self.until > now)

    def record_failure(self, now: float, window: float, threshold: int) -> None:
        """Keep only the failures inside the window, and never more than ``threshold``."""
        failures = self.failures
        failures.append(now)
        horizon = now - window
        while failures and failures[0] <= horizon:
            failures.popleft()
        while len(failures) > threshold:
            failures.popleft()


class EntryTable(Generic[S]):
    """Entries in least-recently-touched order, with idle eviction and a hard cap."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[S, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, scope: S) -> Entry | None:
        return self._entries.get(scope)

    def items(self) -> Iterator[tuple[S, Entry]]:
        return iter(list(self._entries.items()))

    def pop(self, scope: S) -> Entry | None:
        return self._entries.pop(scope, None)

    def touch(self, scope: S, now: float, *, create: bool) -> Entry | None:
        """Mark a scope as used at ``now`` (most recent); create it if asked."""
        entry = self._entries.get(scope)
        if entry is None:
            if not create:
                return None
            entry = Entry(touched=now)
            self._entries[scope] = entry
        else:
            entry.touched = max(entry.touched, now)
            self._entries.move_to_end(scope)
        return entry

    def drop_idle(self, now: float, horizon: float, on_evict: Callable[[S], None]) -> int:
        """Drop entries healthy at ``now`` and untouched since ``horizon``."""
        victims = [
            scope
            for scope, entry in self._entries.items()
            if entry.touched <= horizon and not entry.verdict_active(now)
        ]
        for scope in victims:
            del self._entries[scope]
            on_evict(scope)
        return len(victims)

    def enforce_cap(self, now: float, *, slack: bool, on_evict: Callable[[S], None]) -> int:
        """Evict least recently touched healthy entries, then the oldest of any state.

        With ``slack`` (the hot path) a cap overflow evicts down to 99% of the cap so that
        the scan is paid once per many inserts rather than on every one.
        """
        excess = len(self._entries) - self._max
        if excess <= 0:
            return 0
        if slack:
            excess += self._max // 100
        victims: list[S] = []
        for scope, entry in self._entries.items():  # oldest first
            if len(victims) >= excess:
                break
            if not entry.verdict_active(now):
                victims.append(scope)
        if len(victims) < excess:
            chosen = set(victims)
            for scope in self._entries:
                if len(victims) >= excess:
                    break
                if scope not in chosen:
                    victims.append(scope)
        for scope in victims:
            del self._entries[scope]
            on_evict(scope)
        return len(victims)
