"""The attempt loop: walk the plan until an upstream answer can be returned.

For this foundation the rule is simple: a connect error, a timeout, a 5xx,
401, 403 or 429 before any byte went to the app moves on to the next attempt;
anything else (and the last attempt, whatever it got) is the answer. The
decision lives in ``should_fall_back`` so error classification can grow there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from . import errors
from .router import Attempt
from .upstream import UpstreamClient, UpstreamConfigError

__all__ = ["AttemptsFailed", "UpstreamReply", "run_attempts", "should_fall_back"]

_log = logging.getLogger(__name__)

_FALL_BACK_STATUSES = frozenset({401, 403, 429})

# (attempt, outcome, fell_back) -> None; outcome is "2xx".."5xx", "connect_error",
# "timeout" or "config_error".
OnAttempt = Callable[[Attempt, str, bool], None]


def should_fall_back(status: int) -> bool:
    """Whether an upstream status is worth another key or target."""
    return status >= 500 or status in _FALL_BACK_STATUSES


@dataclass(slots=True)
class UpstreamReply:
    """The answer to return. ``head`` is the whole body when not streaming (or on
    a non-2xx status), else the first bytes of the stream; the rest is still in
    ``response.content``. The caller must release ``response``."""

    response: aiohttp.ClientResponse
    head: bytes
    streaming: bool
    attempt: Attempt
    attempts: int


@dataclass(frozen=True, slots=True)
class AttemptsFailed:
    """No attempt produced an answer to pass through."""

    error: errors.ErrorResponse
    attempts: int


def _describe(attempt: Attempt) -> str:
    key = attempt.key.id if attempt.key is not None else "-"
    return f"{attempt.target.provider.value}/{attempt.target.upstream_model} key={key}"


async def run_attempts(
    upstream: UpstreamClient,
    plan: Sequence[Attempt],
    body_for: Callable[[str], bytes],
    app_headers: Mapping[str, str],
    *,
    stream: bool,
    on_attempt: OnAttempt,
) -> UpstreamReply | AttemptsFailed:
    """Try ``plan`` in order; ``attempts`` counts the calls that left the sidecar."""
    failure = errors.bad_gateway()
    sent = 0
    for index, attempt in enumerate(plan):
        is_last = index == len(plan) - 1
        try:
            response = await upstream.chat_completion(attempt, body_for(attempt.target.upstream_model), app_headers)
        except UpstreamConfigError as exc:
            _log.warning("skipping attempt %s: %s", _describe(attempt), exc)
            on_attempt(attempt, "config_error", not is_last)
            failure = errors.bad_gateway("No upstream is configured correctly for this model.")
            continue
        except TimeoutError:
            sent += 1
            _log.warning("upstream %s timed out", _describe(attempt))
            on_attempt(attempt, "timeout", not is_last)
            failure = errors.upstream_timeout()
            continue
        except aiohttp.ClientError as exc:
            sent += 1
            _log.warning("upstream %s unreachable: %s", _describe(attempt), type(exc).__name__)
            on_attempt(attempt, "connect_error", not is_last)
            failure = errors.bad_gateway()
            continue
        sent += 1
        streaming = stream and 200 <= response.status < 300
        try:
            # Read before committing: a failure here has sent nothing to the app yet.
            head = await (response.content.readany() if streaming else response.read())
        except TimeoutError:
            response.close()
            _log.warning("upstream %s timed out before the first byte", _describe(attempt))
            on_attempt(attempt, "timeout", not is_last)
            failure = errors.upstream_timeout()
            continue
        except aiohttp.ClientError as exc:
            response.close()
            _log.warning("upstream %s failed before the first byte: %s", _describe(attempt), type(exc).__name__)
            on_attempt(attempt, "connect_error", not is_last)
            failure = errors.bad_gateway()
            continue
        outcome = f"{response.status // 100}xx"
        if not is_last and should_fall_back(response.status):
            _log.warning("upstream %s answered %d; trying the next attempt", _describe(attempt), response.status)
            response.release()
            on_attempt(attempt, outcome, True)
            continue
        on_attempt(attempt, outcome, False)
        return UpstreamReply(response=response, head=head, streaming=streaming, attempt=attempt, attempts=sent)
    return AttemptsFailed(error=failure, attempts=sent)
