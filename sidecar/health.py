"""One tenant's key and provider health as this sidecar sees it.

Two ``keyplane.health.HealthBook``s side by side, both pure (the clock is
passed in, wall-clock epoch seconds):

- ``pushed``: the control plane's verdicts, adopted as they arrive over the
  watch stream (``HealthBook.apply``); it folds every sidecar's reports.
- ``local``: this sidecar's own attempt outcomes (``HealthBook.record``),
  effective at once, before any round trip to the control plane.

A key is usable only if both books allow it; a provider is degraded if
either says so. A pushed HEALTHY for a key (an admin reset, a re-enable, a
recovery seen elsewhere) clears what the local book holds for that scope, and
a full snapshot starts the local book over, so the local book never outlives
the fleet's verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from keyplane.domain import HealthState, Provider
from keyplane.health.classify import Classification
from keyplane.health.machine import HealthBook, HealthChange, HealthPolicy, KeyScope, Outcome, ProviderScope, Verdict
from keyplane.timefmt import until_text

__all__ = ["TenantHealth"]

_log = logging.getLogger(__name__)

# How often (seconds of the passed-in clock) idle healthy entries are evicted.
_EVICT_EVERY = 30.0


class TenantHealth:
    """Pushed and local health of one tenant; mutated only on the event loop."""

    __slots__ = ("_last_evict", "_policy", "local", "pushed", "tenant")

    def __init__(self, tenant: str, policy: HealthPolicy) -> None:
        self.tenant = tenant
        self._policy = policy
        self.pushed = HealthBook(policy)
        self.local = HealthBook(policy)
        self._last_evict: float | None = None

    # --- reads (request path) -----------------------------------------------------

    def key_usable(self, key_id: str, model: str, now: float) -> bool:
        return self.pushed.key_usable(key_id, model, now) and self.local.key_usable(key_id, model, now)

    def key_block_reason(self, key_id: str, model: str, now: float) -> str | None:
        """None when usable, else the state that keeps the key out ("unhealthy",
        "exhausted" or "cooldown")."""
        if self.key_usable(key_id, model, now):
            return None
        for book in (self.local, self.pushed):
            state = book.verdict(KeyScope(key_id, ""), now).state
            if state is HealthState.UNHEALTHY or state is HealthState.EXHAUSTED:
                return state.value
        return HealthState.COOLDOWN.value

    def provider_degraded(self, provider: Provider, model: str, now: float) -> bool:
        return self.pushed.provider_degraded(provider, model, now) or self.local.provider_degraded(provider, model, now)

    # --- this sidecar's findings --------------------------------------------------

    def record(self, outcome: Outcome, now: float, *, started: float | None = None) -> list[HealthChange]:
        """Fold one of this sidecar's attempts in (``HealthBook.record``)."""
        changes = self.local.record(outcome, now, started=started)
        for change in changes:
            _log_change(self.tenant, "local", change, now)
        self._maybe_evict(now)
        return changes

    def record_success(
        self,
        key_id: str,
        provider: Provider,
        model: str,
        classification: Classification,
        *,
        provider_final: bool,
        recovered: bool,
        now: float,
        started: float | None = None,
    ) -> list[HealthChange]:
        """``record`` for a SUCCESS, without building an ``Outcome`` when it cannot matter.

        A success only resets entries the local book already holds (key and
        provider scopes); with an empty local book it changes nothing, so only
        the periodic eviction is kept. Otherwise it is exactly ``record``.
        """
        if len(self.local):
            outcome = Outcome(
                key_id=key_id,
                provider=provider,
                model=model,
                classification=classification,
                provider_final=provider_final,
                recovered=recovered,
            )
            return self.record(outcome, now, started=started)
        self._maybe_evict(now)
        return []

    # --- the control plane's verdicts ---------------------------------------------

    def apply_pushed(self, change: HealthChange) -> None:
        """Adopt one verdict from the watch stream."""
        self.pushed.apply(change)
        scope = change.scope
        if isinstance(scope, KeyScope) and change.verdict.state is HealthState.HEALTHY:
            if scope.model:
                # Only this (key, model) recovered; keep local findings for the rest.
                self.local.apply(change)
            else:
                self.local.reset_key(scope.key_id)
        elif isinstance(scope, ProviderScope) and change.verdict.state is HealthState.HEALTHY:
            self.local.apply(change)

    def replace_pushed(self, changes: Iterable[HealthChange], now: float) -> None:
        """A snapshot: the pushed book becomes exactly ``changes`` (non-healthy
        entries) and the local book starts over.

        A full snapshot is the fleet's whole verdict. A sidecar gets one when it
        starts and after a gap it could not resume from; during such a gap an
        admin may have reset keys (or they recovered elsewhere) and this sidecar
        saw none of it, so none of its own findings may outlive the snapshot.
        What the control plane heard of is in ``changes``; a finding it never
        heard of is learnt again from the next failure (one retried attempt).
        """
        book = HealthBook(self._policy)
        for change in changes:
            book.apply(change)
        self.pushed = book
        if len(self.local):
            _log.info("tenant %s: full snapshot, this sidecar's own health findings start over", self.tenant)
            self.local = HealthBook(self._policy)

    # --- key lifecycle ------------------------------------------------------------

    def reset_key(self, key_id: str) -> None:
        """The key was re-enabled or rotated: this sidecar's findings about it are void."""
        self.local.reset_key(key_id)

    def forget_key(self, key_id: str) -> None:
        self.pushed.forget_key(key_id)
        self.local.forget_key(key_id)

    def _maybe_evict(self, now: float) -> None:
        if self._last_evict is None:
            self._last_evict = now
            return
        if now - self._last_evict >= _EVICT_EVERY:
            self._last_evict = now
            self.local.evict(now)
            self.pushed.evict(now)


def _log_change(tenant: str, source: str, change: HealthChange, now: float) -> None:
    scope = change.scope
    verdict: Verdict = change.verdict
    if isinstance(scope, KeyScope):
        what = f"key {scope.key_id} model {scope.model or '*'}"
    else:
        what = f"provider {scope.provider.value} model {scope.model}"
    level = logging.INFO if verdict.state is HealthState.HEALTHY else logging.WARNING
    until = f" until {until_text(verdict.until, now)}" if verdict.until is not None else ""
    _log.log(
        level,
        "%s health of tenant %s: %s -> %s%s (%s)",
        source,
        tenant,
        what,
        verdict.state.value,
        until,
        verdict.reason,
    )
