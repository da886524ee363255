"""Affinity's domain objects: self-hosted nodes, their learnt health and the
(client key, public model) -> node bindings (issue 14).

Plain frozen dataclasses shared by the store and the control plane; the
decisions over them live in ``control_plane.affinity`` (pure) and the rows in
``control_plane.store._bindings``.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import datetime

from keyplane.domain import HealthState

__all__ = [
    "NODE_PREFIX",
    "Binding",
    "BindingKey",
    "BindingResult",
    "BindingView",
    "NodeHealth",
    "NodeState",
    "SelfHostedNode",
    "binding_entity_id",
    "node_id_for",
    "split_binding_entity_id",
]

NODE_PREFIX = "nd_"


def node_id_for(route_id: str, url: str) -> str:
    """The stable id of the node at ``url`` of route ``route_id``: the same on
    every replica and after every restart, whether the node came from a
    target's node_urls or from AddNode."""
    digest = hashlib.sha256(f"{route_id}\n{url}".encode()).hexdigest()
    return NODE_PREFIX + digest[:24]


class NodeState(enum.StrEnum):
    ACTIVE = "active"
    # Keeps its live bindings (not extended) but takes no new ones.
    DRAINING = "draining"
    # Serves nothing; a tombstone.
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class SelfHostedNode:
    """One node of a route's vllm target."""

    id: str
    tenant: str
    route_id: str
    url: str
    upstream_model: str
    state: NodeState
    from_route: bool
    created_at: datetime
    updated_at: datetime
    revision: int = 1


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """Learnt health of a node; only non-healthy entries are stored."""

    tenant: str
    node_id: str
    state: HealthState
    until: datetime | None
    reason: str
    updated_at: datetime

    def usable(self, now: datetime) -> bool:
        """May take traffic at ``now`` (a cooldown that ended counts as usable)."""
        if self.state is HealthState.HEALTHY:
            return True
        return self.state is HealthState.COOLDOWN and self.until is not None and self.until <= now


@dataclass(frozen=True, slots=True)
class BindingKey:
    """What a binding is for. Never log ``client_key_id`` and ``public_model``
    together above debug level."""

    tenant: str
    client_key_id: str
    public_model: str

    def __repr__(self) -> str:  # keeps the pair out of tracebacks and logs
        return f"BindingKey(tenant={self.tenant!r})"


@dataclass(frozen=True, slots=True)
class Binding:
    key: BindingKey
    node_id: str
    node_url: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    moves: int = 0

    def live(self, now: datetime) -> bool:
        return self.expires_at > now

    def __repr__(self) -> str:
        return f"Binding(tenant={self.key.tenant!r}, node_id={self.node_id!r})"


@dataclass(frozen=True, slots=True)
class BindingView:
    """A binding with what decides whether it may serve: its node's state and
    learnt health (None: healthy)."""

    binding: Binding
    node_state: NodeState
    node_health: NodeHealth | None


class BindingResult(enum.StrEnum):
    HIT = "hit"
    CREATED = "created"
    MOVED = "moved"


def binding_entity_id(client_key_id: str, public_model: str) -> str:
    """Change-log entity id of a binding: ``<client key id>/<public model>``
    (client key ids hold no '/')."""
    return f"{client_key_id}/{public_model}"


def split_binding_entity_id(entity_id: str) -> tuple[str, str]:
    client_key_id, _, public_model = entity_id.partition("/")
    return client_key_id, public_model
