"""Pushed and local health in SidecarState, driven by real watch messages and real
classifications of provider error bodies (no I/O)."""

from __future__ import annotations

import json

from keyplane.domain import Provider
from keyplane.health.classify import classify_response
from keyplane.health.machine import HealthPolicy, Outcome
from keyplane.v1 import sidecar_service_pb2
from sidecar.state import SidecarState
from tests.fakes.upstream import GEMINI_INVALID_API_KEY, rate_limited

from . import protos as p

T0 = 1_700_000_000.0
POLICY = HealthPolicy(rate_limit_default=5.0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_state() -> tuple[SidecarState, Clock]:
    clock = Clock()
    return SidecarState(wall_clock=clock, health_policy=POLICY), clock


def snapshot(version: int = 5, **health: object) -> sidecar_service_pb2.WatchResponse:
    return p.snapshot(
        version,
        p.tenant_state(
            "acme",
            keys=[p.pkey("k1", "sk-1", provider=p.GEMINI), p.pkey("k2", "sk-2", provider=p.GEMINI)],
            routes=[p.route("r1", "chat", p.target("gemini-2.0-flash", provider=p.GEMINI))],
            client_keys=[p.client_key("c1", "tok-acme")],
            **health,  # type: ignore[arg-type]
        ),
    )


def credential_failure(key_id: str = "k1", model: str = "gemini-2.0-flash") -> Outcome:
    body = json.dumps(GEMINI_INVALID_API_KEY.body).encode()
    classification = classify_response(400, {"content-type": "application/json"}, body, now=T0)
    return Outcome(
        key_id=key_id, provider=Provider.GEMINI, model=model, classification=classification, provider_final=False
    )


def usable(state: SidecarState, key_id: str, model: str = "gemini-2.0-flash") -> bool:
    return state.health("acme").key_usable(key_id, model, state.wall_clock())


def test_snapshot_health_is_adopted() -> None:
    state, clock = make_state()
    state.apply(
        snapshot(
            key_health=[p.key_health("k1"), p.key_health("k2", "gemini-pro", p.COOLDOWN, until=T0 + 10)],
            provider_health=[p.provider_health(p.GEMINI, "gemini-2.0-flash", until=T0 + 30)],
        )
    )
    health = state.health("acme")
    assert not usable(state, "k1") and not usable(state, "k1", "gemini-pro")
    assert health.key_block_reason("k1", "gemini-pro", clock.now) == "unhealthy"
    assert usable(state, "k2") and not usable(state, "k2", "gemini-pro")
    assert health.key_block_reason("k2", "gemini-pro", clock.now) == "cooldown"
    assert health.provider_degraded(Provider.GEMINI, "gemini-2.0-flash", clock.now)
    assert not health.provider_degraded(Provider.GEMINI, "gemini-pro", clock.now)
    clock.now = T0 + 31
    assert usable(state, "k2", "gemini-pro")
    assert not health.provider_degraded(Provider.GEMINI, "gemini-2.0-flash", clock.now)
    assert not usable(state, "k1")  # until an admin resets it


def test_deltas_push_and_clear_health() -> None:
    state, clock = make_state()
    state.apply(snapshot())
    state.apply(p.delta(p.key_health_put(6, "acme", p.key_health("k1", "gemini-2.0-flash", p.COOLDOWN, until=T0 + 2))))
    assert state.version == 6
    assert not usable(state, "k1") and usable(state, "k1", "gemini-pro")
    state.apply(p.delta(p.key_health_put(7, "acme", p.key_health("k1", "gemini-2.0-flash", p.HEALTHY))))
    assert usable(state, "k1")
    state.apply(p.delta(p.provider_health_put(8, "acme", p.provider_health(p.GEMINI, "m", until=T0 + 5))))
    assert state.health("acme").provider_degraded(Provider.GEMINI, "m", clock.now)
    state.apply(p.delta(p.provider_health_put(9, "acme", p.provider_health(p.GEMINI, "m", p.HEALTHY))))
    assert not state.health("acme").provider_degraded(Provider.GEMINI, "m", clock.now)


def test_local_findings_apply_at_once_and_a_pushed_reset_clears_them() -> None:
    state, _ = make_state()
    state.apply(snapshot())
    state.health("acme").record(credential_failure(), state.wall_clock())
    assert not usable(state, "k1") and not usable(state, "k1", "another-model")
    assert usable(state, "k2")
    # The control plane confirms, then an admin resets the key.
    state.apply(p.delta(p.key_health_put(6, "acme", p.key_health("k1"))))
    assert not usable(state, "k1")
    state.apply(p.delta(p.key_health_put(7, "acme", p.key_health("k1", state=p.HEALTHY))))
    assert usable(state, "k1")


def test_local_rate_limit_is_per_model_and_expires() -> None:
    state, clock = make_state()
    state.apply(snapshot())
    reply = rate_limited(2)
    classification = classify_response(429, reply.headers, json.dumps(reply.body).encode(), now=clock.now)
    outcome = Outcome("k1", Provider.GEMINI, "model-a", classification, provider_final=False)
    state.health("acme").record(outcome, clock.now)
    assert not usable(state, "k1", "model-a")
    assert usable(state, "k1", "model-b")
    clock.now += 2.5
    assert usable(state, "k1", "model-a")


def test_reenabling_or_rotating_a_key_resets_local_findings() -> None:
    state, _ = make_state()
    state.apply(snapshot())
    state.health("acme").record(credential_failure(), state.wall_clock())
    # Still active, same secret (e.g. a label change): nothing is forgotten.
    state.apply(p.delta(p.key_put(6, "acme", p.pkey("k1", "sk-1", provider=p.GEMINI, weight=3))))
    assert not usable(state, "k1")
    # Disabled, then enabled again.
    state.apply(p.delta(p.key_put(7, "acme", p.pkey("k1", "sk-1", provider=p.GEMINI, status=p.DISABLED))))
    state.apply(p.delta(p.key_put(8, "acme", p.pkey("k1", "sk-1", provider=p.GEMINI))))
    assert usable(state, "k1")
    # Rotated: a new secret.
    state.health("acme").record(credential_failure(), state.wall_clock())
    assert not usable(state, "k1")
    state.apply(p.delta(p.key_put(9, "acme", p.pkey("k1", "sk-1-rotated", provider=p.GEMINI))))
    assert usable(state, "k1")


def test_a_full_snapshot_is_the_whole_verdict_local_findings_start_over() -> None:
    state, _ = make_state()
    state.apply(snapshot(key_health=[p.key_health("k1")]))
    state.health("acme").record(credential_failure("k1"), state.wall_clock())
    state.health("acme").record(credential_failure("k2"), state.wall_clock())
    assert not usable(state, "k1") and not usable(state, "k2")
    # Reconnected after a gap it could not resume from: an admin reset k1, and k2 (whose
    # finding the control plane never heard of) may have been reset too; this sidecar
    # cannot tell, so the snapshot wins for both.
    state.apply(snapshot(20))
    assert usable(state, "k1")
    assert usable(state, "k2")
    # A key that is still bad is learnt again from its next failure.
    state.health("acme").record(credential_failure("k2"), state.wall_clock())
    assert not usable(state, "k2")
    # What the snapshot itself says is kept.
    state.apply(snapshot(30, key_health=[p.key_health("k1")]))
    assert not usable(state, "k1")
    assert usable(state, "k2")


def test_deleted_keys_and_tenants_drop_their_health() -> None:
    state, _ = make_state()
    state.apply(snapshot(key_health=[p.key_health("k2")]))
    state.health("acme").record(credential_failure("k1"), state.wall_clock())
    state.apply(p.delta(p.key_deleted(6, "acme", "k1")))
    assert usable(state, "k1")  # forgotten (and no longer a key anyway)
    state.apply(p.delta(p.tenant_deleted(7, "acme")))
    assert usable(state, "k2")
