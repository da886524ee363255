"""Fast, gentle resync: the first reconnect is immediate, the backoff is capped low, and a
control plane shedding load tells the sidecar when to come back (real gRPC, real control plane)."""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import pytest

from keyplane.pushback import MAX_DELAY, RETRY_DELAY_KEY, decode_retry_delay, encode_retry_delay
from keyplane.v1 import admin_service_pb2 as apb
from sidecar.server import Sidecar
from sidecar.watch import Backoff

from .conftest import sidecar_config
from .plane import ADMIN_MD, SIDECAR_TOKEN, Plane


def test_after_a_stable_stream_the_first_reconnect_is_immediate_then_backoff_from_base() -> None:
    backoff = Backoff(0.05, 1.0, random.Random(2))
    for _ in range(6):
        backoff.next_delay()
    backoff.reset(immediate=True)
    assert backoff.next_delay() == 0.0
    assert backoff.ceiling() == pytest.approx(0.05)
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        assert backoff.next_delay() <= 1.0
    assert ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    backoff.reset()  # a stream that broke at once: no immediate retry
    assert backoff.next_delay() <= 0.05


def test_the_retry_delay_metadata_round_trips_and_is_bounded() -> None:
    assert decode_retry_delay(encode_retry_delay(0.25)) == pytest.approx(0.25)
    assert decode_retry_delay(((RETRY_DELAY_KEY, "999999999"),)) == MAX_DELAY
    for bad in ("-5", "soon", ""):
        assert decode_retry_delay(((RETRY_DELAY_KEY, bad),)) is None
    assert decode_retry_delay((("other", "5"),)) is None
    assert decode_retry_delay(None) is None


async def test_a_busy_control_plane_tells_the_sidecar_when_to_come_back(plane: Plane) -> None:
    # One new stream at once, then two a second: the second sidecar is told to wait ~0.5 s.
    plane.config = dataclasses.replace(plane.config, watch_admit_rate=2.0, watch_admit_burst=1)
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    configs = [
        sidecar_config(
            control_plane_target=plane.address, sidecar_token=SIDECAR_TOKEN, tenants=("acme",), sidecar_id=f"sc-{i}"
        )
        for i in range(2)
    ]
    async with Sidecar(configs[0]) as first:
        assert await first.wait_ready(10)
        started = time.monotonic()
        async with Sidecar(configs[1]) as second:
            assert await second.wait_ready(10)
            waited = time.monotonic() - started
            assert second.watch is not None and first.watch is not None
            print(f"\nsecond sidecar: {second.watch.pushbacks} pushback(s), in sync after {waited:.3f}s")
            assert second.watch.pushbacks == 1
            assert first.watch.pushbacks == 0
            assert 0.4 <= waited < 3.0  # waited as told (0.5 s + jitter), not its own 50 ms backoff


async def test_a_sidecar_waiting_for_an_unreachable_control_plane_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, unused_tcp_port: int
) -> None:
    monkeypatch.setattr("sidecar.watch._WAITING_LOG_AFTER", 0.3)
    monkeypatch.setattr("sidecar.watch._WAITING_LOG_EVERY", 0.3)
    config = sidecar_config(control_plane_target=f"127.0.0.1:{unused_tcp_port}", sidecar_token=SIDECAR_TOKEN)
    with caplog.at_level(logging.WARNING, logger="sidecar.watch"):
        async with Sidecar(config) as sc:
            assert not await sc.wait_ready(1.0)
    lines = [r.getMessage() for r in caplog.records if "cannot reach the control plane" in r.getMessage()]
    assert len(lines) >= 2, lines  # at first after the delay, then again while it lasts
    assert "nothing to serve yet" in lines[0]
    assert SIDECAR_TOKEN not in caplog.text
