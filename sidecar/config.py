"""Sidecar configuration: one frozen dataclass, no module globals."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from keyplane.domain import Provider
from keyplane.health.machine import HealthPolicy
from keyplane.health.panic import PanicPolicy
from keyplane.tls import ClientTls

__all__ = ["DEFAULT_MAX_BODY_BYTES", "SidecarConfig", "default_sidecar_id"]

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


def default_sidecar_id() -> str:
    """``<hostname>-<pid>``: unique enough for the admin's view of the fleet."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything a sidecar needs to run. Times are in seconds."""

    control_plane_target: str
    # Credential for the control plane; never logged (excluded from repr).
    sidecar_token: str = field(repr=False)
    # Tenants to watch; empty means every tenant the token may see.
    tenants: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    # 0 picks a free port (read it back from ``Sidecar.port``).
    port: int = 8787
    sidecar_id: str = field(default_factory=default_sidecar_id)
    upstream_connect_timeout: float = 10.0
    # Longest silence between two bytes from the upstream.
    upstream_read_timeout: float = 600.0
    # One deadline for a whole app request: every attempt, streaming included.
    request_timeout: float = 600.0
    # /readyz (and /healthz) report 503 once the snapshot served was last in sync
    # with the control plane longer ago than this; None (the default): never.
    max_snapshot_age: float | None = None
    # The persisted last-known-good snapshot (sidecar.snapshot_keeper); None: not persisted.
    snapshot_file: str | None = None
    # Key file the snapshot file's key is derived from; None: from the sidecar token.
    snapshot_key_file: str | None = None
    # Most one write of the snapshot file per this many seconds (bursts coalesce).
    snapshot_write_interval: float = 1.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Upper bound on upstream attempts (keys x targets) for one request.
    max_attempts: int = 8
    # Connections kept per upstream host: also the most concurrent calls to one
    # provider host (more queue inside the client's connector).
    upstream_limit_per_host: int = 256
    # Honour HTTP(S)_PROXY / NO_PROXY for upstream calls.
    upstream_trust_env: bool = False
    # CA bundle (PEM) trusted for upstream TLS on top of the system's CAs
    # (instead of them with ``upstream_ca_file_only``).
    upstream_ca_file: str | None = None
    upstream_ca_file_only: bool = False
    # Limits on an upstream's answer: bytes in its status line and in any one
    # header line, header lines in its head, and bytes of a non-streamed body.
    upstream_max_header_size: int = 8190
    upstream_max_headers: int = 128
    upstream_max_body_bytes: int = 64 * 1024 * 1024
    # Idle upstream connections are closed after this long.
    upstream_keepalive_timeout: float = 60.0
    # Control-plane channel: TLS (and a client certificate for mTLS); None: plaintext.
    control_plane_tls: ClientTls | None = None
    grpc_keepalive_time: float = 60.0
    # Watch reconnects: the first at once, then full jitter, doubling from base up to cap.
    watch_backoff_base: float = 0.05
    watch_backoff_cap: float = 1.0
    # One JSON line per chat request (``sidecar.access_log``): "-" for stdout or a
    # file path to append to; None (the default): off.
    access_log: str | None = None
    # Graceful shutdown (sidecar/shutdown.py): on SIGTERM the sidecar keeps
    # accepting for shutdown_delay seconds (/healthz answers 503 draining), then
    # closes its listener and lets in-flight requests and streams run for up to
    # shutdown_grace seconds before cutting them (a stream ends with an SSE error event).
    shutdown_delay: float = 5.0
    shutdown_grace: float = 10.0
    # How this sidecar's own attempt outcomes turn into local key/provider health
    # (applied at once, before the control plane's verdicts come back).
    health_policy: HealthPolicy = field(default_factory=HealthPolicy)
    # What a request does when no key can serve it: panic probes of cooling keys,
    # waits for rate limits, honest answers (keyplane.health.panic).
    panic_policy: PanicPolicy = field(default_factory=PanicPolicy)
    # Outcome reports to the control plane (ReportOutcomes).
    report_outcomes: bool = True
    # Read each answer's token usage (asking streams for their usage chunk, hidden
    # from apps that did not ask) and report it with the outcomes (``sidecar.usage``).
    usage_accounting: bool = True
    report_queue_size: int = 10_000
    report_batch_size: int = 500
    # How long a batch of successes only may gather before it is sent, and how
    # soon a batch holding any failure is sent. Each write costs the event loop
    # a fixed few hundred microseconds (docs/benchmarks.md), so the bulk of
    # plain successes goes in few, large batches, while what the fleet must
    # learn fast (a dead or rate-limited key) still leaves at once.
    report_interval: float = 0.25
    # Limits (sidecar.limits, sidecar.quota_client): lease quota from the control
    # plane and report usage this often (seconds).
    quota: bool = True
    quota_report_interval: float = 0.5
    # When leases stop arriving for quota_stale_after seconds: keep enforcing the
    # last ones (fail-static, the default) or admit everything (fail_open).
    quota_fail_open: bool = False
    quota_stale_after: float = 5.0
    report_failure_interval: float = 0.02
    # Outcomes older than this when they could be sent are dropped (counted):
    # stale reports would penalise keys for the past.
    report_max_age: float = 30.0
    # How long stop() spends flushing queued outcomes.
    report_flush_timeout: float = 1.0
    # The app-facing HTTP edge (sidecar/edge_protocol.py): a request head (request
    # line and header fields) larger than this, or with more fields, is refused
    # with 431; a head that has not arrived within request_head_timeout of its
    # first byte, or a body within request_body_timeout of its head, gets 408 and
    # the connection is closed.
    max_request_head_bytes: int = 64 * 1024
    max_request_headers: int = 100
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    # Providers this sidecar serves; empty: every provider this build knows. A
    # watch version with a route targeting another one is rejected (NACK) and
    # the sidecar keeps what it held (sidecar/ack.py).
    providers: tuple[Provider, ...] = ()
    # Node affinity (sidecar.node_affinity): (client key, model) -> node bindings for
    # routes with nodes; a local miss asks the control plane once, waiting at most
    # binding_timeout seconds before the normal strategy picks.
    node_affinity: bool = True
    binding_timeout: float = 0.1

    def __post_init__(self) -> None:
        if not self.control_plane_target:
            raise ValueError("control_plane_target is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if self.max_request_head_bytes < 1024:
            raise ValueError("max_request_head_bytes must be at least 1024")
        if self.max_request_headers < 1:
            raise ValueError("max_request_headers must be at least 1")
        if self.upstream_limit_per_host < 1:
            raise ValueError("upstream_limit_per_host must be at least 1")
        if self.upstream_ca_file_only and self.upstream_ca_file is None:
            raise ValueError("upstream_ca_file_only needs upstream_ca_file")
        for name in ("upstream_max_header_size", "upstream_max_headers", "upstream_max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.upstream_ca_file is not None and not os.path.isfile(self.upstream_ca_file):
            raise ValueError(f"upstream_ca_file is not a file: {self.upstream_ca_file}")
        if self.control_plane_tls is not None:
            for path in self.control_plane_tls.files():
                if not path.is_file():
                    raise ValueError(f"control-plane TLS file is not a file: {path}")
        if self.max_snapshot_age is not None and self.max_snapshot_age <= 0:
            raise ValueError("max_snapshot_age must be positive")
        if self.snapshot_key_file is not None and not os.path.isfile(self.snapshot_key_file):
            raise ValueError(f"snapshot_key_file is not a file: {self.snapshot_key_file}")
        if self.report_queue_size < 1 or self.report_batch_size < 1:
            raise ValueError("report_queue_size and report_batch_size must be at least 1")
        if self.shutdown_delay < 0 or self.shutdown_grace < 0:
            raise ValueError("shutdown_delay and shutdown_grace must not be negative")
        for name in (
            "upstream_connect_timeout",
            "upstream_read_timeout",
            "upstream_keepalive_timeout",
            "request_timeout",
            "snapshot_write_interval",
            "watch_backoff_base",
            "watch_backoff_cap",
            "report_interval",
            "report_failure_interval",
            "report_max_age",
            "request_head_timeout",
            "request_body_timeout",
            "binding_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
