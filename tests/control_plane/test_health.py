"""Outcome reports -> health -> Watch, admin health RPCs, restarts: a real
control plane (gRPC on 127.0.0.1, SQLite file), real gRPC clients."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.json_format import MessageToDict
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import (
    ADMIN_MD,
    SIDECAR_ACME_MD,
    SIDECAR_ALL_MD,
    Harness,
    HarnessFactory,
    WatchCall,
    next_message,
)

C = spb  # outcome classes live in the sidecar service proto
MODEL = "gpt-4o"
OTHER_MODEL = "gpt-4o-mini"

ReportCall = aio.StreamUnaryCall[spb.ReportOutcomesRequest, spb.ReportOutcomesResponse]


def outcome(
    key_id: str,
    outcome_class: int,
    *,
    tenant: str = "acme",
    model: str = MODEL,
    provider: int = rpb.PROVIDER_OPENAI,
    status: int = 0,
    provider_final: bool = False,
    recovered: bool = False,
    retry_after: float | None = None,
    reason: str = "",
    started: float | None = None,
) -> spb.Outcome:
    message = spb.Outcome(
        tenant=tenant,
        key_id=key_id,
        provider=provider,  # type: ignore[arg-type]
        model=model,
        outcome_class=outcome_class,  # type: ignore[arg-type]
        status_code=status,
        latency_ms=12,
        recovered=recovered,
        provider_final=provider_final,
        request_id="req-1",
        reason=reason,
    )
    if retry_after is not None:
        message.retry_after.CopyFrom(Duration(seconds=int(retry_after), nanos=int(retry_after % 1 * 1e9)))
    if started is not None:
        message.time.FromNanoseconds(int(started * 1e9))
    return message


def credential(key_id: str, **kwargs: Any) -> spb.Outcome:
    return outcome(key_id, C.OUTCOME_CLASS_CREDENTIAL, status=400, reason="400 API key not valid", **kwargs)


def open_report(harness: Harness, metadata: tuple[tuple[str, str], ...] = SIDECAR_ALL_MD) -> ReportCall:
    return harness.sidecar.ReportOutcomes(None, metadata=metadata)


async def report(
    harness: Harness,
    *batches: Sequence[spb.Outcome],
    metadata: tuple[tuple[str, str], ...] = SIDECAR_ALL_MD,
) -> int:
    """One whole ReportOutcomes stream; returns the accepted count."""
    call = open_report(harness, metadata)
    for batch in batches:
        await call.write(spb.ReportOutcomesRequest(outcomes=list(batch), sidecar_id="sc-reporter"))
    await call.done_writing()
    response = await asyncio.wait_for(call, 30.0)  # a locked store delays it (busy timeout)
    return response.accepted


async def setup_keys(harness: Harness, n: int = 2) -> list[str]:
    await harness.tenant("acme")
    return [(await harness.key(label=f"key{i}", secret=f"sk-acme-secret-{i}-abcdefghijkl")).id for i in range(n)]


async def snapshot_of(harness: Harness, tenant: str = "acme") -> spb.TenantState:
    call = harness.watch((tenant,), sidecar_id="sc-snapshot")
    first = await next_message(call)
    call.cancel()
    assert first.WhichOneof("payload") == "snapshot"
    [state] = first.snapshot.tenants
    return state


async def health_changes(call: WatchCall, within: float = 1.0) -> list[spb.Change]:
    """The changes of the next delta (health ones and others)."""
    message = await next_message(call, within)
    assert message.WhichOneof("payload") == "delta"
    return list(message.delta.changes)


async def get_health(harness: Harness, tenant: str = "acme") -> apb.GetHealthResponse:
    return await harness.admin.GetHealth(apb.GetHealthRequest(tenant=tenant), metadata=ADMIN_MD)


async def watching(harness: Harness, tenant: str = "acme") -> WatchCall:
    call = harness.watch((tenant,), metadata=SIDECAR_ACME_MD, sidecar_id="sc-watcher")
    assert (await next_message(call)).WhichOneof("payload") == "snapshot"
    return call


async def test_credential_failure_reaches_every_watcher_within_a_second(harness: Harness) -> None:
    key1, key2 = await setup_keys(harness)
    watcher = await watching(harness)

    reporter = open_report(harness)  # another sidecar, long-lived stream
    started = time.monotonic()
    await reporter.write(spb.ReportOutcomesRequest(outcomes=[credential(key1)], sidecar_id="sc-1"))
    [change] = await health_changes(watcher, within=1.0)
    assert time.monotonic() - started < 1.0
    assert change.WhichOneof("change") == "key_health"
    assert change.tenant == "acme"
    health = change.key_health
    assert (health.key_id, health.model, health.state) == (key1, "", rpb.HEALTH_STATE_UNHEALTHY)
    assert health.reason == "400 API key not valid"
    assert not health.HasField("until")  # lasts until an admin acts
    assert change.version == await harness.latest_version()

    # A snapshot taken afterwards carries it; key 2 is untouched.
    state = await snapshot_of(harness)
    assert [(h.key_id, h.model, h.state) for h in state.key_health] == [(key1, "", rpb.HEALTH_STATE_UNHEALTHY)]
    assert {k.id for k in state.keys} == {key1, key2}

    # The same finding again changes nothing (no write, no delta).
    version = await harness.latest_version()
    await reporter.write(spb.ReportOutcomesRequest(outcomes=[credential(key1)], sidecar_id="sc-1"))
    await reporter.done_writing()
    assert (await asyncio.wait_for(reporter, 5.0)).accepted == 2
    assert await harness.latest_version() == version

    listed = await get_health(harness)
    assert [(h.key_id, h.model, h.state, h.reason) for h in listed.key_health] == [
        (key1, "", rpb.HEALTH_STATE_UNHEALTHY, "400 API key not valid")
    ]
    assert list(listed.provider_health) == []


async def test_rate_limit_cools_down_one_model_until_retry_after(harness: Harness) -> None:
    [key1] = await setup_keys(harness, 1)
    watcher = await watching(harness)
    before = time.time()
    limited = outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=30, reason="429 rate limited")
    assert await report(harness, [limited]) == 1
    [change] = await health_changes(watcher)
    health = change.key_health
    assert (health.key_id, health.model, health.state) == (key1, MODEL, rpb.HEALTH_STATE_COOLDOWN)
    until = health.until.ToNanoseconds() / 1e9
    assert before + 30 - 1 <= until <= time.time() + 30 + 1
    assert health.reason == "429 rate limited"

    # Never key-wide: another model of the same key is not mentioned anywhere.
    listed = await get_health(harness)
    assert [(h.key_id, h.model, h.state) for h in listed.key_health] == [(key1, MODEL, rpb.HEALTH_STATE_COOLDOWN)]
    assert listed.key_health[0].until == health.until


async def test_provider_health_counts_only_end_to_end_failures(harness: Harness) -> None:
    key1, key2 = await setup_keys(harness)
    # Same-provider recovery: key 1 failed, a later attempt on key 2 recovered.
    recovered = [
        outcome(key1, C.OUTCOME_CLASS_UPSTREAM_ERROR, status=502, recovered=True, reason="502 bad gateway")
        for _ in range(5)
    ]
    successes = [outcome(key2, C.OUTCOME_CLASS_SUCCESS, status=200, provider_final=True) for _ in range(5)]
    assert await report(harness, recovered, successes) == 10
    listed = await get_health(harness)
    assert list(listed.provider_health) == []
    # Key 1 itself is penalised for that model (threshold 3 in the window).
    assert [(h.key_id, h.model, h.state) for h in listed.key_health] == [(key1, MODEL, rpb.HEALTH_STATE_COOLDOWN)]

    # Every attempt on the provider failed, request after request: provider degraded for that model.
    watcher = await watching(harness)
    final = [
        outcome(key2, C.OUTCOME_CLASS_UPSTREAM_ERROR, status=503, provider_final=True, reason="503 unavailable")
        for _ in range(3)
    ]
    assert await report(harness, final) == 3
    changes: list[spb.Change] = []
    async with asyncio.timeout(2.0):
        while not any(c.HasField("provider_health") for c in changes):
            changes += await health_changes(watcher, within=2.0)
    [provider] = [c.provider_health for c in changes if c.HasField("provider_health")]
    assert (provider.provider, provider.model, provider.state) == (
        rpb.PROVIDER_OPENAI,
        MODEL,
        rpb.HEALTH_STATE_DEGRADED,
    )
    assert provider.HasField("until") and provider.until.ToNanoseconds() / 1e9 > time.time()
    listed = await get_health(harness)
    assert [(h.provider, h.model, h.state) for h in listed.provider_health] == [
        (rpb.PROVIDER_OPENAI, MODEL, rpb.HEALTH_STATE_DEGRADED)
    ]
    state = await snapshot_of(harness)
    assert [(h.provider, h.model) for h in state.provider_health] == [(rpb.PROVIDER_OPENAI, MODEL)]


async def test_client_errors_change_nothing(harness: Harness) -> None:
    [key1] = await setup_keys(harness, 1)
    version = await harness.latest_version()
    bad = [
        outcome(key1, C.OUTCOME_CLASS_CLIENT_ERROR, status=400, provider_final=True, reason="400 context_length")
        for _ in range(20)
    ]
    assert await report(harness, bad) == 20
    assert await harness.latest_version() == version
    listed = await get_health(harness)
    assert list(listed.key_health) == [] and list(listed.provider_health) == []


async def test_outcomes_outside_the_token_scope_or_invalid_are_skipped(harness: Harness) -> None:
    [key1] = await setup_keys(harness, 1)
    await harness.tenant("globex")
    globex_key = (await harness.key(tenant="globex", label="g", secret="sk-globex-secret-0123456789")).id
    version = await harness.latest_version()
    batch = [
        credential(globex_key, tenant="globex"),  # the acme-only token may not report for globex
        outcome(key1, C.OUTCOME_CLASS_UNSPECIFIED),  # no class
        outcome(key1, C.OUTCOME_CLASS_CREDENTIAL, provider=rpb.PROVIDER_UNSPECIFIED),  # no provider
        outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, model=""),  # no model
        credential("pk_no_such_key"),  # unknown key
        credential(key1, provider=rpb.PROVIDER_ANTHROPIC),  # not the key's provider
        credential(key1, tenant="nosuchtenant"),  # out of scope for this token anyway
        outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200),  # the one valid outcome
    ]
    assert await report(harness, batch, metadata=SIDECAR_ACME_MD) == 1
    stats = harness.plane.aggregator.stats
    assert (stats.out_of_scope, stats.invalid, stats.unknown, stats.accepted) == (2, 3, 2, 1)
    assert await harness.latest_version() == version
    assert list((await get_health(harness, "globex")).key_health) == []

    # The all-tenants token may report for globex; a wrong token may not report at all.
    assert await report(harness, [credential(globex_key, tenant="globex")]) == 1
    assert [h.key_id for h in (await get_health(harness, "globex")).key_health] == [globex_key]
    with pytest.raises(aio.AioRpcError) as info:
        await report(harness, [credential(key1)], metadata=(("authorization", "Bearer nope"),))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_reset_and_reenable_and_rotate_clear_health(harness: Harness) -> None:
    key1, _ = await setup_keys(harness)
    watcher = await watching(harness)

    async def break_key() -> None:
        limited = outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=60, model=OTHER_MODEL)
        assert await report(harness, [credential(key1), limited]) == 2
        seen: list[spb.Change] = []
        async with asyncio.timeout(2.0):
            while len(seen) < 2:
                seen += await health_changes(watcher)
        assert {(c.key_health.model, c.key_health.state) for c in seen} == {
            ("", rpb.HEALTH_STATE_UNHEALTHY),
            (OTHER_MODEL, rpb.HEALTH_STATE_COOLDOWN),
        }
        assert len((await get_health(harness)).key_health) == 2

    async def expect_healthy(extra: frozenset[str] = frozenset()) -> None:
        seen: list[spb.Change] = []
        async with asyncio.timeout(2.0):
            while len([c for c in seen if c.HasField("key_health")]) < 2:
                seen += await health_changes(watcher)
        health = [c.key_health for c in seen if c.HasField("key_health")]
        assert {(h.key_id, h.model, h.state) for h in health} == {
            (key1, "", rpb.HEALTH_STATE_HEALTHY),
            (key1, OTHER_MODEL, rpb.HEALTH_STATE_HEALTHY),
        }
        assert {c.WhichOneof("change") for c in seen} <= {"key_health", *extra}
        assert list((await get_health(harness)).key_health) == []
        assert list((await snapshot_of(harness)).key_health) == []

    # Reset.
    await break_key()
    await harness.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key1), metadata=ADMIN_MD)
    await expect_healthy()

    # The books forgot too: the same failure is a new transition again. Then re-enable.
    await break_key()
    await harness.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key1,
            key=rpb.ProviderKey(status=rpb.KEY_STATUS_ACTIVE),
            update_mask=FieldMask(paths=["status"]),
        ),
        metadata=ADMIN_MD,
    )
    await expect_healthy(frozenset({"key_put"}))

    # Rotation.
    await break_key()
    await harness.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(tenant="acme", id=key1, new_secret="sk-acme-rotated-secret-0123456789"),
        metadata=ADMIN_MD,
    )
    await expect_healthy(frozenset({"key_put"}))

    # A label change does not touch health.
    await break_key()
    await harness.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme", id=key1, key=rpb.ProviderKey(label="renamed"), update_mask=FieldMask(paths=["label"])
        ),
        metadata=ADMIN_MD,
    )
    assert [c.WhichOneof("change") for c in await health_changes(watcher)] == ["key_put"]
    assert len((await get_health(harness)).key_health) == 2

    with pytest.raises(aio.AioRpcError) as info:
        await harness.admin.ResetKeyHealth(
            apb.ResetKeyHealthRequest(tenant="acme", key_id="pk_missing"), metadata=ADMIN_MD
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as info:
        await get_health(harness, "nosuchtenant")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_reset_is_published_even_when_nothing_was_stored(harness: Harness) -> None:
    """A sidecar may hold findings the control plane never heard of (a report
    that never arrived): a reset always sends the key-wide HEALTHY that makes
    every sidecar forget the key, whatever the store held."""
    key1, _ = await setup_keys(harness)
    watcher = await watching(harness)

    # Nothing stored for the key.
    await harness.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key1), metadata=ADMIN_MD)
    [change] = await health_changes(watcher)
    assert (change.key_health.key_id, change.key_health.model, change.key_health.state) == (
        key1,
        "",
        rpb.HEALTH_STATE_HEALTHY,
    )
    assert list((await get_health(harness)).key_health) == []

    # Only a per-model cooldown stored: the key-wide reset comes too (first).
    limited = outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=60)
    assert await report(harness, [limited]) == 1
    [change] = await health_changes(watcher)
    assert (change.key_health.model, change.key_health.state) == (MODEL, rpb.HEALTH_STATE_COOLDOWN)
    await harness.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key1), metadata=ADMIN_MD)
    seen: list[spb.Change] = []
    async with asyncio.timeout(2.0):
        while len(seen) < 2:
            seen += await health_changes(watcher)
    assert [(c.key_health.key_id, c.key_health.model, c.key_health.state) for c in seen] == [
        (key1, "", rpb.HEALTH_STATE_HEALTHY),
        (key1, MODEL, rpb.HEALTH_STATE_HEALTHY),
    ]
    assert list((await get_health(harness)).key_health) == []
    assert harness.plane.aggregator.verdicts("acme") == []

    # A sidecar resuming from before the reset gets it too (from the ring).
    resumed = harness.watch(("acme",), resume_version=seen[0].version - 1, sidecar_id="sc-resumed")
    message = await next_message(resumed)
    assert message.WhichOneof("payload") == "delta"
    assert [(c.key_health.key_id, c.key_health.model) for c in message.delta.changes] == [(key1, ""), (key1, MODEL)]


async def test_deleting_a_key_drops_its_health(harness: Harness) -> None:
    key1, key2 = await setup_keys(harness)
    assert await report(harness, [credential(key1), credential(key2)]) == 2
    await harness.admin.DeleteProviderKey(apb.DeleteProviderKeyRequest(tenant="acme", id=key1), metadata=ADMIN_MD)
    assert [h.key_id for h in (await get_health(harness)).key_health] == [key2]
    assert [h.key_id for h in (await snapshot_of(harness)).key_health] == [key2]


async def test_health_survives_a_restart(make_harness: HarnessFactory, tmp_path: Path) -> None:
    master_key = b"k" * 32
    first = await make_harness(master_key=master_key)
    key1, key2 = await setup_keys(first)
    limited = outcome(key2, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=120, reason="429 rate limited")
    assert await report(first, [credential(key1), limited]) == 2
    before = await get_health(first)
    await first.channel.close(grace=None)
    await first.plane.stop(grace=0.1)

    second = await make_harness(master_key=master_key)
    after = await get_health(second)
    assert list(after.key_health) == list(before.key_health)
    assert {(h.key_id, h.model) for h in after.key_health} == {(key1, ""), (key2, MODEL)}
    assert len((await snapshot_of(second)).key_health) == 2

    # The restarted books know: the same findings are no transitions.
    version = await second.latest_version()
    shorter = outcome(key2, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=60, reason="429 rate limited")
    assert await report(second, [credential(key1), shorter]) == 2
    assert await second.latest_version() == version
    # And a reset still works after the restart.
    await second.admin.ResetKeyHealth(apb.ResetKeyHealthRequest(tenant="acme", key_id=key1), metadata=ADMIN_MD)
    assert [h.key_id for h in (await get_health(second)).key_health] == [key2]


async def test_store_trouble_keeps_health_in_memory_and_retries(make_harness: HarnessFactory, tmp_path: Path) -> None:
    harness = await make_harness(health_retry_interval=0.1)
    key1, _ = await setup_keys(harness)
    watcher = await watching(harness)
    aggregator = harness.plane.aggregator
    version = await harness.latest_version()

    # Another process holds the write lock: writes fail with "database is locked".
    blocker = sqlite3.connect(tmp_path / "keyplane.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        assert await report(harness, [credential(key1)]) == 1  # the report itself succeeds
        assert aggregator.pending == 1
        assert aggregator.stats.persist_failures >= 1
        assert [c.verdict.state.value for c in aggregator.verdicts("acme")] == ["unhealthy"]
        assert await harness.latest_version() == version
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The retry persists and publishes it.
    [change] = await health_changes(watcher, within=10.0)
    assert (change.key_health.key_id, change.key_health.state) == (key1, rpb.HEALTH_STATE_UNHEALTHY)
    assert aggregator.pending == 0


async def test_list_sidecars(harness: Harness) -> None:
    await harness.tenant("acme")
    assert list((await harness.admin.ListSidecars(apb.ListSidecarsRequest(), metadata=ADMIN_MD)).sidecars) == []
    call = harness.watch(("acme",), metadata=SIDECAR_ACME_MD, sidecar_id="sc-pod-7")
    first = await next_message(call)
    everything = harness.watch(sidecar_id="sc-all")
    await next_message(everything)
    sidecars = (await harness.admin.ListSidecars(apb.ListSidecarsRequest(), metadata=ADMIN_MD)).sidecars
    assert [(s.sidecar_id, list(s.tenants), s.all_tenants, s.version) for s in sidecars] == [
        ("sc-pod-7", ["acme"], False, first.version),
        ("sc-all", [], True, first.version),
    ]
    # --json shows it too (an empty list alone would vanish from the JSON).
    as_json = [MessageToDict(s, preserving_proto_field_name=True) for s in sidecars]
    assert [(d.get("tenants"), d.get("all_tenants")) for d in as_json] == [(["acme"], None), (None, True)]
    assert all(s.peer and s.connect_time.seconds > 0 for s in sidecars)
    call.cancel()
    everything.cancel()
    for _ in range(100):  # the server notices the cancellations shortly
        if not (await harness.admin.ListSidecars(apb.ListSidecarsRequest(), metadata=ADMIN_MD)).sidecars:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("cancelled watch streams are still listed")


async def test_repeated_successes_are_counted_validated_and_still_clear_a_cooldown(harness: Harness) -> None:
    """Look-alike successes are converted once and reused: every one is still
    validated, scoped and counted, and one arriving after a failure still resets it."""
    [key1] = await setup_keys(harness, 1)
    ok = outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200, provider_final=True, reason="200 ok")
    invalid = [
        outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200, model=""),  # no model
        outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200, provider=rpb.PROVIDER_UNSPECIFIED),  # no provider
    ]
    unknown = outcome("pk_no_such_key", C.OUTCOME_CLASS_SUCCESS, status=200)
    batch = [ok, ok, ok, *invalid, unknown]
    assert await report(harness, batch, batch) == 6
    stats = harness.plane.aggregator.stats
    assert (stats.invalid, stats.unknown, stats.accepted) == (4, 2, 6)

    limited = outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=60.0)
    assert await report(harness, [limited]) == 1
    [cooling] = (await get_health(harness)).key_health
    assert cooling.state == rpb.HEALTH_STATE_COOLDOWN
    assert await report(harness, [ok]) == 1  # the reused success clears the cooldown
    assert list((await get_health(harness)).key_health) == []


async def test_a_success_that_began_before_the_429_leaves_the_cooldown(harness: Harness) -> None:
    """Two sidecars on one key: one's request started before the other's 429 and
    succeeded after it. Its success must not end the cooldown Retry-After asked for;
    a success that began after the 429 was learnt does end it."""
    [key1] = await setup_keys(harness, 1)
    before = time.time() - 0.5
    limited = outcome(key1, C.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=60.0, started=before + 0.1)
    assert await report(harness, [limited]) == 1
    [cooling] = (await get_health(harness)).key_health
    assert cooling.state == rpb.HEALTH_STATE_COOLDOWN
    call = await watching(harness)
    try:
        stale = outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200, provider_final=True, started=before)
        assert await report(harness, [stale, stale]) == 2
        [still] = (await get_health(harness)).key_health
        assert still.state == rpb.HEALTH_STATE_COOLDOWN
        fresh = outcome(key1, C.OUTCOME_CLASS_SUCCESS, status=200, provider_final=True, started=time.time())
        assert await report(harness, [fresh]) == 1
        assert list((await get_health(harness)).key_health) == []
        # The watchers heard only the end of the cooldown, not a flap.
        [change] = await health_changes(call)
        assert change.WhichOneof("change") == "key_health"
        assert change.key_health.state == rpb.HEALTH_STATE_HEALTHY
    finally:
        call.cancel()
