"""Pure key and provider health: error classification and the health state machine.

No I/O, no asyncio, no clock of its own: callers pass ``now`` (wall-clock epoch seconds).
"""

from keyplane.health.classify import (
    Classification,
    ErrorClass,
    classify_exception,
    classify_response,
    parse_retry_after,
    stream_broken,
)
from keyplane.health.machine import (
    HealthBook,
    HealthChange,
    HealthPolicy,
    KeyScope,
    Outcome,
    ProviderScope,
    Scope,
    Verdict,
)

__all__ = [
    "Classification",
    "ErrorClass",
    "HealthBook",
    "HealthChange",
    "HealthPolicy",
    "KeyScope",
    "Outcome",
    "ProviderScope",
    "Scope",
    "Verdict",
    "classify_exception",
    "classify_response",
    "parse_retry_after",
    "stream_broken",
]
