"""Control-plane configuration: one frozen dataclass, secrets hidden from repr."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit, urlunsplit

from control_plane.recovery_probe import RecoveryProbeConfig
from keyplane.health.machine import HealthPolicy
from keyplane.tls import ServerTls, is_loopback_listen

__all__ = ["ControlPlaneConfig", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable url>"


@dataclass(frozen=True, kw_only=True)
class ControlPlaneConfig:
    """Everything ``ControlPlane`` needs.

    ``sidecar_tokens`` maps each sidecar token to the tenants it may watch;
    ``("*",)`` means every tenant. ``master_key`` is the 32-byte AES key that
    seals provider secrets at rest; ``master_keyring_file`` a keyring of
    them (re-read when it changes), which replaces ``master_key`` whenever
    the file exists. At least one of the two.
    """

    store_url: str
    admin_token: str
    master_key: bytes = b""
    sidecar_tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    listen: str = "127.0.0.1:50051"
    # Changes kept for resuming sidecars; older resumes get a snapshot.
    log_size: int = 10000
    # A stream this many changes behind gets a fresh snapshot instead.
    max_pending: int = 1000
    # Safety net: re-read the change log this often (seconds; None: never).
    poll_interval: float | None = 5.0
    # Seconds in-flight calls get to finish on stop.
    shutdown_grace: float = 1.0
    # ``ControlPlane.shutdown`` (SIGTERM): seconds of gRPC health NOT_SERVING while
    # calls are still served, before watch streams are sent elsewhere and the server stops.
    drain_seconds: float = 0.0
    # How outcome reports turn into key and provider health.
    health_policy: HealthPolicy = field(default_factory=HealthPolicy)
    # Evict idle health entries this often (seconds).
    health_sweep_interval: float = 60.0
    # Retry persisting health changes this often while the store is down.
    health_retry_interval: float = 2.0
    # Limits per minute count in windows of this many seconds (the limit scaled
    # to the window; 60 unless scaled down, e.g. in tests).
    quota_window: float = 60.0
    # Seconds between rebalances of the sidecars' quota leases.
    quota_rebalance_interval: float = 1.0
    # Seconds between re-reads of every limit (and the price table) from the store,
    # for writes made through other replicas (two small queries per reload).
    quota_reload_interval: float = 1.0
    # Usage rollups (control_plane.usage): write what was folded this often (one
    # upsert per rollup row per flush), and keep rows this many days (0: forever).
    usage_flush_interval: float = 1.0
    usage_retention_days: float = 90.0
    # Seconds a Postgres statement (or a wait for a pooled connection) may take
    # before the call fails with UNAVAILABLE.
    store_timeout: float = 5.0
    # Also refuse private and loopback hosts in provider base URLs and vLLM
    # node URLs (link-local and metadata addresses are always refused).
    deny_private_base_urls: bool = False
    # TLS (and mTLS with a client CA) for every connection; None: plaintext,
    # which only a loopback ``listen`` allows unless ``insecure_plaintext``.
    tls: ServerTls | None = None
    insecure_plaintext: bool = False
    # Master keyring file ('<id> <base64 key>' lines, newest last) and how
    # often (seconds) to check it for changes.
    master_keyring_file: Path | None = None
    master_keyring_check_interval: float = 1.0
    # The background probe that restores exhausted keys (control_plane.recovery_probe).
    recovery_probe: RecoveryProbeConfig = field(default_factory=RecoveryProbeConfig)
    # This replica's name in the fleet's shared sync record (proxy-status);
    # empty: <hostname>-<pid>-<random>.
    replica_id: str = ""
    # How long a sidecar that resumes from a version this replica has not
    # reached waits while the replica catches up with the store before it is
    # refused (UNAVAILABLE: it retries, possibly on another replica).
    lag_wait: float = 5.0
    # How often this replica refreshes its streams in the shared record; a
    # stream not refreshed for 3 heartbeats counts as gone (its replica died).
    sidecar_heartbeat: float = 10.0
    # New watch streams admitted per second on average, and at once: more are
    # told when to come back (UNAVAILABLE with a retry delay), spread at the rate.
    watch_admit_rate: float = 1000.0
    watch_admit_burst: int = 1000
    # Affinity (issue 14): how long a (client key, model) -> node binding
    # lives without a refresh, and how often and in what batches one replica
    # sweeps expired ones.
    binding_ttl: float = 600.0
    binding_sweep_interval: float = 30.0
    binding_sweep_batch: int = 1000

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError("admin_token must not be empty")
        if (self.master_key or self.master_keyring_file is None) and len(self.master_key) != 32:
            raise ValueError("master_key must be 32 bytes")
        if not math.isfinite(self.drain_seconds) or self.drain_seconds < 0:
            raise ValueError("drain_seconds must be a non-negative number of seconds")
        if not math.isfinite(self.master_keyring_check_interval) or self.master_keyring_check_interval < 0:
            raise ValueError("master_keyring_check_interval must be a non-negative number of seconds")
        frozen: dict[str, tuple[str, ...]] = {}
        for token, tenants in self.sidecar_tokens.items():
            if not token:
                raise ValueError("sidecar tokens must not be empty")
            if not tenants:
                raise ValueError("each sidecar token needs at least one tenant (or '*')")
            frozen[token] = tuple(tenants)
        object.__setattr__(self, "sidecar_tokens", MappingProxyType(frozen))
        if self.log_size < 1 or self.max_pending < 1:
            raise ValueError("log_size and max_pending must be at least 1")
        if not (self.lag_wait > 0 and self.sidecar_heartbeat > 0):
            raise ValueError("lag_wait and sidecar_heartbeat must be positive numbers of seconds")
        if self.health_sweep_interval <= 0 or self.health_retry_interval <= 0:
            raise ValueError("health_sweep_interval and health_retry_interval must be positive")
        if not math.isfinite(self.store_timeout) or self.store_timeout <= 0:
            raise ValueError("store_timeout must be a positive number of seconds")
        if not math.isfinite(self.watch_admit_rate) or self.watch_admit_rate <= 0 or self.watch_admit_burst < 1:
            raise ValueError("watch_admit_rate must be positive and watch_admit_burst at least 1")
        if not (math.isfinite(self.binding_ttl) and self.binding_ttl > 0 and self.binding_sweep_interval > 0):
            raise ValueError("binding_ttl and binding_sweep_interval must be positive numbers of seconds")
        if self.binding_sweep_batch < 1:
            raise ValueError("binding_sweep_batch must be at least 1")
        if self.tls is None and not self.insecure_plaintext and not is_loopback_listen(self.listen):
            raise ValueError(
                f"refusing to serve plaintext gRPC on {self.listen} (not a loopback address): "
                "pass --tls-cert and --tls-key (and --client-ca for mTLS), or --insecure-plaintext to force it"
            )

    def __repr__(self) -> str:
        scopes = sorted({",".join(tenants) for tenants in self.sidecar_tokens.values()})
        return (
            f"ControlPlaneConfig(listen={self.listen!r}, store_url={redact_url(self.store_url)!r}, "
            f"admin_token='***', sidecar_tokens=<{len(self.sidecar_tokens)} token(s) for {scopes}>, "
            f"master_key='***', master_keyring_file={self.master_keyring_file}, "
            f"log_size={self.log_size}, max_pending={self.max_pending}, "
            f"poll_interval={self.poll_interval}, shutdown_grace={self.shutdown_grace}, tls={self.tls}, "
            f"insecure_plaintext={self.insecure_plaintext})"
        )

    __str__ = __repr__
