"""The background recovery probe of exhausted keys (off the request path).

A key out of credits or quota is benched key-wide (``HEALTH_STATE_EXHAUSTED``
until ``until``; see ``keyplane.health.exhaustion``). From ``lead`` seconds
before its bench ends, one control-plane replica sends the key's provider one
cheap request with the key:

- ``completion`` (the default for every provider kind): ``POST
  {base_url}/chat/completions`` with ``max_tokens: 1`` for a model the key
  serves (its first allowed model, else the first route target of its
  provider). This is the probe that sees billing: listing models is free at
  most providers, so it succeeds on an empty account.
- ``models``: ``GET {base_url}/models``, for providers whose model listing
  is refused when the account is exhausted (or self-hosted servers).

What the answer means (``decide``):
- success (or a plain rate limit: the account is billed again, only busy):
  the key is restored, written as HEALTHY key-wide, which every sidecar of
  the tenant reads as "forget what you learnt about this key";
- exhausted again: the bench is extended, doubling its last length up to
  ``exhausted_max_bench``, with the provider's fresh reason;
- a credential failure: the key is marked UNHEALTHY (until an admin acts);
- anything else (timeout, 5xx, a 400 about the probe, a base URL the URL
  policy refuses): inconclusive; the bench is extended by the first bench
  length and the reason kept.

Only one replica probes a key at a time: the probe holds the store lease
``recovery-probe:<key id>`` (``Store.try_lease``) from re-reading the stored
verdict to writing the new one, and skips the key when the stored bench is
no longer due (another replica has just probed it). Writes go through the
store and ``hub.catch_up()`` like any other replica's health change, so the
aggregators of every replica adopt them and the sidecars receive them.

Requests use httpx, never follow redirects, read at most 64 KiB of an
answer, and never log the URL's credentials or the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx

from control_plane.hub import SnapshotHub
from control_plane.store.base import Store
from control_plane.url_policy import UrlPolicy
from keyplane import convert
from keyplane.domain import HealthState, KeyHealth, Provider
from keyplane.errors import KeyplaneError
from keyplane.health.classify import Classification, ErrorClass, classify_exception, classify_response
from keyplane.health.exhaustion import bench_period, probe_due
from keyplane.health.machine import HealthPolicy
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = [
    "PROBE_KINDS",
    "ProbeKind",
    "ProbePlan",
    "ProberStats",
    "RecoveryProbeConfig",
    "RecoveryProber",
    "decide",
    "plan_probe",
]

log = logging.getLogger(__name__)

ProbeKind = Literal["completion", "models"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("completion", "models")

# The providers' OpenAI-compatible base URLs when a key names none (as the sidecar uses them).
_DEFAULT_BASE_URLS: Mapping[Provider, str] = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com/v1",
    Provider.GEMINI: "https://generativelanguage.googleapis.com/v1beta/openai",
    Provider.OPENROUTER: "https://openrouter.ai/api/v1",
}
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class RecoveryProbeConfig:
    """``kinds``: the probe per provider kind (else ``completion``)."""

    enabled: bool = True
    interval: float = 5.0  # seconds between looks at the benched keys
    timeout: float = 10.0  # seconds one probe request may take
    lead: float = 15.0  # probe this many seconds before a bench ends
    concurrency: int = 4  # probes in flight at once per replica
    kinds: Mapping[Provider, ProbeKind] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"recovery probe {name} must be a positive number of seconds")
        if not self.lead >= 0:
            raise ValueError("recovery probe lead must be a number of seconds >= 0")
        if self.concurrency < 1:
            raise ValueError("recovery probe concurrency must be at least 1")
        for provider, kind in self.kinds.items():
            if kind not in PROBE_KINDS:
                raise ValueError(f"unknown recovery probe {kind!r} for {provider.value}")

    def kind(self, provider: Provider) -> ProbeKind:
        return self.kinds.get(provider, "completion")


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """One probe request. Carries the secret: never logged or repr'd."""

    method: Literal["GET", "POST"]
    url: str
    headers: dict[str, str] = field(repr=False)
    json: dict[str, Any] | None = field(default=None, repr=False)


def _base_url(key: sidecar_service_pb2.SidecarProviderKey, provider: Provider, targets: list[Any]) -> str | None:
    if key.base_url:
        return key.base_url
    if provider is Provider.VLLM:
        return next((t.node_urls[0] for t in targets if t.node_urls), None)
    return _DEFAULT_BASE_URLS.get(provider)


def plan_probe(
    key: sidecar_service_pb2.SidecarProviderKey, routes: Sequence[resources_pb2.Route], kind: ProbeKind
) -> ProbePlan | None:
    """The probe request for ``key`` (pure); None when no base URL is known.
    A ``completion`` probe without a model to ask for falls back to ``models``."""
    provider = convert.provider_from_proto(key.provider)
    if provider is None:
        return None
    allowed = set(key.allowed_models)
    targets = [
        target
        for route in sorted(routes, key=lambda r: r.public_model)
        for target in sorted(route.targets, key=lambda t: t.priority)
        if target.provider == key.provider and (not allowed or target.upstream_model in allowed)
    ]
    base = _base_url(key, provider, targets)
    if not base:
        return None
    headers = {"accept": "application/json", "user-agent": "keyplane-recovery-probe"}
    if provider is Provider.AZURE_OPENAI:
        headers["api-key"] = key.secret
    else:
        headers["authorization"] = f"Bearer {key.secret}"
    model = key.allowed_models[0] if key.allowed_models else (targets[0].upstream_model if targets else "")
    if kind == "completion" and model:
        body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        return ProbePlan("POST", base.rstrip("/") + "/chat/completions", headers, body)
    return ProbePlan("GET", base.rstrip("/") + "/models", headers)


def decide(
    classification: Classification, current: KeyHealth, now: float, policy: HealthPolicy
) -> tuple[str, KeyHealth]:
    """What a probe's answer does to the benched key (pure): the outcome
    ("restored", "extended", "credential" or "inconclusive") and the record
    to write."""
    updated = convert.datetime_from_epoch(now)
    kind = classification.error_class
    if kind in (ErrorClass.SUCCESS, ErrorClass.RATE_LIMITED):
        return "restored", KeyHealth(
            current.tenant, current.key_id, "", HealthState.HEALTHY, None, "recovery probe succeeded", updated
        )
    if kind is ErrorClass.CREDENTIAL:
        return "credential", KeyHealth(
            current.tenant, current.key_id, "", HealthState.UNHEALTHY, None, classification.reason, updated
        )
    initial, cap = policy.exhausted_bench, policy.exhausted_max_bench
    if kind is ErrorClass.EXHAUSTED:
        previous = None
        if current.until is not None:
            previous = (current.until - current.updated_at).total_seconds()
        until = now + bench_period(previous, initial, cap)
        return "extended", KeyHealth(
            current.tenant,
            current.key_id,
            "",
            HealthState.EXHAUSTED,
            convert.datetime_from_epoch(until),
            classification.reason,
            updated,
        )
    until = now + bench_period(None, initial, cap)
    return "inconclusive", KeyHealth(
        current.tenant,
        current.key_id,
        "",
        HealthState.EXHAUSTED,
        convert.datetime_from_epoch(until),
        current.reason,
        updated,
    )


@dataclass(slots=True)
class ProberStats:
    """Counters since start (for logs and tests)."""

    probes: int = 0
    restored: int = 0
    extended: int = 0
    credential: int = 0
    inconclusive: int = 0
    lease_busy: int = 0


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else convert.epoch_from_datetime(value)


class RecoveryProber:
    """``await start()`` runs the probe loop; ``await close()`` stops it."""

    def __init__(
        self,
        store: Store,
        hub: SnapshotHub,
        policy: HealthPolicy,
        url_policy: UrlPolicy,
        config: RecoveryProbeConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._hub = hub
        self._policy = policy
        self._url_policy = url_policy
        self._config = config
        self._clock = clock
        self._inflight: set[str] = set()
        self._slots = asyncio.Semaphore(config.concurrency)
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = ProberStats()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._config.timeout), follow_redirects=False, trust_env=False
        )
        self._task = asyncio.create_task(self._loop(), name="recovery-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("recovery probe pass failed")
            await asyncio.sleep(self._config.interval)

    def due(self) -> list[tuple[str, str]]:
        """(tenant, key id) of every exhausted key whose probe is due, as this replica's snapshot says."""
        now = self._clock()
        cache = self._hub.cache
        found: list[tuple[str, str]] = []
        for tenant in cache.tenant_names():
            health = cache.health(tenant)
            if health is None:
                continue
            for entry in health[0]:
                if entry.model or entry.state != resources_pb2.HEALTH_STATE_EXHAUSTED or not entry.HasField("until"):
                    continue
                if probe_due(entry.until.ToNanoseconds() / 1e9, now, self._config.lead):
                    if entry.key_id not in self._inflight:
                        found.append((tenant, entry.key_id))
        return found

    async def run_once(self) -> list[str]:
        """Probe every due key once; the outcomes (for tests)."""
        due = self.due()
        if not due:
            return []
        results = await asyncio.gather(*(self._probe_key(tenant, key_id) for tenant, key_id in due))
        return [r for r in results if r is not None]

    def _lookup(
        self, tenant: str, key_id: str
    ) -> tuple[sidecar_service_pb2.SidecarProviderKey | None, Sequence[resources_pb2.Route]]:
        try:
            snapshot = self._hub.cache.snapshot(frozenset({tenant})).snapshot
        except KeyplaneError:
            return None, ()
        for state in snapshot.tenants:
            for key in state.keys:
                if key.id == key_id:
                    return key, state.routes
        return None, ()

    async def _probe_key(self, tenant: str, key_id: str) -> str | None:
        if key_id in self._inflight:
            return None
        self._inflight.add(key_id)
        try:
            async with self._slots:
                version: int | None = None
                async with self._store.try_lease(f"recovery-probe:{key_id}") as held:
                    if not held:
                        self.stats.lease_busy += 1
                        return None
                    current = await self._store.get_key_health(tenant, key_id, "")
                    if (
                        current is None
                        or current.state is not HealthState.EXHAUSTED
                        or not probe_due(_epoch(current.until), self._clock(), self._config.lead)
                    ):
                        return None  # restored, re-benched or reset meanwhile (by another replica, or an admin)
                    classification = await self._probe(tenant, key_id)
                    outcome, record = decide(classification, current, self._clock(), self._policy)
                    version = await self._store.put_key_health(record)
                self._count(outcome)
                log_level = logging.INFO if outcome == "restored" else logging.WARNING
                log.log(
                    log_level,
                    "tenant %s: recovery probe of exhausted key %s: %s (%s)",
                    tenant,
                    key_id,
                    outcome,
                    classification.reason,
                )
                if version is not None:
                    try:
                        await self._hub.catch_up()
                    except Exception as exc:
                        log.warning("recovery probe result persisted but not yet published: %s", type(exc).__name__)
                return outcome
        except Exception as exc:
            log.warning("tenant %s: recovery probe of key %s failed: %s", tenant, key_id, type(exc).__name__)
            return None
        finally:
            self._inflight.discard(key_id)

    def _count(self, outcome: str) -> None:
        self.stats.probes += 1
        if outcome == "restored":
            self.stats.restored += 1
        elif outcome == "extended":
            self.stats.extended += 1
        elif outcome == "credential":
            self.stats.credential += 1
        else:
            self.stats.inconclusive += 1

    async def _probe(self, tenant: str, key_id: str) -> Classification:
        """Send the probe; its answer classified like an app request's."""
        key, routes = self._lookup(tenant, key_id)
        if key is None or key.status != resources_pb2.KEY_STATUS_ACTIVE or not key.secret:
            return Classification(ErrorClass.UPSTREAM_ERROR, 0, "key not usable by sidecars")
        provider = convert.provider_from_proto(key.provider)
        kind = self._config.kind(provider) if provider is not None else "completion"
        plan = plan_probe(key, routes, kind)
        if plan is None:
            return Classification(ErrorClass.UPSTREAM_ERROR, 0, "no base URL to probe")
        try:
            self._url_policy.check(plan.url, field="base_url")
        except KeyplaneError as exc:
            return Classification(ErrorClass.UPSTREAM_ERROR, 0, f"not probed: {exc}")
        client = self._client
        if client is None:
            return Classification(ErrorClass.UPSTREAM_ERROR, 0, "prober closed")
        try:
            async with client.stream(plan.method, plan.url, headers=plan.headers, json=plan.json) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= _MAX_ANSWER:
                        break
                return classify_response(response.status_code, response.headers, bytes(body), now=self._clock())
        except httpx.TimeoutException:
            return classify_exception("timeout")
        except httpx.HTTPError:
            return classify_exception("connect")
