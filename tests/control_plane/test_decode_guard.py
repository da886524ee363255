"""Request bytes that are not the method's request message: INVALID_ARGUMENT
(never UNKNOWN), for unary admin calls, the Watch stream's request and a
message in the middle of a ReportOutcomes stream; the server keeps serving.
Raw bytes go over a real socket through generic (serializer-less) calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import ADMIN_MD, SIDECAR_ALL_MD, Harness, next_message
from tests.control_plane.test_health import credential, get_health, setup_keys

GARBAGE = (
    b"\xff\xff\xff\xff",  # field number 0x1fffffff... with wire type 7 (no such type)
    b"\x0a\x05ab",  # a length-delimited field longer than what follows
    b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80",  # a varint longer than 10 bytes
)
ADMIN = "/keyplane.v1.AdminService/"
SIDECAR = "/keyplane.v1.SidecarService/"


async def unary_raw(harness: Harness, method: str, data: bytes, metadata: tuple[tuple[str, str], ...]) -> bytes:
    call = harness.channel.unary_unary(method, None, None)  # no serializers: bytes go out as they are
    response = await call(data, metadata=metadata, timeout=5)
    assert isinstance(response, bytes)
    return response


async def assert_still_serving(harness: Harness) -> None:
    response = await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=ADMIN_MD)
    assert isinstance(response, apb.ListTenantsResponse)


@pytest.mark.parametrize("data", GARBAGE)
@pytest.mark.parametrize("method", ["CreateTenant", "ListProviderKeys", "UpdateProviderKey", "GetHealth"])
async def test_garbage_to_an_admin_rpc_is_invalid_argument(harness: Harness, method: str, data: bytes) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await unary_raw(harness, ADMIN + method, data, ADMIN_MD)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details() == f"the request is not a valid keyplane.v1.{method}Request message"
    await assert_still_serving(harness)


async def test_a_valid_raw_request_still_works(harness: Harness) -> None:
    request = apb.CreateTenantRequest(name="acme").SerializeToString()
    raw = await unary_raw(harness, ADMIN + "CreateTenant", request, ADMIN_MD)
    assert apb.CreateTenantResponse.FromString(raw).tenant.name == "acme"


async def test_authentication_is_checked_before_decoding(harness: Harness) -> None:
    for method, metadata in ((ADMIN + "CreateTenant", ()), (ADMIN + "CreateTenant", SIDECAR_ALL_MD)):
        with pytest.raises(aio.AioRpcError) as info:
            await unary_raw(harness, method, GARBAGE[0], metadata)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("data", GARBAGE)
async def test_garbage_watch_request_is_invalid_argument(harness: Harness, data: bytes) -> None:
    call = harness.channel.unary_stream(SIDECAR + "Watch", None, None)(data, metadata=SIDECAR_ALL_MD, timeout=5)
    with pytest.raises(aio.AioRpcError) as info:
        async for _ in call:
            pytest.fail("a garbage Watch request got a response")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details() == "the request is not a valid keyplane.v1.WatchRequest message"
    # A real watch still gets its snapshot.
    assert (await next_message(harness.watch())).WhichOneof("payload") == "snapshot"


async def test_garbage_mid_report_stream_is_invalid_argument(harness: Harness) -> None:
    [key, _] = await setup_keys(harness)
    valid = spb.ReportOutcomesRequest(outcomes=[credential(key)], sidecar_id="sc-raw").SerializeToString()

    async def messages() -> AsyncIterator[bytes]:
        yield valid
        yield GARBAGE[1]
        yield valid  # never read

    call = harness.channel.stream_unary(SIDECAR + "ReportOutcomes", None, None)(
        messages(), metadata=SIDECAR_ALL_MD, timeout=5
    )
    with pytest.raises(aio.AioRpcError) as info:
        await call
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details() == "the request is not a valid keyplane.v1.ReportOutcomesRequest message"
    # The batch before the garbage was taken: the key is credential-failed.
    async with asyncio.timeout(2):
        while True:
            listed = (await get_health(harness)).key_health
            if listed:
                break
            await asyncio.sleep(0.02)
    assert [h.key_id for h in listed] == [key]
    # And a well-formed stream is still accepted.
    report = harness.sidecar.ReportOutcomes(None, metadata=SIDECAR_ALL_MD)
    await report.write(spb.ReportOutcomesRequest(outcomes=[credential(key)], sidecar_id="sc-raw"))
    await report.done_writing()
    assert (await asyncio.wait_for(report, 5)).accepted == 1
