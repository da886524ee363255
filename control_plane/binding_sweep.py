"""The sweep of expired affinity bindings: every ``interval`` seconds, one
replica at a time (``Store.try_lease``: a Postgres advisory lock; in memory on
SQLite) deletes expired bindings in bounded batches, at most ``max_batches``
per round so a backlog never holds a connection for long."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from control_plane.affinity import Affinity
from control_plane.store.base import Store

__all__ = ["LEASE", "BindingSweeper"]

log = logging.getLogger(__name__)

LEASE = "binding-sweep"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class BindingSweeper:
    def __init__(
        self,
        store: Store,
        affinity: Affinity,
        *,
        interval: float = 30.0,
        batch: int = 1000,
        max_batches: int = 10,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if interval <= 0 or batch < 1 or max_batches < 1:
            raise ValueError("interval must be positive, batch and max_batches at least 1")
        self._store = store
        self._affinity = affinity
        self._interval = interval
        self._batch = batch
        self._max_batches = max_batches
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def sweep_once(self) -> int | None:
        """One round; the number of bindings deleted, None when another
        replica holds the lease."""
        async with self._store.try_lease(LEASE) as held:
            if not held:
                return None
            total = 0
            for _ in range(self._max_batches):
                deleted = await self._store.sweep_bindings(self._clock(), self._batch)
                total += deleted
                if deleted < self._batch:
                    break
        self._affinity.swept += total
        if total:
            log.debug("swept %d expired bindings", total)
        return total

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="binding-sweep")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep_once()
            except Exception as exc:
                log.warning("binding sweep failed: %s", type(exc).__name__)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
