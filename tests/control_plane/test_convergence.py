"""The pure convergence decisions: a sidecar's sync state, the newest change
of its tenants, and when a wait for a version is over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.convergence import SyncState, is_live, latest_for, sync_state, wait_outcome, watches
from control_plane.store.base import SidecarRecord

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
EXPIRE = timedelta(seconds=30)


def rec(
    sidecar_id: str = "sc",
    *,
    sent: int = 0,
    applied: int = 0,
    rejected: int = 0,
    tenants: tuple[str, ...] | None = ("acme",),
    replica: str = "r1",
    seen_ago: float = 1.0,
) -> SidecarRecord:
    return SidecarRecord(
        sidecar_id=sidecar_id,
        replica=replica,
        tenants=tenants,
        peer="ipv4:127.0.0.1:1",
        connected_at=NOW,
        sent_version=sent,
        seen_at=NOW - timedelta(seconds=seen_ago),
        applied_version=applied,
        rejected_version=rejected,
        error_detail="nope" if rejected else "",
        acked_at=NOW,
    )


@pytest.mark.parametrize(
    ("sent", "applied", "rejected", "latest", "state"),
    [
        (10, 10, 0, 10, SyncState.SYNCED),
        (12, 12, 0, 10, SyncState.SYNCED),  # versions move globally: past the tenant's newest is fine
        (10, 10, 0, 11, SyncState.STALE),  # its replica has not sent the newest change
        (11, 10, 0, 11, SyncState.NOT_ACKED),
        (11, 0, 0, 11, SyncState.NOT_ACKED),  # sent a first snapshot, no ack yet
        (11, 10, 11, 11, SyncState.REJECTED),
        (12, 10, 11, 12, SyncState.REJECTED),  # rejection wins over a pending ack
        (12, 12, 11, 12, SyncState.SYNCED),  # an older rejection is moot once a later version applied
    ],
)
def test_sync_state(sent: int, applied: int, rejected: int, latest: int, state: SyncState) -> None:
    assert sync_state(rec(sent=sent, applied=applied, rejected=rejected), latest) is state


def test_latest_for_takes_the_newest_of_the_tenants_watched() -> None:
    versions = {"acme": 7, "globex": 12}
    assert latest_for(("acme",), versions, 3) == 7
    assert latest_for(("acme", "globex"), versions, 3) == 12
    assert latest_for(None, versions, 3) == 12  # every tenant
    assert latest_for(("initech",), versions, 3) == 3  # unchanged since the replica loaded
    assert latest_for(("acme",), versions, 9) == 9
    assert latest_for(None, {}, 4) == 4


def test_liveness_and_tenants() -> None:
    assert is_live(rec(), NOW, EXPIRE)
    assert not is_live(rec(seen_ago=31), NOW, EXPIRE)  # its replica stopped refreshing it
    assert not is_live(rec(replica=""), NOW, EXPIRE)  # an ack whose stream is gone
    assert watches(rec(tenants=None), "anything")
    assert watches(rec(tenants=("acme", "globex")), "globex")
    assert not watches(rec(tenants=("acme",)), "globex")


def test_wait_outcome() -> None:
    fleet = [
        rec("a", sent=20, applied=20),
        rec("b", sent=20, applied=19),
        rec("c", sent=20, applied=18, rejected=20),
        rec("other-tenant", tenants=("globex",), applied=1),
        rec("gone", applied=1, seen_ago=60),
    ]
    waiting = wait_outcome(fleet, "acme", 20, NOW, EXPIRE)
    assert [r.sidecar_id for r in waiting.watching] == ["a", "b", "c"]
    assert [r.sidecar_id for r in waiting.pending] == ["b", "c"]
    assert (waiting.converged, waiting.hopeless, waiting.applied) == (False, False, 1)

    # Only the sidecar that rejected this version is left: waiting cannot help.
    fleet[1] = rec("b", sent=20, applied=20)
    stuck = wait_outcome(fleet, "acme", 20, NOW, EXPIRE)
    assert [r.sidecar_id for r in stuck.pending] == ["c"]
    assert stuck.hopeless and not stuck.converged
    # It holds 18 and rejected 20: whatever it got after 18, 19 included, is in what it rejected.
    assert wait_outcome(fleet, "acme", 19, NOW, EXPIRE).hopeless
    assert wait_outcome(fleet, "acme", 18, NOW, EXPIRE).converged
    # Nobody watching: converged at once.
    assert wait_outcome(fleet, "initech", 20, NOW, EXPIRE).converged
