"""What the request handlers (``sidecar.chat``, ``sidecar.anthropic_messages``) and
their book-keeping (``sidecar.book``) need of the app that calls them
(``sidecar.app.SidecarApp``): they are called by the edge and never import it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from keyplane.health.panic import PanicPolicy

    from .affinity import ResponseAffinity
    from .limits import Limiter
    from .metrics import SidecarMetrics
    from .node_affinity import NodeAffinity
    from .proxy import AttemptRecord
    from .reporter import OutcomeReporter
    from .rescue import ProbeGate
    from .router import Attempt, Balancer
    from .state import SidecarState
    from .upstream import UpstreamClient

__all__ = ["ChatApp"]


class ChatApp(Protocol):
    """The app as its request handlers see it."""

    state: SidecarState
    upstream: UpstreamClient
    metrics: SidecarMetrics
    balancer: Balancer
    max_body_bytes: int
    max_attempts: int
    request_timeout: float
    reporter: OutcomeReporter | None
    disconnect_watch_after: float
    # Which key created each Responses API response (``sidecar.affinity``).
    affinity: ResponseAffinity
    panic_policy: PanicPolicy
    probes: ProbeGate
    # (client key, model) -> node bindings for routes with nodes (``sidecar.node_affinity``).
    node_affinity: NodeAffinity
    # Limits from the local leases (``sidecar.limits``); None: no limits.
    limiter: Limiter | None
    # Read token usage from answers (``sidecar.usage``).
    usage_accounting: bool

    def count_attempt(self, record: AttemptRecord, tenant: str) -> None: ...

    def count_misconfigured(self, attempt: Attempt) -> None: ...
