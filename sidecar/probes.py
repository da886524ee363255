"""What the sidecar's health endpoints answer (pure: the state and the age are passed in).

- ``/livez``: the process works (its event loop answers). It never fails
  because the control plane is away: a liveness probe on it must not restart
  sidecars during a control-plane outage (they would lose what they serve from).
- ``/readyz``: the sidecar has a snapshot it may serve from, from a live
  stream or restored from its persisted file, no older than
  ``max_snapshot_age`` (None: any age). ``/healthz`` is an alias kept for
  existing probes; every answer names its reason in the JSON body.
"""

from __future__ import annotations

from typing import Any

from .state import SidecarState

__all__ = ["liveness", "readiness"]


def liveness() -> tuple[int, dict[str, Any]]:
    return 200, {"status": "ok"}


def readiness(
    state: SidecarState,
    *,
    age: float | None,
    max_snapshot_age: float | None,
    restored_version: int | None = None,
    draining: bool = False,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of ``/readyz``: not ready while the sidecar drains
    before shutting down (``sidecar.shutdown``), though it still serves requests."""
    if draining:
        return 503, {
            "status": "draining",
            "reason": "the sidecar is shutting down",
            "version": state.version,
            "connected": state.connected,
        }
    if not state.is_ready:
        return 503, {
            "status": "unavailable",
            "reason": "no snapshot yet: the control plane has not answered and no persisted snapshot was restored",
            "version": 0,
            "connected": state.connected,
        }
    source = "persisted_snapshot" if restored_version is not None else "control_plane"
    body: dict[str, Any] = {
        "version": state.version,
        "connected": state.connected,
        "source": source,
        "snapshot_age_seconds": round(age, 3) if age is not None else None,
    }
    if max_snapshot_age is not None and age is not None and age > max_snapshot_age:
        body["status"] = "stale"
        body["reason"] = f"snapshot last in sync {int(age)}s ago, more than --max-snapshot-age {max_snapshot_age:g}s"
        return 503, body
    body["status"] = "ok"
    if state.connected:
        body["reason"] = "in sync with the control plane"
    elif source == "persisted_snapshot":
        body["reason"] = "serving the persisted snapshot; the control plane has not answered since the start"
    else:
        body["reason"] = "serving the last snapshot; the control plane is away"
    return 200, body
