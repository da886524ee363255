"""One watch stream's subscription to the snapshot cache (``control_plane.snapshot_cache``).

Every subscriber has its own bounded queue; the cache only appends to it and
never waits. A subscriber that falls more than ``max_pending`` changes behind
loses its queued changes and gets one fresh snapshot instead (built by the
cache from memory, never from the store).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol

from keyplane.limits import MAX_DELTA_MESSAGE_BYTES
from keyplane.v1 import sidecar_service_pb2

__all__ = ["SnapshotSource", "SubscriberInfo", "Subscription"]


class SnapshotSource(Protocol):
    """What a subscription needs of its cache (``SnapshotCache``)."""

    @property
    def version(self) -> int: ...

    def snapshot(self, tenants: frozenset[str] | None) -> sidecar_service_pb2.WatchResponse: ...

    def _unsubscribe(self, subscription: Subscription) -> None: ...


@dataclass(frozen=True, slots=True)
class SubscriberInfo:
    """One connected watch stream, for the admin's view of the fleet."""

    sidecar_id: str
    tenants: frozenset[str] | None  # None: every tenant
    peer: str
    connected_at: datetime
    version: int  # the version of the last message handed to the stream


class Subscription:
    """One watcher's view: iterate it for ``WatchResponse`` messages; it ends
    when closed (by the watcher or by ``SnapshotCache.close``)."""

    def __init__(
        self,
        cache: SnapshotSource,
        tenants: frozenset[str] | None,
        *,
        max_pending: int,
        sidecar_id: str,
        peer: str,
        connected_at: datetime,
    ) -> None:
        self._cache = cache
        self.tenants = tenants
        self._max_pending = max_pending
        # Each queued change with its encoded size.
        self._pending: deque[tuple[sidecar_service_pb2.Change, int]] = deque()
        self._snapshot_due = False
        self._send_empty_delta = False
        self._wake = asyncio.Event()
        self._closed = False
        self._delivered = 0
        self._sidecar_id = sidecar_id
        self._peer = peer
        self._connected_at = connected_at

    # producer side (the cache) ---------------------------------------------------
    def matches(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def _start_with_snapshot(self) -> None:
        self._snapshot_due = True
        self._wake.set()

    def _start_with_delta(self, missed: list[tuple[sidecar_service_pb2.Change, int]]) -> None:
        self._pending.extend(missed)
        self._send_empty_delta = True
        self._wake.set()

    def _push(self, change: sidecar_service_pb2.Change, size: int) -> None:
        if self._closed or self._snapshot_due:
            return  # the snapshot still to be built will include it
        if len(self._pending) >= self._max_pending:
            self._pending.clear()
            self._snapshot_due = True
        else:
            self._pending.append((change, size))
        self._wake.set()

    # consumer side (the stream) ------------------------------------------------
    @property
    def pending(self) -> int:
        """Changes queued and not yet taken by the stream."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    async def next(self) -> sidecar_service_pb2.WatchResponse | None:
        """The next message (queued changes coalesced into one delta of at
        most ``MAX_DELTA_MESSAGE_BYTES``, the rest following in the next), or
        None once the subscription is closed. ``SnapshotTooLarge`` when the
        snapshot due would not fit in one message."""
        while not self._closed:
            if self._snapshot_due:
                self._snapshot_due = False
                self._send_empty_delta = False
                self._pending.clear()
                response = self._cache.snapshot(self.tenants)
                self._delivered = response.version
                return response
            if self._pending or self._send_empty_delta:
                self._send_empty_delta = False
                changes: list[sidecar_service_pb2.Change] = []
                taken = 0
                pending = self._pending
                while pending and (not changes or taken + pending[0][1] <= MAX_DELTA_MESSAGE_BYTES):
                    change, size = pending.popleft()
                    changes.append(change)
                    taken += size
                # With nothing left, every change up to cache.version for our
                # tenants is in the delta; else only those up to the last one.
                self._delivered = changes[-1].version if pending else self._cache.version
                if pending:
                    self._wake.set()
                delta = sidecar_service_pb2.Delta(changes=changes)
                return sidecar_service_pb2.WatchResponse(version=self._delivered, delta=delta)
            self._wake.clear()
            await self._wake.wait()
        return None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> sidecar_service_pb2.WatchResponse:
        response = await self.next()
        if response is None:
            raise StopAsyncIteration
        return response

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._wake.set()
        self._cache._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def info(self) -> SubscriberInfo:
        return SubscriberInfo(
            sidecar_id=self._sidecar_id,
            tenants=self.tenants,
            peer=self._peer,
            connected_at=self._connected_at,
            version=self._delivered,
        )
