"""The sidecar's version gate (sidecar/ack.py): what it applies, what it
rejects while keeping the version it held, and when it asks for a resync.
Fed real watch messages into a real ``SidecarState``."""

from __future__ import annotations

import pytest

from keyplane.domain import Provider
from keyplane.v1 import resources_pb2
from sidecar import ack
from sidecar.ack import VersionGate, check_messages
from sidecar.state import SidecarState
from tests.sidecar import protos as p

# A provider kind a newer control plane might send.
UNKNOWN_PROVIDER = resources_pb2.Provider.ValueType(99)


def held(gate_state: SidecarState) -> SidecarState:
    gate_state.apply(
        p.snapshot(
            10,
            p.tenant_state(
                "acme",
                keys=[p.pkey("k1", "sk-one"), p.pkey("g1", "g-key", provider=p.GEMINI)],
                routes=[p.route("r1", "gpt", p.target("gpt-4o"))],
            ),
        )
    )
    return gate_state


def test_a_route_to_an_unknown_provider_is_rejected_and_the_old_version_kept() -> None:
    state = held(SidecarState())
    gate = VersionGate(state)
    bad = p.delta(
        p.key_put(11, "acme", p.pkey("k1", "", status=p.DISABLED)),
        p.route_put(12, "acme", p.route("r2", "new-model", p.target("m", provider=UNKNOWN_PROVIDER))),
    )
    decision = gate.offer(bad)
    assert (decision.applied, decision.resync) == (False, False)
    assert gate.rejected_version == 12
    assert "route 'new-model' (r2) of tenant acme names provider #99" in gate.error_detail
    # Nothing of the rejected message was applied: the key disable in it neither.
    assert state.version == 10
    assert [k.id for k in state.keys("acme", Provider.OPENAI)] == ["k1"]
    assert state.route("acme", "new-model") is None

    # A later message alone would be fine, but it still stands on the rejected one.
    more = p.delta(p.client_key_put(13, "acme", p.client_key("c1", "tok")))
    assert not gate.offer(more).applied
    assert gate.rejected_version == 13 and state.version == 10

    # The admin deletes the bad route: everything held back applies, in order.
    fix = p.delta(p.route_deleted(14, "acme", "r2"))
    assert gate.offer(fix).applied
    assert state.version == 14
    assert (gate.rejected_version, gate.error_detail) == (0, "")
    assert state.keys("acme", Provider.OPENAI) == ()  # the disable from version 11
    assert state.authenticate("tok") == "acme"  # the client key from version 13
    assert state.route("acme", "new-model") is None


def test_providers_outside_the_served_set_are_rejected_even_in_the_first_snapshot() -> None:
    state = SidecarState()
    gate = VersionGate(state, [Provider.OPENAI, Provider.ANTHROPIC])
    first = p.snapshot(
        5,
        p.tenant_state(
            "acme",
            routes=[
                p.route("r1", "gpt", p.target("gpt-4o")),
                p.route("r2", "gem", p.target("gpt-4o"), p.target("gemini-2.0-flash", provider=p.GEMINI)),
            ],
        ),
    )
    assert not gate.offer(first).applied
    assert gate.error_detail == (
        "route 'gem' (r2) of tenant acme targets provider gemini, which this sidecar does not serve (--provider)"
    )
    assert not state.is_ready and state.version == 0  # nothing to serve from yet
    # A snapshot without that route is taken (a snapshot replaces what was pending).
    fixed = p.snapshot(6, p.tenant_state("acme", routes=[p.route("r1", "gpt", p.target("gpt-4o"))]))
    assert gate.offer(fixed).applied
    assert state.is_ready and state.version == 6


def test_a_snapshot_older_than_the_held_version_is_refused_unless_it_is_a_reset() -> None:
    state = held(SidecarState())
    gate = VersionGate(state)
    older = p.snapshot(8, p.tenant_state("acme"))
    decision = gate.offer(older)
    assert (decision.applied, decision.resync) == (False, True)
    assert gate.error_detail == "snapshot at version 8 is older than the held version 10"
    assert state.version == 10 and state.route("acme", "gpt") is not None

    older.version_reset = True  # the store itself went back (restored from a backup)
    assert gate.offer(older).applied
    assert state.version == 8 and state.route("acme", "gpt") is None


def test_too_many_changes_held_back_ask_for_a_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ack, "MAX_PENDING_CHANGES", 3)
    state = held(SidecarState())
    gate = VersionGate(state)
    bad = p.delta(p.route_put(11, "acme", p.route("r2", "x", p.target("m", provider=UNKNOWN_PROVIDER))))
    assert gate.offer(bad).resync is False
    for version in (12, 13, 14):  # the fourth change held back is one too many
        decision = gate.offer(p.delta(p.client_key_put(version, "acme", p.client_key(f"c{version}", "t"))))
    assert decision.resync is True
    assert state.version == 10


def test_check_messages_looks_at_the_net_effect() -> None:
    bad_route = p.route("r2", "x", p.target("m", provider=UNKNOWN_PROVIDER))
    put = p.delta(p.route_put(11, "acme", bad_route))
    assert check_messages([put], 10, None) is not None
    assert check_messages([put, p.delta(p.route_deleted(12, "acme", "r2"))], 10, None) is None
    assert check_messages([put, p.delta(p.tenant_deleted(12, "acme"))], 10, None) is None
    assert check_messages([put], 11, None) is None  # already held: a resume overlap is skipped
    fixed = p.route("r2", "x", p.target("m"))
    assert check_messages([put, p.delta(p.route_put(12, "acme", fixed))], 10, None) is None
    two = p.delta(p.route_put(11, "acme", bad_route), p.route_put(12, "globex", bad_route))
    detail = check_messages([two], 10, None)
    assert detail is not None and detail.endswith("(and 1 more)")
