"""sidecar.probes (pure): what /livez and /readyz answer, by state, age and limit."""

from __future__ import annotations

import pytest

from sidecar.probes import liveness, readiness
from sidecar.state import SidecarState
from tests.sidecar import protos as p


def _state(*, ready: bool, connected: bool) -> SidecarState:
    state = SidecarState()
    if ready:
        state.apply(p.snapshot(5, p.tenant_state("acme")))
    state.set_connected(connected)
    return state


@pytest.mark.parametrize(
    "ready,connected,age,limit,restored,status,label,source",
    [
        (False, False, None, None, None, 503, "unavailable", None),
        (True, True, 0.0, 60.0, None, 200, "ok", "control_plane"),
        (True, False, 3600.0, None, None, 200, "ok", "control_plane"),  # default: no age limit
        (True, False, 30.0, 60.0, None, 200, "ok", "control_plane"),
        (True, False, 61.0, 60.0, None, 503, "stale", "control_plane"),
        (True, False, 10.0, None, 5, 200, "ok", "persisted_snapshot"),
        (True, False, 90.0, 60.0, 5, 503, "stale", "persisted_snapshot"),
    ],
)
def test_readiness_table(
    ready: bool,
    connected: bool,
    age: float | None,
    limit: float | None,
    restored: int | None,
    status: int,
    label: str,
    source: str | None,
) -> None:
    code, body = readiness(
        _state(ready=ready, connected=connected), age=age, max_snapshot_age=limit, restored_version=restored
    )
    assert (code, body["status"], body.get("source")) == (status, label, source)
    assert body["reason"]


def test_liveness_does_not_depend_on_anything() -> None:
    assert liveness() == (200, {"status": "ok"})
