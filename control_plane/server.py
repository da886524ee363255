"""Assembles the control plane: store, snapshot hub, health aggregator, gRPC
server with auth, admin and sidecar services, grpc health and reflection."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from control_plane.admin_service import AdminService
from control_plane.affinity import Affinity
from control_plane.aggregator import HealthAggregator
from control_plane.auth import Authenticator, AuthInterceptor
from control_plane.binding_sweep import BindingSweeper
from control_plane.config import ControlPlaneConfig
from control_plane.decode_guard import DecodeGuardInterceptor
from control_plane.fleet import FleetTracker, default_replica_id
from control_plane.hub import SnapshotHub
from control_plane.node_admin import sync_all_nodes
from control_plane.node_health import NodeHealthFolder
from control_plane.quota_broker import QuotaBroker
from control_plane.quota_claims import QuotaClaims
from control_plane.recovery_probe import RecoveryProber
from control_plane.sidecar_service import SidecarService
from control_plane.store.base import Store
from control_plane.store.factory import open_store
from control_plane.url_policy import UrlPolicy
from control_plane.usage import UsageRecorder
from control_plane.watch_admission import WatchAdmission
from keyplane.keyring import Keyring, MasterKeys
from keyplane.keyring_file import KeyringFile
from keyplane.tls import CertificateReloader, server_credentials
from keyplane.v1 import admin_service_pb2, admin_service_pb2_grpc, sidecar_service_pb2, sidecar_service_pb2_grpc

__all__ = ["ControlPlane", "ListenError"]

log = logging.getLogger(__name__)

_SERVICE_NAMES = (
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    sidecar_service_pb2.DESCRIPTOR.services_by_name["SidecarService"].full_name,
)


class ListenError(OSError):
    """The gRPC port could not be bound (in use, or not an address of this host)."""


class ControlPlane:
    """``await start()``, serve on ``port``, ``await stop()``.

    ``store`` may be handed in (it is then migrated and closed like one this
    class opened from ``config.store_url``).
    """

    def __init__(self, config: ControlPlaneConfig, *, store: Store | None = None) -> None:
        self.config = config
        self._store = store
        self._hub: SnapshotHub | None = None
        self._aggregator: HealthAggregator | None = None
        self._usage: UsageRecorder | None = None
        self._prober: RecoveryProber | None = None
        self._fleet: FleetTracker | None = None
        self._quota: QuotaBroker | None = None
        self._server: aio.Server | None = None
        self._health: AsyncHealthServicer | None = None
        self._sidecar_service: SidecarService | None = None
        self._tls_reloader: CertificateReloader | None = None
        self._master_keys: MasterKeys | None = None
        self._affinity: Affinity | None = None
        self._node_health: NodeHealthFolder | None = None
        self._sweeper: BindingSweeper | None = None
        self.port = 0

    @property
    def hub(self) -> SnapshotHub:
        if self._hub is None:
            raise RuntimeError("the control plane is not started")
        return self._hub

    @property
    def aggregator(self) -> HealthAggregator:
        if self._aggregator is None:
            raise RuntimeError("the control plane is not started")
        return self._aggregator

    @property
    def prober(self) -> RecoveryProber | None:
        """The recovery probe of exhausted keys (None when turned off)."""
        return self._prober

    @property
    def fleet(self) -> FleetTracker:
        if self._fleet is None:
            raise RuntimeError("the control plane is not started")
        return self._fleet

    @property
    def affinity(self) -> Affinity:
        if self._affinity is None:
            raise RuntimeError("the control plane is not started")
        return self._affinity

    @property
    def sweeper(self) -> BindingSweeper:
        if self._sweeper is None:
            raise RuntimeError("the control plane is not started")
        return self._sweeper

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the control plane is not started")
        return self._store

    @property
    def master_keys(self) -> MasterKeys:
        """The master keyring this control plane seals and opens with."""
        if self._master_keys is None:
            raise RuntimeError("the control plane is not started")
        return self._master_keys

    @property
    def tls_reloads(self) -> int:
        """How many times rotated TLS files were picked up."""
        return 0 if self._tls_reloader is None else self._tls_reloader.reloads

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        if self._store is None:
            self._store = open_store(config.store_url, command_timeout=config.store_timeout)
        store = self._store
        try:
            credentials = None
            if config.tls is not None:  # unusable TLS files fail before the store is touched
                credentials, self._tls_reloader = server_credentials(config.tls)
            if config.master_keyring_file is not None:  # an unusable keyring fails before the store is touched
                box: MasterKeys = KeyringFile(
                    config.master_keyring_file,
                    fallback=config.master_key or None,
                    check_interval=config.master_keyring_check_interval,
                )
            else:
                box = Keyring.single(config.master_key)
            self._master_keys = box
            await store.migrate()
            # This process among the replicas: its fleet record and its quota claims.
            replica_id = config.replica_id or default_replica_id()
            await sync_all_nodes(store, datetime.now(UTC))  # node_urls written before nodes existed
            self._hub = SnapshotHub(
                store,
                box,
                log_size=config.log_size,
                max_pending=config.max_pending,
                poll_interval=config.poll_interval,
            )
            await self._hub.start()
            self._aggregator = HealthAggregator(
                store,
                self._hub,
                config.health_policy,
                sweep_interval=config.health_sweep_interval,
                retry_interval=config.health_retry_interval,
            )
            await self._aggregator.start()
            self._quota = QuotaBroker(
                store,
                window_ms=round(config.quota_window * 1000),
                rebalance_interval=config.quota_rebalance_interval,
                reload_interval=config.quota_reload_interval,
                claims=QuotaClaims(store, replica_id),
            )
            await self._quota.start()
            self._usage = UsageRecorder(
                store, flush_interval=config.usage_flush_interval, retention_days=config.usage_retention_days
            )
            await self._usage.start()
            if config.recovery_probe.enabled:
                self._prober = RecoveryProber(
                    store,
                    self._hub,
                    config.health_policy,
                    UrlPolicy(deny_private=config.deny_private_base_urls),
                    config.recovery_probe,
                )
                await self._prober.start()
            self._fleet = FleetTracker(
                store,
                self._hub.cache,
                replica=replica_id,
                heartbeat=config.sidecar_heartbeat,
                expire_after=3 * config.sidecar_heartbeat,
            )
            await self._fleet.start()
            self._affinity = Affinity(
                store, self._hub.cache, ttl=timedelta(seconds=config.binding_ttl), publish=self._hub.catch_up
            )
            self._sweeper = BindingSweeper(
                store,
                self._affinity,
                interval=config.binding_sweep_interval,
                batch=config.binding_sweep_batch,
            )
            self._sweeper.start()
            self._node_health = NodeHealthFolder(store, self._hub, config.health_policy)
            server = aio.server(
                interceptors=[
                    AuthInterceptor(Authenticator(config.admin_token, config.sidecar_tokens, self._hub.tokens)),
                    DecodeGuardInterceptor(),  # inside auth: undecodable requests are INVALID_ARGUMENT
                ],
                # A second control plane on a taken port must fail, not share it.
                options=[
                    ("grpc.so_reuseport", 0),
                    # Sidecars ping idle watch streams every 60 s: accept that
                    # (the default would answer with GOAWAY "too_many_pings").
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
                    ("grpc.http2.max_ping_strikes", 0),
                    # And find dead sidecars ourselves, so their streams are freed.
                    ("grpc.keepalive_time_ms", 60_000),
                    ("grpc.keepalive_timeout_ms", 20_000),
                ],
            )
            self._server = server
            admin = AdminService(
                store,
                self._hub,
                box,
                health=self._aggregator,
                url_policy=UrlPolicy(deny_private=config.deny_private_base_urls),
                fleet=self._fleet,
                affinity=self._affinity,
                quota=self._quota,
            )
            admin.usage_recorder = self._usage
            admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
            self._sidecar_service = SidecarService(
                self._hub.cache,
                self._aggregator,
                fleet=self._fleet,
                catch_up=self._hub.catch_up,
                lag_wait=config.lag_wait,
                admission=WatchAdmission(config.watch_admit_rate, config.watch_admit_burst),
                affinity=self._affinity,
                node_health=self._node_health,
                quota=self._quota,
                usage=self._usage.folder,
            )
            sidecar_service_pb2_grpc.add_SidecarServiceServicer_to_server(self._sidecar_service, server)
            self._health = AsyncHealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            reflection.enable_server_reflection((*_SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
            try:
                if credentials is None:
                    self.port = server.add_insecure_port(config.listen)
                else:
                    self.port = server.add_secure_port(config.listen, credentials)
            except RuntimeError:  # grpc's "Failed to bind to address ..."
                self.port = 0
            if self.port == 0:
                raise ListenError(f"cannot listen on {config.listen}: the address is in use or not available here")
            await server.start()
            for name in ("", *_SERVICE_NAMES):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.stop(grace=0)
            raise
        security = "plaintext" if config.tls is None else ("mTLS" if config.tls.mutual else "TLS")
        log.info("control plane serving %s on %s (version %d)", security, self.address, self._hub.version)

    async def shutdown(self, drain: float | None = None, *, hurry: asyncio.Event | None = None) -> None:
        """Graceful shutdown (SIGTERM): gRPC health NOT_SERVING at once while every call
        is still served for ``drain`` seconds (default ``config.drain_seconds``; ``hurry``
        ends it early), so load balancers and probes move traffic away; then ``stop``."""
        drain = self.config.drain_seconds if drain is None else drain
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if drain > 0 and self._server is not None:
            log.info("draining: gRPC health NOT_SERVING, still serving calls for %.1fs", drain)
            if hurry is None:
                await asyncio.sleep(drain)
            else:
                try:
                    await asyncio.wait_for(hurry.wait(), drain)
                except TimeoutError:
                    pass
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new connections and calls, end the watch streams with "reconnect
        elsewhere" (``keyplane.going_away``), let other calls finish for ``grace``
        seconds (default ``config.shutdown_grace``), then close the store."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        stopping: asyncio.Task[None] | None = None
        if self._server is not None:
            # First the listener closes and connections get GOAWAY, so that the sidecars
            # whose streams end next open their new streams on another replica.
            stopping = asyncio.create_task(self._server.stop(grace), name="keyplane-grpc-stop")
            await asyncio.sleep(0)
        if self._sidecar_service is not None:
            self._sidecar_service.going_away = True
            if watchers := self._watchers():
                log.info("ending %d watch stream(s): their sidecars reconnect to another replica", watchers)
        if self._hub is not None:
            await self._hub.close()
        if stopping is not None:
            await stopping
            self._server = None
        if self._prober is not None:
            await self._prober.close()
            self._prober = None
        if self._sweeper is not None:
            await self._sweeper.close()
            self._sweeper = None
        self._affinity = None
        if self._node_health is not None:
            self._node_health.close()
            self._node_health = None
        if self._quota is not None:
            await self._quota.close()
            self._quota = None
        if self._aggregator is not None:
            await self._aggregator.close()  # a last try at unpersisted health changes
            self._aggregator = None
        if self._usage is not None:
            await self._usage.close()  # a last flush of the usage folded
            self._usage = None
        if self._fleet is not None:
            await self._fleet.close()  # this replica's streams leave the shared record
            self._fleet = None
        if self._store is not None:
            await self._store.close()
            self._store = None
        self._hub = None
        self._health = None
        self._sidecar_service = None

    def _watchers(self) -> int:
        return len(self._hub.cache.connected()) if self._hub is not None else 0

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
