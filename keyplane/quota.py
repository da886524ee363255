"""A sidecar's local quota for one limited bucket: pure window accounting.

Windows are aligned to multiples of ``window_ms`` since the unix epoch, so the
sidecar and the control plane agree on them from the clock alone. The control
plane leases each sidecar, per window, a cumulative ``granted`` amount (it only
grows within a window), a ``next_granted`` for the window after (so a new
window starts without waiting for the control plane), and a ``fallback``: what
the sidecar enforces per window once leases stop arriving (fail-static). The
request path calls ``take``: integer arithmetic and a compare, no I/O.

The clock is passed in (unix milliseconds); nothing here reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["MONTH", "Lease", "LocalQuota", "window_bounds", "window_start"]

# ``window_ms`` of the calendar month (UTC): months are not of one length.
MONTH = 0


def window_bounds(now_ms: int, window_ms: int) -> tuple[int, int]:
    """(start, end) of the window holding ``now_ms``: a multiple of
    ``window_ms`` since the epoch, or the UTC calendar month for ``MONTH``."""
    if window_ms != MONTH:
        start = now_ms - now_ms % window_ms
        return start, start + window_ms
    day = datetime.fromtimestamp(now_ms / 1000, UTC)
    first = datetime(day.year, day.month, 1, tzinfo=UTC)
    following = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    return int(first.timestamp() * 1000), int(following.timestamp() * 1000)


def window_start(now_ms: int, window_ms: int) -> int:
    """The start of the window holding ``now_ms``."""
    return window_bounds(now_ms, window_ms)[0]


def _next_start(start_ms: int, window_ms: int) -> int:
    return window_bounds(start_ms, window_ms)[1]


@dataclass(frozen=True, slots=True)
class Lease:
    """One bucket's lease as the control plane sent it (``QuotaLease``)."""

    limit: int
    window_ms: int
    window_start_ms: int
    granted: int
    next_granted: int
    fallback: int
    exhausted: bool = False


@dataclass(slots=True)
class LocalQuota:
    """What one sidecar may still admit of one bucket, and what it saw."""

    lease: Lease
    window_start_ms: int = -1
    window_end_ms: int = -1
    granted: int = 0
    used: int = 0
    # Asked for (admitted or refused) since the last ``report``.
    demanded: int = 0
    # What one request costed on average (tokens, spend): what a refused one
    # adds to the demand when its cost is only known afterwards.
    typical: int = 0

    def update(self, lease: Lease, now_ms: int) -> None:
        """A new lease arrived: its grant for our current window counts at once."""
        self._roll(now_ms)
        if lease.window_ms != self.lease.window_ms:
            self.lease = lease
            self.window_start_ms = self.window_end_ms = -1
            self._roll(now_ms)
            return
        self.lease = lease
        if lease.window_start_ms == self.window_start_ms:
            self.granted = max(self.granted, lease.granted)
        elif _next_start(lease.window_start_ms, lease.window_ms) == self.window_start_ms:
            # Sent just before our window began: its pre-grant is for this window.
            self.granted = max(self.granted, lease.next_granted)

    def _roll(self, now_ms: int) -> None:
        lease = self.lease
        if self.window_start_ms <= now_ms < self.window_end_ms:
            return
        start, self.window_end_ms = window_bounds(now_ms, lease.window_ms)
        self.window_start_ms = start
        self.used = 0
        if start == lease.window_start_ms:
            self.granted = lease.granted
        elif start == _next_start(lease.window_start_ms, lease.window_ms):
            self.granted = lease.next_granted
        else:
            self.granted = lease.fallback  # no lease for this window: fail-static

    def take(self, now_ms: int, amount: int = 1) -> int:
        """Admit ``amount`` if the lease has room: 0; else the milliseconds after
        which a retry may succeed (the next lease, or the next window)."""
        self._roll(now_ms)
        self.demanded += amount
        if self.used < self.granted:
            self.used += amount
            return 0
        return self.retry_after_ms(now_ms)

    def check(self, now_ms: int) -> int:
        """Admit a request whose cost is known only afterwards (``charge``) if
        anything is left: 0; else the milliseconds to wait (demand noted)."""
        self._roll(now_ms)
        if self.used < self.granted:
            return 0
        self.demanded += self.typical
        return self.retry_after_ms(now_ms)

    def refund(self, amount: int = 1) -> None:
        """Give back a ``take`` (another bucket of the same request refused it)."""
        self.used = max(0, self.used - amount)

    def charge(self, now_ms: int, amount: int) -> None:
        """Count what is only known after the request (tokens, spend)."""
        self._roll(now_ms)
        self.used += amount
        self.demanded += amount
        self.typical = amount if not self.typical else (self.typical * 7 + amount) // 8

    def retry_after_ms(self, now_ms: int, lease_interval_ms: int = 1000) -> int:
        to_window_end = self.window_end_ms - now_ms
        current = self.lease.window_start_ms == self.window_start_ms
        if self.lease.exhausted or not current:
            return max(1, to_window_end)
        return max(1, min(lease_interval_ms, to_window_end))

    def remaining(self, now_ms: int) -> int:
        self._roll(now_ms)
        return max(0, self.granted - self.used)

    def report(self, now_ms: int) -> tuple[int, int, int]:
        """(window start, used in it, demanded since the last report); resets the demand."""
        self._roll(now_ms)
        demanded, self.demanded = self.demanded, 0
        return self.window_start_ms, self.used, demanded
