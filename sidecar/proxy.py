"""The attempt loop: walk the plan until an upstream answer can be returned.

Every attempt is classified with ``keyplane.health`` (DESIGN.md's table):

- credential, rate_limited, upstream_error: try the next attempt of the plan
  (the provider's other usable keys come first, then the route's next
  targets); a key is never tried twice for the same upstream model in one
  request, and one that failed its credentials not at all again.
- client_error: the upstream's answer goes to the app unchanged, no retry.
- the last attempt failed: its answer goes to the app as it is, except a
  failed credential (503 ``no_usable_key``, reason ``credentials``: a
  provider's 401 would blame the app's key and quote parts of ours).
- success: the answer. For a stream it is committed with the first bytes;
  how the stream ends (complete, or ``stream_broken``) is classified by the
  caller (``complete``), never retried.

One deadline bounds the whole request; each attempt gets what is left of it. Attempts
are handed to an ``AttemptObserver`` the moment they are classified (local
health, metrics), except the answer's own, which the caller hands over once
the answer is relayed; ``recovered`` is set on earlier attempts when a later
attempt on the same provider succeeds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from keyplane.domain import Provider
from keyplane.health.classify import Classification, ErrorClass, classify_exception, classify_response

from . import errors
from .router import Attempt
from .upstream import (
    CHAT_PATH,
    JSON_TYPE,
    RequestBody,
    UpstreamAnswerCut,
    UpstreamClient,
    UpstreamConfigError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTlsError,
    UpstreamTooLarge,
    build_request,
)
from .usage import Usage

__all__ = [
    "AttemptObserver",
    "AttemptRecord",
    "AttemptsFailed",
    "UpstreamReply",
    "classify_status",
    "complete",
    "excluded_header",
    "run_attempts",
]

_log = logging.getLogger(__name__)

_ANSWERS = frozenset({ErrorClass.SUCCESS, ErrorClass.CLIENT_ERROR})
# Less than this left of the deadline is not worth another attempt.
_MIN_ATTEMPT_BUDGET = 0.005

# classify_response's answer for a 2xx (it depends on the status alone), prebuilt
# per status so that the common case allocates nothing.
_SUCCESS: dict[int, Classification] = {s: classify_response(s, {}, b"", now=0.0) for s in range(200, 300)}
_OUTCOME_LABELS: dict[int, str] = {n: f"{n}xx" for n in range(10)}


def classify_status(
    status: int, headers: Mapping[str, str], body: bytes, wall_clock: Callable[[], float]
) -> Classification:
    """``classify_response``, with the clock read and the call skipped for a 2xx."""
    found = _SUCCESS.get(status)
    if found is not None:
        return found
    return classify_response(status, headers, body, now=wall_clock())


def _outcome_label(status: int) -> str:
    n = status // 100
    found = _OUTCOME_LABELS.get(n)
    return found if found is not None else f"{n}xx"


# Why an attempt's key is out right now ("unhealthy", "cooldown"), or None if usable.
BlockReason = Callable[[Attempt], str | None]


@dataclass(slots=True)
class AttemptRecord:
    """One classified upstream attempt. Names its key by id only."""

    attempt: Attempt
    classification: Classification
    # Wall-clock epoch seconds when the attempt started.
    started: float
    latency_ms: int
    # Metrics label: "2xx".."5xx", or what failed ("connect_error", "tls_error",
    # "timeout", "malformed", "cut", "too_large": ``UpstreamError.label``).
    outcome: str
    # No later attempt of this request went to the same provider.
    provider_final: bool
    # Another attempt followed this one.
    retried: bool = False
    # A later attempt on the same provider succeeded.
    recovered: bool = False
    # What the answer consumed (``sidecar.usage``), once it has been relayed.
    usage: Usage | None = None
    # A later reported attempt of this request followed (``sidecar.book`` sets it): not its last.
    superseded: bool = False

    @property
    def key_id(self) -> str | None:
        return self.attempt.key.id if self.attempt.key is not None else None

    @property
    def provider(self) -> Provider:
        return self.attempt.target.provider

    @property
    def model(self) -> str:
        return self.attempt.target.upstream_model


class AttemptObserver(Protocol):
    def attempted(self, record: AttemptRecord) -> None:
        """Called once per attempt that left the sidecar, as soon as it is classified."""

    def misconfigured(self, attempt: Attempt) -> None:
        """Called for an attempt that could not be sent (no base URL)."""


@dataclass(slots=True)
class UpstreamReply:
    """The answer to return. ``head`` is the whole body when not streaming (or on
    a non-2xx status), else the first bytes of the stream; the rest is still in
    ``response``. The caller must release ``response``."""

    response: UpstreamResponse
    head: bytes
    streaming: bool
    attempt: Attempt
    attempts: int
    # Every classified attempt; for a stream, all but the answering one, which
    # the caller classifies when the stream ends (``complete``).
    records: list[AttemptRecord]
    # key id -> class or health state, for the x-keyplane-excluded header.
    excluded: dict[str, str]
    # Monotonic (loop) time and wall-clock time the answering attempt started.
    started_loop: float = 0.0
    started_wall: float = 0.0
    # A non-streamed answer's own record, not yet handed to the observer: the
    # caller does that once the answer is on its way to the app (it is
    # bookkeeping, so it stays off the response's path). None for a stream.
    record: AttemptRecord | None = None


@dataclass(frozen=True, slots=True)
class AttemptsFailed:
    """No attempt produced an answer to pass through."""

    error: errors.ErrorResponse
    attempts: int
    records: list[AttemptRecord] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


def describe(attempt: Attempt) -> str:
    key = attempt.key.id if attempt.key is not None else "-"
    return f"{attempt.target.provider.value}/{attempt.target.upstream_model} key={key}"


def excluded_header(excluded: Mapping[str, str]) -> str:
    """``pk_1:credential,pk_2:cooldown``."""
    return ",".join(f"{key_id}:{why}" for key_id, why in excluded.items())


def _slot(attempt: Attempt) -> tuple[str, str]:
    """What must not be tried twice in one request: a key (or keyless node) for a model."""
    who = attempt.key.id if attempt.key is not None else f"node:{attempt.node_url}"
    return who, attempt.target.upstream_model


def _next_index(
    plan: Sequence[Attempt],
    start: int,
    tried: set[tuple[str, str]],
    dead: set[str],
    blocked: BlockReason | None,
) -> int | None:
    """The index of the next attempt that would be made (pure peek)."""
    for i in range(start, len(plan)):
        attempt = plan[i]
        if _slot(attempt) in tried:
            continue
        if attempt.key is not None and attempt.key.id in dead:
            continue
        if blocked is not None and blocked(attempt) is not None:
            continue
        return i
    return None


# What a failed call is classified as (and its metrics label), prebuilt per error class.
_FAILED: dict[type[UpstreamError], tuple[Classification, str]] = {
    cls: (classify_exception(cls.kind), cls.label)
    for cls in (
        UpstreamConnectError,
        UpstreamTlsError,
        UpstreamTimeout,
        UpstreamMalformed,
        UpstreamAnswerCut,
        UpstreamTooLarge,
        UpstreamError,
    )
}


def _failed(exc: UpstreamError) -> tuple[Classification, str]:
    found = _FAILED.get(type(exc))
    return found if found is not None else (classify_exception(exc.kind), exc.label)


def _mark_recovered(records: list[AttemptRecord], provider: Provider) -> None:
    for record in records:
        if record.provider is provider:
            record.recovered = True


async def run_attempts(
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
    path: str = CHAT_PATH,
    content_type: str = JSON_TYPE,
    build: Callable[[Attempt, Mapping[str, str]], UpstreamRequest] | None = None,
) -> UpstreamReply | AttemptsFailed:
    """Try ``plan`` in order until an answer; ``deadline`` is in event-loop time.

    ``path`` is the endpoint's under each key's base URL, ``content_type`` the body's.

    ``blocked`` is asked before every attempt (health may have changed since the
    plan was made, by this very request); ``excluded`` seeds the header with the
    keys the plan already left out. ``attempts`` counts the calls that left the
    sidecar. ``build`` makes each attempt's request (chat completions by default).
    """
    loop = asyncio.get_running_loop()
    out: dict[str, str] = dict(excluded or {})
    records: list[AttemptRecord] = []
    tried: set[tuple[str, str]] = set()
    dead: set[str] = set()  # keys that failed their credentials in this request
    # The error body is built only if every attempt fails.
    failure: Callable[[], errors.ErrorResponse] = errors.bad_gateway
    sent = 0
    index = 0
    while index < len(plan):
        attempt = plan[index]
        index += 1
        if _slot(attempt) in tried or (attempt.key is not None and attempt.key.id in dead):
            continue
        why = blocked(attempt) if blocked is not None else None
        if why is not None:
            if attempt.key is not None:
                out.setdefault(attempt.key.id, why)
            continue
        remaining = deadline - loop.time()
        if remaining < _MIN_ATTEMPT_BUDGET:
            _log.warning("request deadline reached after %d attempt(s); giving up", sent)
            failure = errors.upstream_timeout
            break
        tried.add(_slot(attempt))
        started_loop = loop.time()
        started_wall = wall_clock()
        try:
            if build is None:
                request = build_request(attempt, app_headers, path, content_type)
            else:
                request = build(attempt, app_headers)
        except UpstreamConfigError as exc:
            _log.warning("skipping attempt %s: %s", describe(attempt), exc)
            observer.misconfigured(attempt)
            failure = _misconfigured
            continue
        # The call: the response, or ``failed`` when nothing usable came back.
        response: UpstreamResponse | None = None
        head = b""
        streaming = False
        failed: tuple[Classification, str] | None = None
        try:
            response = await upstream.send(request, body_for(attempt.target.upstream_model), time_left=remaining)
            streaming = stream and 200 <= response.status < 300
            # Read before committing: a failure here has sent nothing to the app yet.
            head = await (response.readany() if streaming else response.read(upstream.max_body_bytes))
        except UpstreamError as exc:
            failed = _failed(exc)
        except UpstreamConfigError as exc:  # refused by the client before anything was sent
            _log.warning("skipping attempt %s: %s", describe(attempt), exc)
            observer.misconfigured(attempt)
            failure = _misconfigured
            continue
        except BaseException:  # cancelled (the app hung up, shutdown): free the connection
            if response is not None:
                response.close()
            raise
        if failed is not None and response is not None:
            response.close()
            response = None
        sent += 1
        latency_ms = max(0, round((loop.time() - started_loop) * 1000))
        if response is not None:
            if streaming:
                # Committed: the first bytes are in. How the stream ends is the caller's to classify.
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug(
                        "attempt %d %s: streaming %d after %d ms", sent, describe(attempt), response.status, latency_ms
                    )
                _mark_recovered(records, attempt.target.provider)
                return UpstreamReply(
                    response=response,
                    head=head,
                    streaming=True,
                    attempt=attempt,
                    attempts=sent,
                    records=records,
                    excluded=out,
                    started_loop=started_loop,
                    started_wall=started_wall,
                )
            classification = classify_status(response.status, response.headers, head, wall_clock)
            outcome = _outcome_label(response.status)
        else:
            assert failed is not None
            classification, outcome = failed
        cls = classification.error_class
        if (cls is ErrorClass.CREDENTIAL or cls is ErrorClass.EXHAUSTED) and attempt.key is not None:
            dead.add(attempt.key.id)  # bad for every model: no other target of this request retries it
        following = _next_index(plan, index, tried, dead, blocked) if cls not in _ANSWERS else None
        record = AttemptRecord(
            attempt=attempt,
            classification=classification,
            started=started_wall,
            latency_ms=latency_ms,
            outcome=outcome,
            provider_final=following is None or plan[following].target.provider is not attempt.target.provider,
            retried=following is not None,
        )
        _log_attempt(sent, record)
        records.append(record)
        # The last failure goes back as it is, except a failed credential: the provider's
        # 401 would tell the app its own key is wrong (and quote parts of ours).
        if response is not None and (cls in _ANSWERS or (following is None and cls is not ErrorClass.CREDENTIAL)):
            if cls is ErrorClass.SUCCESS:
                _mark_recovered(records[:-1], attempt.target.provider)
            elif attempt.key is not None and classification.penalises:
                # The last attempt failed too; its answer goes back as it is.
                out.setdefault(attempt.key.id, cls.value)
            return UpstreamReply(
                response=response,
                head=head,
                streaming=False,
                attempt=attempt,
                attempts=sent,
                records=records,
                excluded=out,
                started_loop=started_loop,
                started_wall=started_wall,
                record=record,
            )
        observer.attempted(record)
        if response is not None:
            response.release()
        if attempt.key is not None:
            out.setdefault(attempt.key.id, cls.value)
        if cls is ErrorClass.CREDENTIAL:
            if all(r.classification.error_class is ErrorClass.CREDENTIAL for r in records):
                failure = functools.partial(_credentials_failed, attempt.target.provider)
            # else: an earlier attempt's failure (5xx, timeout) says more than this one.
        else:
            failure = errors.upstream_timeout if outcome == "timeout" else _bad_gateway_for(outcome)
        if following is None:
            break
    return AttemptsFailed(error=failure(), attempts=sent, records=records, excluded=out)


_TOO_LARGE = UpstreamTooLarge.label


def _bad_gateway_for(outcome: str) -> Callable[[], errors.ErrorResponse]:
    if outcome == _TOO_LARGE:
        return _too_large
    return errors.bad_gateway


def _too_large() -> errors.ErrorResponse:
    return errors.bad_gateway("The upstream's answer is larger than the sidecar accepts (--upstream-max-body-bytes).")


def _credentials_failed(provider: Provider) -> errors.ErrorResponse:
    return errors.no_usable_key(None, reason="credentials", providers=[(provider.value, "credentials")])


def _misconfigured() -> errors.ErrorResponse:
    return errors.bad_gateway("No upstream is configured correctly for this model.")


def complete(reply: UpstreamReply, classification: Classification, *, now_loop: float) -> AttemptRecord:
    """The record of a streamed answer once its stream has ended (or broken)."""
    status = reply.response.status
    return AttemptRecord(
        attempt=reply.attempt,
        classification=classification,
        started=reply.started_wall,
        latency_ms=max(0, round((now_loop - reply.started_loop) * 1000)),
        outcome=_outcome_label(status),
        provider_final=True,
    )


def _log_attempt(number: int, record: AttemptRecord) -> None:
    # Per request, so DEBUG: a success, or the app's own error passed through.
    # Failures that count against a key or provider stay WARNING (not per request in steady state).
    c = record.classification
    if c.error_class is ErrorClass.SUCCESS:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("attempt %d %s: %d in %d ms", number, describe(record.attempt), c.status, record.latency_ms)
        return
    level = logging.DEBUG if c.error_class is ErrorClass.CLIENT_ERROR else logging.WARNING
    if not _log.isEnabledFor(level):
        return
    then = "; trying the next attempt" if record.retried else ""
    _log.log(
        level,
        "attempt %d %s: %s (%s) in %d ms%s",
        number,
        describe(record.attempt),
        c.error_class.value,
        c.reason,
        record.latency_ms,
        then,
    )
