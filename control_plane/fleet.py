"""What one replica tells the fleet's shared record (``Store.put_sidecar_*``):
the Watch streams it holds and what it sent each, and the acknowledgements
(xDS ACK/NACK) sidecars sent it.

Every note (``opened``, ``sent``, ``closed``, ``acked``) is synchronous and
only marks an entry dirty; one background task writes what is dirty in a few
statements at most every ``flush_interval`` (latest wins, so a burst of
messages or acks costs one row write per sidecar). Every ``heartbeat`` the
replica rewrites its streams' ``seen_at``: rows of a replica that died stop
being refreshed and count as gone after ``expire_after`` (and are swept).
While the store is down, notes pile up as the latest per sidecar and are
written when it returns.

The replica also keeps, from its snapshot cache's change listener, the
newest version of every tenant it has seen change: what "in sync" compares
with (``control_plane.convergence``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from control_plane.convergence import is_live, latest_for
from control_plane.snapshot_cache import SnapshotCache
from control_plane.store.base import SidecarAck, SidecarRecord, SidecarStream, Store
from keyplane.domain import ChangeRecord
from keyplane.v1 import sidecar_service_pb2

__all__ = ["FleetTracker", "StreamHandle", "default_replica_id"]

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    """``<hostname>-<pid>-<random>``: unique per process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False, slots=True)
class StreamHandle:
    """One Watch stream this replica holds."""

    sidecar_id: str
    tenants: frozenset[str] | None
    peer: str
    connected_at: datetime
    sent_version: int = 0
    closed: bool = field(default=False)

    def record(self) -> SidecarStream:
        tenants = None if self.tenants is None else tuple(sorted(self.tenants))
        return SidecarStream(self.sidecar_id, tenants, self.peer, self.connected_at, self.sent_version)


def covers(scope: frozenset[str] | None, tenants: frozenset[str] | None) -> bool:
    """Whether a token scoped to ``scope`` may speak for a stream of ``tenants``
    (None: every tenant)."""
    if scope is None:
        return True
    return tenants is not None and tenants <= scope


class FleetTracker:
    def __init__(
        self,
        store: Store,
        cache: SnapshotCache,
        *,
        replica: str | None = None,
        flush_interval: float = 0.05,
        heartbeat: float = 10.0,
        expire_after: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if flush_interval <= 0 or heartbeat <= 0 or expire_after <= heartbeat:
            raise ValueError("flush_interval and heartbeat must be positive, expire_after longer than heartbeat")
        self.replica = replica or default_replica_id()
        self._store = store
        self._cache = cache
        self._flush_interval = flush_interval
        self._heartbeat = heartbeat
        self.expire_after = timedelta(seconds=expire_after)
        self._clock = clock
        self._streams: dict[str, StreamHandle] = {}
        self._dirty: set[str] = set()  # sidecar ids whose stream row needs writing
        self._dropped: set[str] = set()  # sidecar ids whose stream ended here
        self._acks: dict[str, SidecarAck] = {}
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Per tenant, the newest version this replica published a change at.
        self.tenant_versions: dict[str, int] = {}
        self.floor = cache.version
        cache.add_listener(self._on_change)

    # notes (synchronous, never block) ----------------------------------------------
    def _on_change(self, record: ChangeRecord, change: sidecar_service_pb2.Change) -> None:
        self.tenant_versions[record.tenant] = record.version

    def opened(self, sidecar_id: str, tenants: frozenset[str] | None, peer: str) -> StreamHandle:
        handle = StreamHandle(sidecar_id or peer, tenants, peer, self._clock())
        self._streams[handle.sidecar_id] = handle  # a reconnect replaces the older stream
        self._dropped.discard(handle.sidecar_id)
        self._mark(handle.sidecar_id)
        return handle

    def sent(self, handle: StreamHandle, version: int) -> None:
        handle.sent_version = version
        if not handle.closed and self._streams.get(handle.sidecar_id) is handle:
            self._mark(handle.sidecar_id)

    def closed(self, handle: StreamHandle) -> None:
        handle.closed = True
        if self._streams.get(handle.sidecar_id) is handle:
            del self._streams[handle.sidecar_id]
            self._dirty.discard(handle.sidecar_id)
            self._dropped.add(handle.sidecar_id)
            self._wake.set()

    def acked(self, sidecar_id: str, applied: int, rejected: int, error_detail: str) -> None:
        if rejected <= applied:
            rejected, error_detail = 0, ""
        self._acks[sidecar_id] = SidecarAck(sidecar_id, applied, rejected, error_detail, self._clock())
        self._wake.set()

    def may_ack(self, sidecar_id: str, scope: frozenset[str] | None) -> bool | None:
        """Whether a token scoped to ``scope`` (None: every tenant) may acknowledge for
        ``sidecar_id``, by the stream this replica holds under that id; None when it
        holds none (``may_ack_shared`` then asks the shared record)."""
        handle = self._streams.get(sidecar_id)
        if handle is None:
            return None
        return covers(scope, handle.tenants)

    async def may_ack_shared(self, sidecar_id: str, scope: frozenset[str] | None) -> bool:
        """``may_ack`` by the shared record (the stream is on another replica); a
        sidecar id with no stream anywhere may be acknowledged only by an all-tenant token."""
        for record in await self._store.list_sidecar_status():
            if record.sidecar_id == sidecar_id and record.seen_at is not None:
                return covers(scope, None if record.tenants is None else frozenset(record.tenants))
        return scope is None

    def _mark(self, sidecar_id: str) -> None:
        self._dirty.add(sidecar_id)
        self._wake.set()

    # writing ----------------------------------------------------------------------
    async def flush(self) -> None:
        """Write what is dirty now (raises what the store raised; the notes stay dirty)."""
        async with self._flush_lock:
            dirty, self._dirty = self._dirty, set()
            dropped, self._dropped = self._dropped, set()
            acks, self._acks = self._acks, {}
            streams = [self._streams[i].record() for i in sorted(dirty) if i in self._streams]
            try:
                await self._store.drop_sidecar_streams(self.replica, sorted(dropped))
                await self._store.put_sidecar_streams(self.replica, streams, self._clock())
                await self._store.put_sidecar_acks(list(acks.values()))
            except BaseException:
                self._dirty |= dirty
                self._dropped |= dropped - self._streams.keys()
                for sidecar_id, ack in acks.items():
                    self._acks.setdefault(sidecar_id, ack)
                raise

    def _beat(self) -> None:
        self._dirty.update(self._streams)
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet-tracker")

    async def close(self) -> None:
        """Stop writing; a last try at what is dirty, and this replica's
        streams are dropped from the shared record."""
        self._cache.remove_listener(self._on_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._dropped |= self._streams.keys()
        self._streams.clear()
        self._dirty.clear()
        try:
            await asyncio.wait_for(self.flush(), 2.0)
        except Exception as exc:
            log.warning("could not write the last sidecar states: %s", type(exc).__name__)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._heartbeat
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - loop.time()))
            self._wake.clear()
            if loop.time() >= next_beat:
                next_beat = loop.time() + self._heartbeat
                self._beat()
                with contextlib.suppress(Exception):
                    await self._store.sweep_sidecar_status(self._clock() - 2 * self.expire_after)
            try:
                await self.flush()
                if failing:
                    log.info("sidecar states written to the store again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("could not write sidecar states (retrying): %s", type(exc).__name__)
                failing = True
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            await asyncio.sleep(self._flush_interval)

    # reading ----------------------------------------------------------------------
    async def records(self) -> list[SidecarRecord]:
        """The shared record of every live stream (this replica's notes
        written first, so its own answer is never older than itself)."""
        with contextlib.suppress(Exception):
            await self.flush()  # best effort: the read below says whether the store is there
        records = await self._store.list_sidecar_status()
        now = self._clock()
        return [r for r in records if is_live(r, now, self.expire_after)]

    def latest_for(self, tenants: frozenset[str] | tuple[str, ...] | None) -> int:
        """The newest change of ``tenants`` (None: all) this replica knows."""
        return latest_for(tenants, self.tenant_versions, self.floor)
