"""Panic routing and honest answers: what a request does when no key is usable.

Pure and deterministic: callers pass ``now`` (wall-clock epoch seconds), the
time the request has left, and which probes are in flight; nothing here does
I/O, sleeps or reads a clock. The sidecar (``sidecar.rescue``) acts on the
``Decision`` it gets and asks again after every wait.

The policy (the table in docs/operations.md, "Provider down / key cooling"),
when every key the request could use is out:

- some cooling after errors (5xx, timeouts, broken streams) without a probe in
  flight: the request is sent as a probe to the one most likely to have
  recovered (earliest cooldown end, then least recently failed);
- all those being probed by other requests: it waits for a probe's answer
  (at most ``probe_wait``, within its deadline), then asks again;
- rate limited (429), the earliest recovery within the wait budget: it waits
  for that recovery (at most ``max_rate_limit_wait``, within its deadline);
- rate limited beyond the budget: 429 with Retry-After = the earliest recovery;
- failed credentials, exhausted, disabled (or no key of the provider): 503
  ``no_usable_key`` with the reason, and ``x-should-retry: false``;
- a mix: probes first, then waits, then the most hopeful answer (429 if a
  rate-limited key recovers first, 503 ``cooling`` if a cooling one does,
  else the permanent reason).

Credential-failed, exhausted and disabled keys are never probed by app
traffic. Rate-limited keys are not probed before their Retry-After either:
the provider said when to come back, and asking earlier only earns another
429.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass

from keyplane.domain import Provider

__all__ = [
    "Block",
    "Candidate",
    "Decision",
    "NoUsableKey",
    "PanicPolicy",
    "Probe",
    "RateLimited",
    "WaitForProbe",
    "WaitForRecovery",
    "block_from_reason",
    "decide",
    "honest_answer",
]


class Block(enum.StrEnum):
    """Why a key cannot serve a request right now (the 503 ``reason`` values, and more)."""

    COOLING = "cooling"  # (key, model) cooling down after errors: probe-able
    RATE_LIMITED = "rate_limited"  # (key, model) cooling down after a 429: wait for it
    CREDENTIALS = "credentials"  # the key failed its credentials (every model)
    EXHAUSTED = "exhausted"  # out of credits or quota (every model)
    DISABLED = "disabled"  # an admin disabled or revoked every key of the provider
    NO_KEYS = "no_keys"  # the tenant has no key of the provider for this model

    @property
    def temporary(self) -> bool:
        return self in _TEMPORARY


_TEMPORARY = frozenset({Block.COOLING, Block.RATE_LIMITED})
# When keys are out for different permanent reasons, the answer names the first of these.
_PERMANENT_ORDER = (Block.CREDENTIALS, Block.EXHAUSTED, Block.DISABLED, Block.NO_KEYS)


# Reasons that say the key's credits or quota ran out (keyplane.health.classify's labels).
_EXHAUSTED_WORDS = ("insufficient_quota", "quota", "payment required", "credit", "billing")


def block_from_reason(state: str, reason: str) -> Block:
    """The block of an active, non-healthy verdict from its state and reason.

    ``state`` is the health state's value ("cooldown", "unhealthy", "exhausted",
    ...). A reason naming quota, credits, billing or payment is exhaustion; a
    cooldown whose reason names a 429 or a rate limit was asked for by the
    provider (Retry-After); any other cooldown follows errors."""
    text = reason.lower()
    if state == "exhausted" or any(word in text for word in _EXHAUSTED_WORDS):
        return Block.EXHAUSTED
    if state == "unhealthy":
        return Block.CREDENTIALS
    if text.startswith("429") or "rate limit" in text:
        return Block.RATE_LIMITED
    return Block.COOLING


@dataclass(frozen=True, slots=True)
class PanicPolicy:
    """The sidecar's thresholds (flags ``--panic-*`` and ``--max-rate-limit-wait``)."""

    # Off: a request that finds every key cooling is answered at once (never probed).
    enabled: bool = True
    # How long a request waits for another request's probe of the same (key, model).
    probe_wait: float = 2.0
    # The longest a request waits for a rate-limited key's Retry-After to pass (0: never).
    max_rate_limit_wait: float = 10.0
    # Less than this left of the request's deadline after a wait is not worth waiting for.
    min_attempt_budget: float = 0.5

    def __post_init__(self) -> None:
        if self.probe_wait < 0 or self.max_rate_limit_wait < 0 or self.min_attempt_budget < 0:
            raise ValueError("PanicPolicy times must be >= 0")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (key, upstream model) a request could use, blocked or not.

    ``until``: when a temporary block ends (epoch seconds; None if not known or
    not temporary). ``since``: when the key last failed (epoch seconds; -inf if
    unknown). ``slot``: what the one-probe-per-(key, model) rule counts by."""

    provider: Provider
    key_id: str
    model: str
    block: Block | None
    until: float | None = None
    since: float = float("-inf")

    @property
    def slot(self) -> tuple[str, str]:
        return self.key_id, self.model


@dataclass(frozen=True, slots=True)
class Probe:
    """Send the request to ``candidate`` as a probe (the caller holds its slot meanwhile)."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class WaitForProbe:
    """Wait up to ``timeout`` seconds for one of the probes of ``slots`` to answer, then ask again."""

    slots: tuple[Hashable, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class WaitForRecovery:
    """Wait ``delay`` seconds (a rate limit ends), then plan the request again."""

    delay: float


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Answer 429: every key left is rate limited; the first recovers in ``retry_after`` seconds."""

    retry_after: float
    providers: tuple[Provider, ...]


@dataclass(frozen=True, slots=True)
class NoUsableKey:
    """Answer 503 ``no_usable_key`` with ``reason``; ``retry_after`` for a cooling one."""

    reason: Block
    providers: tuple[tuple[Provider, Block], ...]
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.reason.temporary


Decision = Probe | WaitForProbe | WaitForRecovery | RateLimited | NoUsableKey


def decide(
    candidates: Sequence[Candidate],
    *,
    now: float,
    time_left: float,
    probing: Collection[Hashable],
    tried: Collection[tuple[str, str]] = (),
    probe_wait_left: float,
    rate_limit_wait_left: float,
    policy: PanicPolicy,
) -> Decision:
    """What a request does when none of ``candidates`` is usable (every block is set).

    ``time_left``: seconds to the request's deadline. ``probing``: the slots
    with a probe in flight on this sidecar. ``tried``: slots this request
    already sent to (never probed twice by one request). The wait budgets are
    what is left of ``probe_wait`` and ``max_rate_limit_wait`` for this
    request (the caller counts down what it spent)."""
    usable_time = time_left - policy.min_attempt_budget
    if policy.enabled and usable_time > 0:
        cooling = [c for c in candidates if c.block is Block.COOLING and c.slot not in tried]
        if cooling:
            free = [c for c in cooling if c.slot not in probing]
            if free:
                return Probe(min(free, key=_hope))
            wait = min(probe_wait_left, usable_time)
            if wait > 0:
                return WaitForProbe(tuple(dict.fromkeys(c.slot for c in cooling)), wait)
    limited = [c.until for c in candidates if c.block is Block.RATE_LIMITED and c.until is not None]
    if limited:
        delay = max(0.0, min(limited) - now)
        if delay <= min(rate_limit_wait_left, usable_time):
            return WaitForRecovery(delay)
    answer = honest_answer(candidates, now=now)
    if policy.enabled and isinstance(answer, NoUsableKey) and answer.reason is Block.COOLING:
        # Cooling keys are probed all along: the next request may well find one
        # recovered, so no Retry-After (the SDKs' own short backoff), not the cooldown's end.
        return NoUsableKey(answer.reason, answer.providers)
    return answer


def _hope(candidate: Candidate) -> tuple[float, float]:
    """Most likely recovered first: earliest cooldown end, then least recently failed."""
    until = candidate.until if candidate.until is not None else float("inf")
    return until, candidate.since


def honest_answer(candidates: Iterable[Candidate], *, now: float) -> RateLimited | NoUsableKey:
    """What to tell the app when nothing will be tried: the most hopeful truth.

    A temporary block that ends first decides (429 when it is a rate limit, 503
    ``cooling`` otherwise, with the time to wait); with none, the permanent
    reason (503, not retryable). ``providers`` names every provider whose keys
    are all out, with its own reason."""
    by_provider: dict[Provider, list[Candidate]] = {}
    for c in candidates:
        by_provider.setdefault(c.provider, []).append(c)
    per_provider: list[tuple[Provider, Block]] = []
    first: Candidate | None = None
    for provider, found in by_provider.items():
        if any(c.block is None for c in found):
            continue
        per_provider.append((provider, _provider_block(found)))
        for c in found:
            if c.block is not None and c.block.temporary and (first is None or _ends(c) < _ends(first)):
                first = c
    providers = tuple(per_provider)
    if first is not None:
        retry_after = max(0.0, first.until - now) if first.until is not None else None
        if first.block is Block.RATE_LIMITED and retry_after is not None:
            return RateLimited(retry_after, tuple(p for p, b in providers if b is Block.RATE_LIMITED))
        return NoUsableKey(Block.COOLING, providers, retry_after)
    blocks = {b for _, b in providers}
    reason = next((b for b in _PERMANENT_ORDER if b in blocks), Block.NO_KEYS)
    return NoUsableKey(reason, providers)


def _ends(candidate: Candidate) -> float:
    return candidate.until if candidate.until is not None else float("inf")


def _provider_block(found: Sequence[Candidate]) -> Block:
    """One provider's reason: a temporary block if any key has one (the earliest), else the first permanent one."""
    temporary = [c for c in found if c.block is not None and c.block.temporary]
    if temporary:
        block = min(temporary, key=_ends).block
        assert block is not None
        return block
    blocks = {c.block for c in found}
    return next((b for b in _PERMANENT_ORDER if b in blocks), Block.NO_KEYS)
