"""Pure decisions about the fleet's convergence: a sidecar's sync state, and
whether a wait for a version is over. No I/O: ``control_plane.fleet`` records
what sidecars were sent and acknowledged, ``control_plane.proxy_status_admin``
answers the admin with these functions.

The states (after Istio's proxy-status, with xDS NACKs made visible):

| the sidecar's record says                              | state      |
| ------------------------------------------------------ | ---------- |
| rejected a version later than the one it applied       | REJECTED   |
| was sent a version later than the one it applied       | NOT_ACKED  |
| applied all it was sent, but its tenants changed since | STALE      |
| applied all it was sent, and that is the newest        | SYNCED     |

"Its tenants changed since" compares with the newest change of the tenants
the sidecar watches that the answering replica knows (``latest``), so a
sidecar on a replica that lags the store shows STALE until its replica sends.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from control_plane.store.base import SidecarRecord

__all__ = [
    "SyncState",
    "WaitOutcome",
    "is_live",
    "latest_for",
    "sync_state",
    "wait_outcome",
    "watches",
]


class SyncState(enum.Enum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NOT_ACKED = "NOT ACKED"
    REJECTED = "REJECTED"


def sync_state(record: SidecarRecord, latest: int) -> SyncState:
    """The state of one sidecar whose tenants' newest change is ``latest``."""
    if record.rejected_version > record.applied_version:
        return SyncState.REJECTED
    if record.sent_version > record.applied_version:
        return SyncState.NOT_ACKED
    if record.applied_version < latest:
        return SyncState.STALE
    return SyncState.SYNCED


def is_live(record: SidecarRecord, now: datetime, expire_after: timedelta) -> bool:
    """Whether the record is a stream some replica holds and refreshed lately
    (a replica that died stops refreshing its streams' rows)."""
    return bool(record.replica) and record.seen_at is not None and record.seen_at >= now - expire_after


def watches(record: SidecarRecord, tenant: str) -> bool:
    return record.tenants is None or tenant in record.tenants


def latest_for(tenants: Iterable[str] | None, versions: Mapping[str, int], floor: int) -> int:
    """The newest change among ``tenants`` (None: every tenant) by the
    per-tenant versions a replica saw; ``floor`` for a tenant it has not seen
    change (everything up to ``floor`` was in the snapshot it started from)."""
    names = versions.keys() if tenants is None else tenants
    return max((max(versions.get(t, floor), floor) for t in names), default=floor)


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """Where a wait for ``version`` of one tenant stands."""

    watching: tuple[SidecarRecord, ...]  # live sidecars of the tenant
    pending: tuple[SidecarRecord, ...]  # of those, the ones that have not applied it
    # Every pending sidecar rejected the version or a later one: waiting longer
    # cannot help until the configuration changes again.
    hopeless: bool

    @property
    def converged(self) -> bool:
        return not self.pending

    @property
    def applied(self) -> int:
        return len(self.watching) - len(self.pending)


def wait_outcome(
    records: Iterable[SidecarRecord], tenant: str, version: int, now: datetime, expire_after: timedelta
) -> WaitOutcome:
    watching = tuple(r for r in records if is_live(r, now, expire_after) and watches(r, tenant))
    pending = tuple(r for r in watching if r.applied_version < version)
    hopeless = bool(pending) and all(r.rejected_version >= version for r in pending)
    return WaitOutcome(watching=watching, pending=pending, hopeless=hopeless)
