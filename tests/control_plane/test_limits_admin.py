"""Limits through the admin API and leases over StreamQuota, on a real
control plane over a gRPC socket; and ``keyplane limits`` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import limits_pb2 as lpb
from tests.control_plane.conftest import ADMIN_MD, SIDECAR_ACME_MD, Harness, HarnessFactory, rpc_error
from tests.control_plane.test_health_cli import keyplane

REQUESTS = lpb.QUOTA_KIND_REQUESTS


@pytest.fixture
async def quick(make_harness: HarnessFactory) -> Harness:
    """Leases rebalanced every 0.2 s, per-minute limits counted per 6 s."""
    return await make_harness(quota_window=6.0, quota_rebalance_interval=0.2)


async def _client_key(harness: Harness) -> str:
    await harness.tenant()
    created = await harness.admin.CreateClientKey(
        apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD
    )
    return created.client_key.id


async def _set(harness: Harness, **fields: object) -> lpb.SetLimitsResponse:
    request = lpb.SetLimitsRequest(limits=lpb.Limits(**fields))  # type: ignore[arg-type]
    response: lpb.SetLimitsResponse = await harness.admin.SetLimits(request, metadata=ADMIN_MD)
    return response


async def test_set_get_list_clear_with_what_is_left(quick: Harness) -> None:
    ck = await _client_key(quick)
    assert (await quick.admin.ListLimits(lpb.ListLimitsRequest(tenant="acme"), metadata=ADMIN_MD)).statuses == []
    await _set(quick, tenant="acme", client_key_id=ck, requests_per_minute=600)
    await _set(quick, tenant="acme", requests_per_minute=6000)
    got = await quick.admin.GetLimits(lpb.GetLimitsRequest(tenant="acme", client_key_id=ck), metadata=ADMIN_MD)
    assert got.status.limits.requests_per_minute == 600
    [usage] = got.status.usage
    # 600 per minute counted per 6 s window: 60 per window, none used yet.
    assert (usage.kind, usage.limit, usage.used, usage.remaining, usage.window_seconds) == (REQUESTS, 60, 0, 60, 6)
    listed = await quick.admin.ListLimits(lpb.ListLimitsRequest(tenant="acme"), metadata=ADMIN_MD)
    assert [(s.limits.client_key_id, s.limits.requests_per_minute) for s in listed.statuses] == [("", 6000), (ck, 600)]
    await quick.admin.ClearLimits(lpb.ClearLimitsRequest(tenant="acme", client_key_id=ck), metadata=ADMIN_MD)
    got = await quick.admin.GetLimits(lpb.GetLimitsRequest(tenant="acme", client_key_id=ck), metadata=ADMIN_MD)
    assert got.status.limits.requests_per_minute == 0 and not got.status.usage
    events = await quick.admin.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=ADMIN_MD)
    methods = [e.method for e in events.events]
    assert methods.count("SetLimits") == 2 and methods.count("ClearLimits") == 1


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        (
            {"tenant": "acme", "client_key_id": "ck_nope", "requests_per_minute": 1},
            grpc.StatusCode.NOT_FOUND,
            "ck_nope",
        ),
        ({"tenant": "nope", "requests_per_minute": 1}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"tenant": "Bad Name", "requests_per_minute": 1}, grpc.StatusCode.INVALID_ARGUMENT, "tenant"),
        ({"tenant": "acme", "requests_per_minute": 2**63}, grpc.StatusCode.INVALID_ARGUMENT, "at most"),
    ],
)
async def test_bad_limits_are_refused_and_nothing_is_written(
    harness: Harness, fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    await harness.tenant()
    with pytest.raises(aio.AioRpcError) as exc_info:
        await _set(harness, **fields)
    got_code, details = rpc_error(exc_info)
    assert got_code == code and needle in details
    assert (await harness.admin.ListLimits(lpb.ListLimitsRequest(tenant="acme"), metadata=ADMIN_MD)).statuses == []


class QuotaStream:
    """A StreamQuota call driven by hand: ``send`` reports, ``next`` leases."""

    def __init__(self, harness: Harness, sidecar_id: str, tenants: tuple[str, ...] = ("acme",)) -> None:
        self.queue: asyncio.Queue[lpb.StreamQuotaRequest | None] = asyncio.Queue()
        self.queue.put_nowait(lpb.StreamQuotaRequest(sidecar_id=sidecar_id, tenants=list(tenants)))
        self.call = harness.sidecar.StreamQuota(self._requests(), metadata=SIDECAR_ACME_MD)

    async def _requests(self) -> AsyncIterator[lpb.StreamQuotaRequest]:
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, *usage: lpb.QuotaUsage) -> None:
        self.queue.put_nowait(lpb.StreamQuotaRequest(usage=usage))

    async def next(self) -> lpb.StreamQuotaResponse:
        response = await asyncio.wait_for(self.call.read(), 3.0)
        assert isinstance(response, lpb.StreamQuotaResponse), response
        return response

    def close(self) -> None:
        self.queue.put_nowait(None)
        self.call.cancel()


async def test_leases_split_the_limit_by_demand_and_reports_show_in_what_is_left(quick: Harness) -> None:
    ck = await _client_key(quick)
    await _set(quick, tenant="acme", client_key_id=ck, requests_per_minute=600)  # 60 per 6 s
    a, b = QuotaStream(quick, "pod-a"), QuotaStream(quick, "pod-b")
    try:
        first = await a.next()
        [lease] = first.leases
        assert first.complete and lease.bucket == lpb.QuotaBucket(tenant="acme", client_key_id=ck, kind=REQUESTS)
        assert (lease.limit, lease.window_ms) == (60, 6000) and lease.window_start_ms % 6000 == 0
        bucket = lease.bucket
        # pod-a asks nine times as much as pod-b: after a few reports its fallback share is larger.
        for _ in range(6):
            ra, rb = (await a.next()).leases[0], (await b.next()).leases[0]
            a.send(
                lpb.QuotaUsage(bucket=bucket, window_start_ms=ra.window_start_ms, used=min(ra.granted, 9), demanded=9)
            )
            b.send(
                lpb.QuotaUsage(bucket=bucket, window_start_ms=rb.window_start_ms, used=min(rb.granted, 1), demanded=1)
            )
        la, lb = (await a.next()).leases[0], (await b.next()).leases[0]
        assert la.fallback + lb.fallback == 60
        assert la.fallback > 3 * lb.fallback
        assert la.granted + lb.granted <= 60
        # What the sidecars report shows as used and left (retried if the window turns meanwhile).
        for _ in range(3):
            now_ms = time.time_ns() // 1_000_000
            window = now_ms - now_ms % 6000
            a.send(lpb.QuotaUsage(bucket=bucket, window_start_ms=window, used=30))
            b.send(lpb.QuotaUsage(bucket=bucket, window_start_ms=window, used=12))
            await asyncio.sleep(0.1)
            request = lpb.GetLimitsRequest(tenant="acme", client_key_id=ck)
            [usage] = (await quick.admin.GetLimits(request, metadata=ADMIN_MD)).status.usage
            if usage.window_start.ToMilliseconds() == window:
                assert (usage.used, usage.remaining) == (42, 18)
                break
        else:
            pytest.fail("no report landed in the window it was for")
        # Cleared: the next complete set leaves the bucket out.
        await quick.admin.ClearLimits(lpb.ClearLimitsRequest(tenant="acme", client_key_id=ck), metadata=ADMIN_MD)
        for _ in range(3):
            if not (await a.next()).leases:
                break
        else:
            pytest.fail("the cleared limit is still leased")
    finally:
        a.close()
        b.close()


async def test_a_quota_stream_needs_an_id_and_sees_only_its_tenants(quick: Harness) -> None:
    await _client_key(quick)
    nameless = QuotaStream(quick, "")
    with pytest.raises(aio.AioRpcError) as exc_info:
        await nameless.next()
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    other = QuotaStream(quick, "pod-x", tenants=("globex",))
    with pytest.raises(aio.AioRpcError) as exc_info:
        await other.next()
    assert exc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_keyplane_limits_set_show_clear(quick: Harness, tmp_path: Path) -> None:
    ck = await _client_key(quick)
    text = await keyplane(quick, tmp_path, "limits", "set", "-t", "acme", "-k", ck, "--rpm", "1200")
    assert ck in text and "requests/min" in text
    shown = await keyplane(quick, tmp_path, "limits", "show", "-t", "acme", "-k", ck)
    header, row = shown.splitlines()
    assert header.split()[:6] == ["CLIENT", "KEY", "LIMIT", "PER", "WINDOW", "USED"]
    assert row.split()[:5] == [ck, "requests/min", "120", "0", "120"]
    data = json.loads(await keyplane(quick, tmp_path, "limits", "show", "-t", "acme", "--all", "-o", "json"))
    assert data["statuses"][0]["limits"]["requests_per_minute"] == "1200"
    assert data["statuses"][0]["usage"][0]["remaining"] == "120"
    # keyplane usage show with a tenant adds its limits with what is left.
    usage_text = await keyplane(quick, tmp_path, "usage", "show", "-t", "acme")
    [limit_row] = [line for line in usage_text.splitlines() if line.startswith(ck)]
    assert limit_row.split()[:5] == [ck, "requests/min", "120", "0", "120"]
    usage_data = json.loads(await keyplane(quick, tmp_path, "usage", "show", "-t", "acme", "-o", "json"))
    assert usage_data["limits"][0]["usage"][0]["remaining"] == "120"
    assert "cleared" in await keyplane(quick, tmp_path, "limits", "clear", "-t", "acme", "-k", ck)
    assert "(no limits)" in await keyplane(quick, tmp_path, "limits", "show", "-t", "acme", "--all")
