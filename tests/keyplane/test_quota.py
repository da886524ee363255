"""keyplane.quota: a sidecar's window accounting from its lease, by table."""

from __future__ import annotations

from keyplane.quota import Lease, LocalQuota, window_start

W = 6000


def lease(start: int, granted: int, next_granted: int = 0, fallback: int = 0, exhausted: bool = False) -> Lease:
    return Lease(100, W, start, granted, next_granted, fallback, exhausted)


def test_window_start_is_aligned_to_the_epoch() -> None:
    assert window_start(12_345, W) == 12_000
    assert window_start(12_000, W) == 12_000


def test_take_admits_up_to_the_grant_then_says_when_to_retry() -> None:
    q = LocalQuota(lease(12_000, 3))
    assert [q.take(12_100) for _ in range(3)] == [0, 0, 0]
    assert q.take(12_100) == 1000  # more may come with the next lease
    assert q.demanded == 4 and q.used == 3
    q.update(lease(12_000, 3, exhausted=True), 12_200)
    assert q.take(17_500) == 500  # nothing left in the fleet: the window's end


def test_a_new_lease_tops_up_the_current_window() -> None:
    q = LocalQuota(lease(12_000, 1))
    assert q.take(12_001) == 0
    assert q.take(12_002) > 0
    q.update(lease(12_000, 2), 12_500)
    assert q.take(12_600) == 0


def test_the_next_window_starts_from_the_pre_grant_and_a_stale_lease_from_the_fallback() -> None:
    q = LocalQuota(lease(12_000, 5, next_granted=2, fallback=7))
    assert q.remaining(12_001) == 5
    assert q.remaining(18_000) == 2  # pre-granted, no lease needed
    assert q.remaining(24_000) == 7  # fail-static: the fallback, every window
    assert q.remaining(90_000) == 7


def test_a_lease_sent_just_before_the_window_turned_counts_as_its_pre_grant() -> None:
    q = LocalQuota(lease(12_000, 5, next_granted=2))
    assert q.remaining(18_010) == 2
    q.update(lease(12_000, 5, next_granted=4), 18_020)
    assert q.remaining(18_030) == 4


def test_report_resets_the_demand_and_refund_gives_back() -> None:
    q = LocalQuota(lease(12_000, 5))
    q.take(12_001)
    q.take(12_002)
    q.refund()
    assert q.report(12_003) == (12_000, 1, 2)
    assert q.report(12_004) == (12_000, 1, 0)
    q.charge(12_005, 40)
    assert q.used == 41


def test_calendar_months_are_windows_of_their_own_length() -> None:
    from datetime import UTC, datetime

    from keyplane.quota import MONTH, window_bounds

    def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
        return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)

    assert window_bounds(ms(2026, 2, 14, 12), MONTH) == (ms(2026, 2, 1), ms(2026, 3, 1))
    assert window_bounds(ms(2026, 12, 31, 23), MONTH) == (ms(2026, 12, 1), ms(2027, 1, 1))
    q = LocalQuota(Lease(100, MONTH, ms(2026, 1, 1), 5, 9, 3))
    assert q.remaining(ms(2026, 1, 31, 23)) == 5
    assert q.remaining(ms(2026, 2, 1)) == 9  # the pre-grant of the month after
    assert q.remaining(ms(2026, 3, 2)) == 3  # fail-static
    assert q.take(ms(2026, 3, 31, 23, 59)) == 0
