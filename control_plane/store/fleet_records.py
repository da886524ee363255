"""Records of the fleet the store keeps besides configuration: which sidecar
watches where and what it applied (the ``sidecar_status`` record), the
replicas' quota claims, and the filter of affinity bindings; with the part of
the ``Store`` Protocol that keeps them (``FleetRecordsStore``). Re-exported
by ``control_plane.store.base``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from control_plane.store.quota_records import QuotaClaim, QuotaClaimResult

__all__ = ["BindingFilter", "FleetRecordsStore", "SidecarAck", "SidecarRecord", "SidecarStream"]


@dataclass(frozen=True, slots=True)
class BindingFilter:
    """Bindings of ``tenant`` matching every non-empty field."""

    tenant: str
    client_key_id: str = ""
    public_model: str = ""
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class SidecarStream:
    """A Watch stream as the replica holding it reports it."""

    sidecar_id: str
    tenants: tuple[str, ...] | None  # None: every tenant
    peer: str
    connected_at: datetime
    sent_version: int


@dataclass(frozen=True, slots=True)
class SidecarAck:
    """What a sidecar last said about the versions it got."""

    sidecar_id: str
    applied_version: int
    rejected_version: int
    error_detail: str
    acked_at: datetime


@dataclass(frozen=True, slots=True)
class SidecarRecord:
    """One row: the stream side (replica "" until a replica registered the
    stream, or after it ended) and the ack side (zeros until the first ack)."""

    sidecar_id: str
    replica: str
    tenants: tuple[str, ...] | None
    peer: str
    connected_at: datetime | None
    sent_version: int
    seen_at: datetime | None
    applied_version: int
    rejected_version: int
    error_detail: str
    acked_at: datetime | None


class FleetRecordsStore(Protocol):
    """The ``Store`` methods of the fleet's records."""

    # quota claims of control-plane replicas (control_plane/store/_quota_claims.py)
    async def claim_quota(
        self,
        replica_id: str,
        claims: Sequence[QuotaClaim],
        now_ms: int,
        live_ms: int,
        release_ms: int = 120_000,
    ) -> list[QuotaClaimResult]:
        """For each claim (sorted by bucket), under a lock on its bucket's
        window: add up to ``want`` to ``replica_id``'s claim without the
        claims of all replicas passing ``limit``, and record its used and
        demand. ``fleet_rate`` counts replicas that wrote within ``live_ms``;
        a replica silent for ``release_ms`` keeps only what it used."""

    async def quota_used(self, windows: Sequence[tuple[str, str, int, int]]) -> dict[tuple[str, str, int, int], int]:
        """The fleet's recorded use of each (tenant, client key, kind, window
        start) that has claims; for the admin view."""

    async def sweep_quota_claims(self, before_ms: int) -> int:
        """Delete claims of windows that ended before ``before_ms``; how many."""

    # the fleet's sync state (control_plane/store/sidecar_status.py) -----------
    async def put_sidecar_streams(self, replica: str, streams: Sequence[SidecarStream], seen_at: datetime) -> None:
        """Record (or refresh, as a heartbeat) the Watch streams ``replica`` holds."""

    async def put_sidecar_acks(self, acks: Sequence[SidecarAck]) -> None:
        """Record what each sidecar last acknowledged (applied or rejected)."""

    async def drop_sidecar_streams(self, replica: str, sidecar_ids: Sequence[str]) -> None:
        """Forget streams that ended on ``replica``."""

    async def list_sidecar_status(self) -> list[SidecarRecord]:
        """Every sidecar row, ordered by sidecar id."""

    async def sweep_sidecar_status(self, before: datetime) -> int:
        """Delete rows not refreshed since ``before``; returns how many."""
