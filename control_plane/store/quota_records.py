"""What the store keeps of the quota leasing across control-plane replicas
(migration 10): each replica's claim on each limited bucket's window.

Every replica leases its own sidecars out of what it claimed in the store,
never out of the whole limit, and claims are made under a per-(bucket,
window) lock, so the claims of all replicas never sum past the limit (see
``control_plane.quota_claims``). Re-exported by ``control_plane.store.base``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuotaClaim", "QuotaClaimResult"]


@dataclass(frozen=True, slots=True)
class QuotaClaim:
    """One replica's request on one bucket's window: claim up to ``want``
    more, and record what its sidecars used and its demand."""

    tenant: str
    client_key_id: str  # '' tenant-wide
    kind: int  # keyplane.v1.QuotaKind
    window_start_ms: int
    window_end_ms: int
    limit: int
    want: int  # more wanted now (0: only record used and demand)
    used: int  # what this replica's sidecars admitted in the window
    rate: float  # this replica's demand per second
    # Spend budgets: the first claim of a window counts the spend the usage
    # rollups already hold for it (a budget set mid-day, claims swept).
    seed_from_rollups: bool = False


@dataclass(frozen=True, slots=True)
class QuotaClaimResult:
    granted: int  # added to this replica's claim now
    claimed: int  # this replica's whole claim on the window, after
    fleet_claimed: int  # every claim on the window (the seed included)
    others_used: int  # used in the window by the sidecars of other replicas
    fleet_rate: float  # demand per second of the replicas seen lately, this one included
