"""Records of the fleet the store keeps besides configuration: which sidecar
watches where and what it applied (the ``sidecar_status`` record), and the
filter of affinity bindings. Re-exported by ``control_plane.store.base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["BindingFilter", "SidecarAck", "SidecarRecord", "SidecarStream"]


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
