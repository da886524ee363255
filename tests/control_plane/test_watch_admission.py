"""WatchAdmission (pure): bursts pass, a stampede is spread at the rate, each told when to come back."""

from __future__ import annotations

import random

import pytest

from control_plane.watch_admission import WatchAdmission


def test_a_burst_passes_and_the_rest_is_spread_at_the_rate() -> None:
    now = [100.0]
    admission = WatchAdmission(100.0, 10, clock=lambda: now[0], rng=random.Random(3), jitter=0.0)
    decisions = [admission.admit() for _ in range(50)]
    assert decisions[:10] == [None] * 10
    delays = [d for d in decisions[10:] if d is not None]
    assert len(delays) == 40
    # Each one told a later slot than the one before it, 10 ms apart (100 a second).
    assert delays == sorted(delays)
    assert delays[0] == pytest.approx(0.01)
    assert delays[-1] == pytest.approx(0.40)
    assert (admission.admitted, admission.pushed_back) == (10, 40)


def test_the_pushed_back_come_back_at_their_slots_and_are_admitted() -> None:
    now = [0.0]
    admission = WatchAdmission(1000.0, 100, clock=lambda: now[0], rng=random.Random(1), jitter=0.0)
    retry_at = sorted(now[0] + d for d in (admission.admit() for _ in range(1000)) if d is not None)
    assert len(retry_at) == 900
    refused_again = 0
    for when in retry_at:
        now[0] = when
        if admission.admit() is not None:
            refused_again += 1
    assert refused_again == 0
    assert retry_at[-1] == pytest.approx(0.9, abs=0.01)  # 900 more at 1000 a second


def test_jitter_only_adds() -> None:
    now = [0.0]
    admission = WatchAdmission(10.0, 1, clock=lambda: now[0], rng=random.Random(5), jitter=0.1)
    assert admission.admit() is None
    delay = admission.admit()
    assert delay is not None and 0.1 <= delay <= 0.11


def test_quiet_time_refills_the_bucket() -> None:
    now = [0.0]
    admission = WatchAdmission(10.0, 2, clock=lambda: now[0])
    assert admission.admit() is None and admission.admit() is None
    assert admission.admit() is not None
    now[0] += 10.0
    assert admission.admit() is None and admission.admit() is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        WatchAdmission(0.0, 1)
    with pytest.raises(ValueError):
        WatchAdmission(1.0, 0)
