"""OutcomeReporter against the real control plane over a real gRPC socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from keyplane.domain import Provider
from keyplane.health.classify import classify_exception, classify_response
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2
from keyplane.v1 import sidecar_service_pb2 as pb
from sidecar.config import SidecarConfig
from sidecar.model import Target
from sidecar.proxy import AttemptRecord
from sidecar.reporter import OutcomeReporter, outcome_to_proto
from sidecar.router import Attempt

from .conftest import sidecar_config
from .plane import ADMIN_MD, SIDECAR_TOKEN, Plane, eventually
from .test_router import key


def outcome(key_id: str, n: int = 0) -> pb.Outcome:
    return pb.Outcome(
        tenant="acme",
        key_id=key_id,
        provider=resources_pb2.PROVIDER_OPENAI,
        model="gpt-4o-mini",
        outcome_class=pb.OUTCOME_CLASS_SUCCESS,
        status_code=200,
        latency_ms=12,
        provider_final=True,
        request_id=f"req-{n}",
    )


SUCCESS = classify_response(200, {}, b"", now=0.0)


def reporter_config(target: str, **overrides: object) -> SidecarConfig:
    values: dict[str, object] = {
        "control_plane_target": target,
        "sidecar_token": SIDECAR_TOKEN,
        "tenants": ("acme",),
        "watch_backoff_base": 0.05,
        "watch_backoff_cap": 0.3,
        "report_interval": 0.01,
    }
    values.update(overrides)
    return sidecar_config(**values)


class Running:
    def __init__(self, reporter: OutcomeReporter) -> None:
        self.reporter = reporter
        self.task = asyncio.create_task(reporter.run())

    async def stop(self, within: float = 5.0) -> None:
        self.reporter.stop()
        await asyncio.wait_for(self.task, within)


@pytest.fixture
async def key_id(plane: Plane) -> AsyncIterator[str]:
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    response = await admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme", provider=resources_pb2.PROVIDER_OPENAI, label="main", secret="sk-reporter-0001"
        ),
        metadata=ADMIN_MD,
    )
    yield response.key.id


def accepted(plane: Plane) -> int:
    assert plane.plane is not None
    return plane.plane.aggregator.stats.accepted


async def test_outcomes_reach_the_control_plane_over_one_stream(plane: Plane, key_id: str) -> None:
    running = Running(OutcomeReporter(reporter_config(plane.address)))
    try:
        for n in range(1200):  # more than two batches
            running.reporter.enqueue(outcome(key_id, n))

        async def all_in() -> bool:
            return accepted(plane) >= 1200

        await eventually(all_in)
        for n in range(10):
            running.reporter.enqueue(outcome(key_id, n))

        async def more_in() -> bool:
            return accepted(plane) >= 1210

        await eventually(more_in)
    finally:
        await running.stop()
    stats = running.reporter.stats
    assert stats.sent == 1210 and stats.dropped_total == 0
    assert stats.streams == 1  # one long-lived stream for everything


async def test_queued_attempt_records_are_encoded_and_delivered_in_batches(plane: Plane, key_id: str) -> None:
    """The request path's ``enqueue_record``: each record is encoded when queued, the
    batches are joined from those bytes, and every one reaches the control plane."""
    running = Running(OutcomeReporter(reporter_config(plane.address, report_batch_size=300)))
    attempt = openai_attempt(key_id)
    try:
        for n in range(1000):  # several batches
            record = timeout_record(attempt, n) if n % 10 == 0 else success_record(attempt, n)
            running.reporter.enqueue_record("acme", record, f"req-{n}")

        async def all_in() -> bool:
            return accepted(plane) >= 1000

        await eventually(all_in)
    finally:
        await running.stop()
    stats = running.reporter.stats
    assert stats.sent == 1000 and stats.dropped_total == 0
    assert accepted(plane) == 1000


def openai_attempt(key_id: str) -> Attempt:
    return Attempt(target=Target(Provider.OPENAI, "gpt-4o-mini", 0, 1, ()), key=key(key_id, provider=Provider.OPENAI))


def timeout_record(attempt: Attempt, n: int) -> AttemptRecord:
    return AttemptRecord(
        attempt=attempt,
        classification=classify_exception("timeout"),
        started=time.time(),
        latency_ms=n,
        outcome="timeout",
        provider_final=True,
    )


def success_record(attempt: Attempt, n: int) -> AttemptRecord:
    return AttemptRecord(
        attempt=attempt, classification=SUCCESS, started=time.time(), latency_ms=n, outcome="2xx", provider_final=True
    )


def queue_successes(reporter: OutcomeReporter, attempt: Attempt, numbers: range) -> None:
    for n in numbers:
        reporter.enqueue_record("acme", success_record(attempt, n), f"req-{n}")


async def test_successes_gather_but_a_failure_leaves_at_once(plane: Plane, key_id: str) -> None:
    """Plain successes wait up to ``report_interval`` (long here); a queued failure
    sends the batch within ``report_failure_interval``, the successes with it."""
    config = reporter_config(plane.address, report_interval=30.0, report_failure_interval=0.02)
    running = Running(OutcomeReporter(config))
    attempt = openai_attempt(key_id)
    try:
        queue_successes(running.reporter, attempt, range(5))
        await asyncio.sleep(0.5)
        assert accepted(plane) == 0 and running.reporter.queued == 5  # still gathering
        started = time.monotonic()
        running.reporter.enqueue_record("acme", timeout_record(attempt, 5), "req-5")

        async def all_in() -> bool:
            return accepted(plane) == 6

        await eventually(all_in)
        assert time.monotonic() - started < 5.0
        # The next successes gather again.
        running.reporter.enqueue_record("acme", success_record(attempt, 6), "req-6")
        await asyncio.sleep(0.5)
        assert accepted(plane) == 6 and running.reporter.queued == 1
        # A failure enqueued as a ready message hurries the batch as well.
        failed = outcome(key_id, 7)
        failed.outcome_class, failed.status_code = pb.OUTCOME_CLASS_UPSTREAM_ERROR, 503
        running.reporter.enqueue(failed)

        async def both_in() -> bool:
            return accepted(plane) == 8

        await eventually(both_in)
    finally:
        await running.stop()
    assert running.reporter.stats.sent == 8


async def test_a_full_batch_leaves_without_waiting(plane: Plane, key_id: str) -> None:
    config = reporter_config(plane.address, report_interval=30.0, report_batch_size=50)
    running = Running(OutcomeReporter(config))
    attempt = openai_attempt(key_id)
    try:
        queue_successes(running.reporter, attempt, range(120))

        async def two_batches_in() -> bool:
            return accepted(plane) == 100

        await eventually(two_batches_in)
        await asyncio.sleep(0.3)
        assert accepted(plane) == 100 and running.reporter.queued == 20  # the rest gathers
        stopping = time.monotonic()
    finally:
        await running.stop()
    assert time.monotonic() - stopping < 5.0  # stop cuts the 30 s wait short and flushes
    assert accepted(plane) == 120 and running.reporter.stats.sent == 120


async def test_stop_flushes_what_is_queued(plane: Plane, key_id: str) -> None:
    running = Running(OutcomeReporter(reporter_config(plane.address)))
    running.reporter.enqueue(outcome(key_id))

    async def live() -> bool:
        return accepted(plane) >= 1

    await eventually(live)
    for n in range(300):
        running.reporter.enqueue(outcome(key_id, n))
    await running.stop()
    assert running.reporter.stats.sent == 301
    assert accepted(plane) == 301


async def test_unreachable_control_plane_drops_and_counts(unused_tcp_port: int) -> None:
    config = reporter_config(f"127.0.0.1:{unused_tcp_port}", report_queue_size=5, report_max_age=0.3)
    reporter = OutcomeReporter(config)
    running = Running(reporter)
    try:
        started = time.perf_counter()
        for n in range(10_000):
            reporter.enqueue(outcome("pk_x", n))
        # O(1) and never blocking: 10k enqueues take no time, memory stays at the cap.
        assert time.perf_counter() - started < 1.0
        assert reporter.queued <= 5
        assert reporter.stats.dropped["queue_full"] >= 9_995

        async def all_dropped() -> bool:
            return reporter.queued == 0 and reporter.stats.dropped_total == 10_000

        await eventually(all_dropped)
        assert reporter.stats.sent == 0
    finally:
        await running.stop()


async def test_reconnects_after_the_control_plane_comes_back(plane: Plane, key_id: str) -> None:
    running = Running(OutcomeReporter(reporter_config(plane.address, report_max_age=60.0)))
    try:
        running.reporter.enqueue(outcome(key_id))

        async def first() -> bool:
            return accepted(plane) == 1

        await eventually(first)
        await plane.stop()
        await plane.start()  # a fresh aggregator: counts from zero
        for n in range(5):
            running.reporter.enqueue(outcome(key_id, n))

        async def again() -> bool:
            return accepted(plane) == 5

        await eventually(again, within=10.0)
        assert running.reporter.stats.streams >= 2
    finally:
        await running.stop()


def test_outcome_record_to_proto() -> None:
    target = Target(Provider.GEMINI, "gemini-2.0-flash", 0, 1, ())
    record = AttemptRecord(
        attempt=Attempt(target=target, key=None),
        classification=classify_exception("timeout"),
        started=1_700_000_000.25,
        latency_ms=1500,
        outcome="timeout",
        provider_final=False,
        recovered=True,
    )
    assert outcome_to_proto("acme", record, "req-1") is None  # keyless: nothing to attribute
    record.attempt = Attempt(target=target, key=key("pk_1", provider=Provider.GEMINI))
    message = outcome_to_proto("acme", record, "req-1")
    assert message is not None
    assert message.tenant == "acme" and message.key_id == "pk_1"
    assert message.provider == resources_pb2.PROVIDER_GEMINI
    assert message.model == "gemini-2.0-flash"
    assert message.outcome_class == pb.OUTCOME_CLASS_UPSTREAM_ERROR
    assert message.status_code == 0 and message.latency_ms == 1500
    assert message.recovered and not message.provider_final
    assert message.request_id == "req-1"
    assert message.time.ToNanoseconds() == 1_700_000_000_250_000_000
    assert not message.HasField("retry_after")
    assert "sk-" not in str(message)
