"""When no key can serve a request: panic probes, short waits and honest answers.

The I/O side of ``keyplane.health.panic`` (the policy and its table live
there): ``serve`` runs the plan through the attempt loop like
``sidecar.proxy.run_attempts`` and, only when that produced nothing worth
passing on (no key usable, every key tried failed its credentials or was rate
limited, or the last one failed and others are cooling), asks the policy what
to do and does it:

- probe: the request goes to the cooling (key, model) most likely to have
  recovered, holding that slot of the ``ProbeGate`` (one probe per
  (tenant, key, model) in flight on this sidecar); a success ends the
  cooldown here at once (both health books) and, through the outcome report,
  for the fleet;
- wait for another request's probe, or for a rate limit's Retry-After, within
  the request's deadline and the policy's budgets, then plan again;
- answer: 429 with Retry-After / retry-after-ms at the earliest recovery, or
  503 ``no_usable_key`` with the reason and the providers left without a key
  (``x-should-retry: false`` when waiting cannot help). A provider's own 401
  never reaches the app.

The happy path pays one call and one type check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from keyplane.domain import HealthState, Provider
from keyplane.health.classify import ErrorClass
from keyplane.health.machine import HealthChange, KeyScope, Verdict
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

from . import errors
from .health import TenantHealth
from .model import Key, Route
from .proxy import AttemptObserver, AttemptRecord, AttemptsFailed, BlockReason, UpstreamReply, run_attempts
from .router import Attempt
from .upstream import CHAT_PATH, JSON_TYPE, RequestBody, UpstreamClient, UpstreamRequest

__all__ = ["ProbeGate", "Rescue", "Sending", "candidates", "key_block", "serve"]

_log = logging.getLogger(__name__)

# Rounds of probe / wait / plan again one request may go through (each costs
# an attempt or a wait out of a finite budget; this only bounds the loop).
_MAX_ROUNDS = 100
# A rate limit's end is waited for this much longer (clocks are not exact).
_SLACK = 0.02
_UNHEALTHY = HealthState.UNHEALTHY


class ProbeGate:
    """The probes in flight on this sidecar: one per (tenant, key, model)."""

    __slots__ = ("_inflight",)

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, str, str], asyncio.Future[bool]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def probing(self, tenant: str) -> set[tuple[str, str]]:
        return {(key, model) for (t, key, model) in self._inflight if t == tenant}

    def hold(self, tenant: str, slot: tuple[str, str]) -> None:
        name = (tenant, *slot)
        if name in self._inflight:
            raise RuntimeError(f"a probe of {slot} is already in flight")
        self._inflight[name] = asyncio.get_running_loop().create_future()

    def release(self, tenant: str, slot: tuple[str, str], ok: bool) -> None:
        future = self._inflight.pop((tenant, *slot), None)
        if future is not None and not future.done():
            future.set_result(ok)

    async def wait(self, tenant: str, slots: Collection[Hashable], within: float) -> None:
        """Until one of the probes of ``slots`` answers, or ``within`` seconds."""
        futures = [
            f for slot in slots if isinstance(slot, tuple) and (f := self._inflight.get((tenant, *slot))) is not None
        ]
        if futures and within > 0:
            await asyncio.wait(futures, timeout=within, return_when=asyncio.FIRST_COMPLETED)


@dataclass(slots=True)
class Rescue:
    """What the rescue needs of one request (the chat handler builds it)."""

    tenant: str
    model: str  # the public model the app asked for
    route: Route
    health: TenantHealth
    gate: ProbeGate
    policy: PanicPolicy
    # The active keys of a target's provider allowed for its model (``SidecarState.keys``).
    keys_for: Callable[[Provider, str], Sequence[Key]]
    # Whether the tenant holds a disabled key for (provider, model) (``SidecarState.has_inactive_key``).
    has_inactive_key: Callable[[Provider, str], bool]
    # The plan for the request as health stands now (``plan_attempts`` again).
    replan: Callable[[], list[Attempt]]
    # Loop time no wait may end after (the app's own timeout, when it said it).
    wait_until: float = float("inf")
    # Counts each action taken (metrics): probe_ok, probe_failed, waited_for_probe, ...
    count: Callable[[str], None] = lambda action: None


def key_block(health: TenantHealth, key_id: str, model: str, now: float) -> tuple[Block, float | None, float] | None:
    """Why (key, model) is out at ``now``, until when and since when; None if usable.

    Key-wide verdicts (failed credentials, exhaustion) win; otherwise the
    (key, model) cooldown of whichever book ends it last."""
    found: tuple[Block, float | None, float] | None = None
    for book in (health.local, health.pushed):
        wide = book.verdict(KeyScope(key_id, ""), now)
        if wide.active(now):
            block = Block.CREDENTIALS if wide.state is _UNHEALTHY else block_from_reason("exhausted", wide.reason)
            return block, wide.until, float("-inf")
        if not model:
            continue
        scope = KeyScope(key_id, model)
        verdict = book.verdict(scope, now)
        if not verdict.active(now):
            continue
        since = book.since(scope) if book is health.local else None
        block = block_from_reason(verdict.state.value, verdict.reason)
        if found is None or _later(verdict.until, found[1]):
            found = (block, verdict.until, found[2] if found is not None else float("-inf"))
        if since is not None:
            found = (found[0], found[1], max(found[2], since))
    return found


def _later(a: float | None, b: float | None) -> bool:
    return (a if a is not None else float("inf")) > (b if b is not None else float("inf"))


def candidates(rescue: Rescue, now: float) -> tuple[list[Candidate], dict[tuple[str, str], Attempt]]:
    """Every (key, model) the route could use, with its block, and the attempt for each key."""
    found: list[Candidate] = []
    attempts: dict[tuple[str, str], Attempt] = {}
    for target in rescue.route.targets:
        provider, model = target.provider, target.upstream_model
        keys = rescue.keys_for(provider, model)
        if not keys:
            if target.node_urls:
                found.append(Candidate(provider, f"node:{target.node_urls[0]}", model, None))
                continue
            block = Block.DISABLED if rescue.has_inactive_key(provider, model) else Block.NO_KEYS
            found.append(Candidate(provider, "", model, block))
            continue
        for key in keys:
            key_id = key.id
            why = key_block(rescue.health, key_id, model, now)
            if why is None:
                found.append(Candidate(provider, key_id, model, None))
            else:
                found.append(Candidate(provider, key_id, model, why[0], why[1], why[2]))
            node = target.node_urls[0] if target.node_urls else None
            attempts.setdefault((key_id, model), Attempt(target=target, key=key, node_url=node))
    return found, attempts


def _needs_rescue(result: UpstreamReply | AttemptsFailed) -> bool:
    """Nothing worth passing on: no answer at all, or a non-streamed failure passed through."""
    if isinstance(result, AttemptsFailed):
        return True
    record = result.record
    return record is not None and record.classification.error_class in _RESCUED


_RESCUED = frozenset({ErrorClass.RATE_LIMITED, ErrorClass.UPSTREAM_ERROR})


@dataclass(frozen=True, slots=True)
class Sending:
    """How each attempt is sent (``run_attempts``' path, content type and request builder)."""

    path: str = CHAT_PATH
    content_type: str = JSON_TYPE
    build: Callable[[Attempt, Mapping[str, str]], UpstreamRequest] | None = None


_CHAT = Sending()


async def serve(
    upstream: UpstreamClient,
    plan: Sequence[Attempt],
    body_for: Callable[[str], RequestBody],
    app_headers: Mapping[str, str],
    *,
    stream: bool,
    deadline: float,
    observer: AttemptObserver,
    blocked: BlockReason | None = None,
    excluded: Mapping[str, str] | None = None,
    wall_clock: Callable[[], float] = time.time,
    rescue: Callable[[], Rescue] | None = None,
    sending: Sending = _CHAT,
) -> UpstreamReply | AttemptsFailed:
    """``run_attempts`` over ``plan``, then the rescue when it produced nothing to pass on
    (``rescue`` makes the request's ``Rescue``: called only then)."""
    first: UpstreamReply | AttemptsFailed | None = None
    if plan:
        first = await run_attempts(
            upstream,
            plan,
            body_for,
            app_headers,
            stream=stream,
            deadline=deadline,
            observer=observer,
            blocked=blocked,
            excluded=excluded,
            wall_clock=wall_clock,
            path=sending.path,
            content_type=sending.content_type,
            build=sending.build,
        )
        if rescue is None or not _needs_rescue(first):
            return first
    elif rescue is None:
        return AttemptsFailed(errors.no_usable_key(None), 0, [], dict(excluded or {}))
    run = _Run(upstream, body_for, app_headers, stream, deadline, observer, blocked, wall_clock, rescue(), sending)
    run.excluded = dict(excluded or {})
    return await run.rescue(first)


@dataclass(slots=True)
class _Run:
    """One request's rescue: what it sent so far and what it may still spend."""

    upstream: UpstreamClient
    body_for: Callable[[str], RequestBody]
    app_headers: Mapping[str, str]
    stream: bool
    deadline: float
    observer: AttemptObserver
    blocked: BlockReason | None
    wall_clock: Callable[[], float]
    r: Rescue
    sending: Sending
    excluded: dict[str, str] = field(default_factory=dict)
    records: list[AttemptRecord] = field(default_factory=list)
    sent: int = 0
    tried: set[tuple[str, str]] = field(default_factory=set)
    # A failure passed through by the attempt loop, kept in case nothing better comes
    # (its record already observed, so that health knows it), and its class.
    held: UpstreamReply | None = None
    held_class: ErrorClass | None = None
    failed: AttemptsFailed | None = None

    def _take(self, result: UpstreamReply | AttemptsFailed) -> None:
        self.sent += result.attempts
        self.excluded = dict(result.excluded)
        records = result.records
        if isinstance(result, UpstreamReply) and result.record is not None:
            records = [*records, result.record]
        for record in records:
            if record.key_id is not None:
                self.tried.add((record.key_id, record.model))
        self.records.extend(records)
        if isinstance(result, AttemptsFailed):
            self.failed = result
        elif result.record is not None and result.record.classification.error_class in _RESCUED:
            self._drop_held()
            record = result.record
            # Observed now (the next decision reads the health it changes), not by the relay.
            self.observer.attempted(record)
            result.record = None
            self.held, self.held_class = result, record.classification.error_class

    def _drop_held(self) -> None:
        held = self.held
        if held is not None:
            self.held = self.held_class = None
            held.response.release()

    def _finish(self, reply: UpstreamReply) -> UpstreamReply:
        if self.held is reply:
            self.held = self.held_class = None
        self._drop_held()
        reply.attempts = self.sent
        reply.excluded = self.excluded
        reply.records = [r for r in self.records if r is not reply.record]
        status = reply.response.status
        if 200 <= status < 300:
            provider = reply.attempt.target.provider
            for record in reply.records:
                if record.provider is provider:
                    record.recovered = True
        return reply

    async def _attempts(self, plan: Sequence[Attempt], *, probe: bool) -> UpstreamReply | AttemptsFailed:
        result = await run_attempts(
            self.upstream,
            plan,
            self.body_for,
            self.app_headers,
            stream=self.stream,
            deadline=self.deadline,
            observer=self.observer,
            blocked=None if probe else self.blocked,
            excluded=self.excluded,
            wall_clock=self.wall_clock,
            path=self.sending.path,
            content_type=self.sending.content_type,
            build=self.sending.build,
        )
        self._take(result)
        return result

    async def _probe(self, attempt: Attempt, candidate: Candidate) -> UpstreamReply | AttemptsFailed:
        r = self.r
        slot = candidate.slot
        # Sent after all: x-keyplane-excluded names it only if the probe fails.
        self.excluded.pop(candidate.key_id, None)
        r.gate.hold(r.tenant, slot)
        ok = False
        try:
            result = await self._attempts([attempt], probe=True)
            ok = isinstance(result, UpstreamReply) and 200 <= result.response.status < 300
        finally:
            if ok:
                # The probe proved the (key, model) serves again: its cooldown is over here at
                # once; the fleet learns it from the success's outcome report.
                healthy = HealthChange(KeyScope(*slot), Verdict(HealthState.HEALTHY, None, ""))
                r.health.local.apply(healthy)
                r.health.pushed.apply(healthy)
            r.gate.release(r.tenant, slot, ok)
        r.count("probe_ok" if ok else "probe_failed")
        _log.info(
            "tenant %s: panic probe of key %s for %s %s",
            r.tenant,
            candidate.key_id,
            candidate.model,
            "succeeded: its cooldown is over" if ok else "failed",
        )
        return result

    async def rescue(self, first: UpstreamReply | AttemptsFailed | None) -> UpstreamReply | AttemptsFailed:
        try:
            return await self._rescue(first)
        except BaseException:
            # Cancelled (the app hung up, shutdown) while holding a failure: free its connection.
            self._drop_held()
            raise

    async def _rescue(self, first: UpstreamReply | AttemptsFailed | None) -> UpstreamReply | AttemptsFailed:
        r = self.r
        loop = asyncio.get_running_loop()
        if first is not None:
            self._take(first)
        probe_left = r.policy.probe_wait
        limit_left = r.policy.max_rate_limit_wait
        plan: list[Attempt] = []
        decision: RateLimited | NoUsableKey | None = None
        found: list[Candidate] = []
        for _ in range(_MAX_ROUNDS):
            if plan:
                result = await self._attempts(plan, probe=False)
                plan = []
                if result is not self.held and not _needs_rescue(result):
                    assert isinstance(result, UpstreamReply)
                    return self._finish(result)
            now = self.wall_clock()
            found, attempts = candidates(r, now)
            if any(c.block is None and c.slot not in self.tried for c in found):
                # Usable again (a probe answered, a rate limit ended): plan as usual.
                plan = [a for a in r.replan() if a.key is None or (a.key.id, a.target.upstream_model) not in self.tried]
                if plan:
                    continue
            time_left = min(self.deadline, r.wait_until) - loop.time()
            step = decide(
                found,
                now=now,
                time_left=time_left,
                probing=r.gate.probing(r.tenant),
                tried=self.tried,
                probe_wait_left=probe_left,
                rate_limit_wait_left=limit_left,
                policy=r.policy,
            )
            if isinstance(step, Probe):
                result = await self._probe(attempts[step.candidate.slot], step.candidate)
                if result is not self.held and not _needs_rescue(result):
                    assert isinstance(result, UpstreamReply)
                    return self._finish(result)
            elif isinstance(step, WaitForProbe):
                started = loop.time()
                r.count("waited_for_probe")
                await r.gate.wait(r.tenant, step.slots, step.timeout)
                probe_left -= max(loop.time() - started, 1e-3)
            elif isinstance(step, WaitForRecovery):
                started = loop.time()
                r.count("waited_for_rate_limit")
                await asyncio.sleep(step.delay + _SLACK)
                limit_left -= max(loop.time() - started, 1e-3)
                # The wait was for these: after it, trying them again is a new pass.
                self.tried -= {c.slot for c in found if c.block is Block.RATE_LIMITED}
            else:
                decision = step
                break
        if decision is None:
            decision = honest_answer(found, now=self.wall_clock())
        return self._answer(decision)

    def _answer(self, decision: RateLimited | NoUsableKey) -> UpstreamReply | AttemptsFailed:
        """The most useful answer: the upstream's own when its last failure was an error of
        its own (5xx, timeout), else the honest one."""
        held, failed = self.held, self.failed
        if held is not None and self.held_class is ErrorClass.UPSTREAM_ERROR:
            return self._finish(held)
        last = self.records[-1].classification.error_class if self.records else None
        unnamed = isinstance(decision, NoUsableKey) and not decision.providers
        if unnamed and held is not None:
            # Every provider still has a key that is not out: the failure itself is the answer.
            return self._finish(held)
        if failed is not None and held is None and (unnamed or last is ErrorClass.UPSTREAM_ERROR):
            return AttemptsFailed(failed.error, self.sent, self.records, self.excluded)
        self._drop_held()
        error = _error_for(decision, self.r.model)
        if isinstance(decision, RateLimited):
            self.r.count("answered_429")
        else:
            self.r.count(f"answered_503_{decision.reason.value}")
        return AttemptsFailed(error, self.sent, self.records, self.excluded)


def _error_for(decision: RateLimited | NoUsableKey, model: str) -> errors.ErrorResponse:
    if isinstance(decision, RateLimited):
        return errors.rate_limited(model, decision.retry_after, [p.value for p in decision.providers])
    providers = [(p.value, b.value) for p, b in decision.providers]
    return errors.no_usable_key(
        model, reason=decision.reason.value, providers=providers, retry_after=decision.retry_after
    )
