"""Prometheus metrics on a registry of the sidecar's own (no global state).

Label values are bounded (endpoint names, status classes, provider names,
outcome kinds, error classes, drop reasons); no key ids, client keys, models or secrets.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from .state import SidecarState
from .usage_metrics import UsageCounters

__all__ = ["CONTENT_TYPE", "LabelledChildren", "SidecarMetrics", "status_class"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_STATUS_CLASSES = {n: f"{n}xx" for n in range(10)}


def status_class(status: int) -> str:
    n = status // 100
    found = _STATUS_CLASSES.get(n)
    return found if found is not None else f"{n}xx"


class LabelledChildren:
    """The labelled children of one counter, looked up once per label tuple.

    ``Counter.labels()`` validates, hashes and takes a lock on every call; the
    request path calls ``get(...).inc()`` instead. Label values are bounded
    (see the module docstring), so the cache is too.
    """

    __slots__ = ("_children", "_counter")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[tuple[str, ...], Counter] = {}

    def get(self, *labels: str) -> Counter:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._counter.labels(*labels)
        return child


class SidecarMetrics:
    def __init__(self, state: SidecarState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.usage = UsageCounters(self.registry)
        self.requests = Counter(
            "keyplane_sidecar_requests",
            "HTTP requests served to the app, by endpoint and status class.",
            ["endpoint", "status_class"],
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "keyplane_sidecar_upstream_attempts",
            "Upstream attempts, by provider and outcome (2xx..5xx, connect_error, tls_error, timeout, "
            "malformed, cut, too_large, config_error).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "keyplane_sidecar_upstream_fallbacks",
            "Attempts abandoned for the next key or target of the plan, by provider.",
            ["provider"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "keyplane_sidecar_stream_errors",
            "Streams cut after the first byte reached the app, by provider.",
            ["provider"],
            registry=self.registry,
        )
        self.attempt_classes = Counter(
            "keyplane_sidecar_upstream_attempt_classes",
            "Upstream attempts by provider and error class (success, credential, rate_limited, ...).",
            ["provider", "error_class"],
            registry=self.registry,
        )
        self.outcomes_sent = Counter(
            "keyplane_sidecar_outcomes_reported",
            "Attempt outcomes sent to the control plane.",
            registry=self.registry,
        )
        self.outcomes_dropped = Counter(
            "keyplane_sidecar_outcomes_dropped",
            "Attempt outcomes dropped before reaching the control plane, by reason (queue_full, stale, unsent).",
            ["reason"],
            registry=self.registry,
        )
        self.rescues = Counter(
            "keyplane_sidecar_no_usable_key_actions",
            "What requests that found no usable key did (sidecar.rescue): probe_ok, probe_failed, "
            "waited_for_probe, waited_for_rate_limit, answered_429, answered_503_<reason>.",
            ["action"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "keyplane_sidecar_client_disconnects",
            "Requests abandoned because the app disconnected.",
            registry=self.registry,
        )
        version = Gauge(
            "keyplane_sidecar_state_version",
            "Version of the state received from the control plane.",
            registry=self.registry,
        )
        version.set_function(lambda: float(state.version))
        ready = Gauge(
            "keyplane_sidecar_state_ready",
            "1 once a full snapshot has been received.",
            registry=self.registry,
        )
        ready.set_function(lambda: 1.0 if state.is_ready else 0.0)
        connected = Gauge(
            "keyplane_sidecar_watch_connected",
            "1 while a watch stream from the control plane is live.",
            registry=self.registry,
        )
        connected.set_function(lambda: 1.0 if state.connected else 0.0)
        age = Gauge(
            "keyplane_sidecar_state_age_seconds",
            "Seconds since the state was last known in sync (0 while connected, -1 before any).",
            registry=self.registry,
        )
        age.set_function(lambda: _age(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _age(state: SidecarState) -> float:
    age = state.age()
    return -1.0 if age is None else age
