"""At most N calls in flight per upstream origin; the rest wait first come, first served.

aiohttp's connector caps connections per host too, but (3.14) a waiter woken
and cancelled in the same loop turn loses the wake-up, so the next waiter
sleeps while a connection sits free, and a newcomer can take a freed
connection ahead of the queue. The sidecar's client therefore gates calls
itself, before aiohttp, with this small FIFO: a freed slot goes straight to
the oldest live waiter, a newcomer queues behind anyone waiting, and a waiter
cancelled after it was handed a slot hands it on.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ["HostGate"]


class _Origin:
    __slots__ = ("in_use", "waiters")

    def __init__(self) -> None:
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()


class HostGate:
    """Slots per origin: ``try_enter`` or ``enter`` before a call, ``leave`` once after it."""

    __slots__ = ("_limit", "_origins")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._origins: dict[str, _Origin] = {}

    def _origin(self, origin: str) -> _Origin:
        found = self._origins.get(origin)
        if found is None:
            found = self._origins[origin] = _Origin()
        return found

    def try_enter(self, origin: str) -> bool:
        """Take a slot at once if one is free and nobody waits for it."""
        o = self._origin(origin)
        if o.in_use < self._limit and not o.waiters:
            o.in_use += 1
            return True
        return False

    async def enter(self, origin: str) -> None:
        """Wait in line for a slot (after ``try_enter`` said no)."""
        o = self._origin(origin)
        if o.in_use < self._limit and not o.waiters:
            o.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        o.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave(origin)  # handed a slot, but cancelled before using it: pass it on
            else:
                try:
                    o.waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def leave(self, origin: str) -> None:
        """Give a slot back: to the oldest live waiter, else to the pool of free slots."""
        o = self._origins[origin]
        waiters = o.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; ``in_use`` stays
                return
        o.in_use -= 1  # (origins are kept: there are few, and no object per call)

    def in_use(self, origin: str) -> int:
        o = self._origins.get(origin)
        return 0 if o is None else o.in_use
