"""Admission of new watch streams: a fleet reconnecting at once is spread out, not refused blindly.

A pure GCRA (generic cell rate algorithm, a token bucket without a timer):
``rate`` new streams a second on average, bursts of ``burst`` at once. A
stream over the limit is told how long to wait (``admit`` returns the
delay), and each one told gets a later slot than the one before it, so a
thousand sidecars pushed back at once come back spread over the time the
bucket needs to take them, not together again. The delay has a little
jitter on top (at most ``jitter`` of it) so that they do not line up
exactly. The clock and the random source are passed in.

Streams are served from memory (the snapshot cache), so this guards the
control plane's CPU and network (a full snapshot per new stream), not its
database, which a reconnect never touches.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

__all__ = ["WatchAdmission"]


class WatchAdmission:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        jitter: float = 0.1,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._jitter = jitter
        self._tat = 0.0  # theoretical arrival time of the next conforming stream
        self._promised = 0.0  # the latest slot promised to a stream told to wait
        self.admitted = 0
        self.pushed_back = 0

    def admit(self) -> float | None:
        """None: serve this stream now; else the seconds it should wait before trying again."""
        now = self._clock()
        tat = max(self._tat, now)
        if tat - now <= self._tolerance + 1e-9:  # (floating-point slack)
            self._tat = tat + self._interval
            self.admitted += 1
            return None
        # Over the limit: promise the next free slot after those already promised.
        slot = max(self._promised + self._interval, tat - self._tolerance)
        self._promised = slot
        self.pushed_back += 1
        delay = slot - now
        return delay + self._rng.uniform(0.0, delay * self._jitter)
