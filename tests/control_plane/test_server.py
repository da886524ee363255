"""ControlPlane assembly: health, reflection, config, lifecycle."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_plane.config import ControlPlaneConfig, redact_url
from control_plane.server import ControlPlane, ListenError
from keyplane.v1 import admin_service_pb2 as apb
from tests.control_plane.conftest import (
    ADMIN_MD,
    ADMIN_TOKEN,
    SIDECAR_ALL,
    Harness,
    HarnessFactory,
    make_config,
    next_message,
)


async def test_health_is_open_and_serving(harness: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "keyplane.v1.AdminService", "keyplane.v1.SidecarService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_services(harness: Harness) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    assert isinstance(response, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in response.list_services_response.service}
    assert {"keyplane.v1.AdminService", "keyplane.v1.SidecarService", "grpc.health.v1.Health"} <= names


async def test_state_survives_a_restart(make_harness: HarnessFactory, tmp_path: Path) -> None:
    key = os.urandom(32)
    first = await make_harness(master_key=key)
    await first.tenant()
    created = await first.key()
    await first.plane.stop()
    second = await make_harness(master_key=key)
    assert second.plane.port != 0
    got = await second.admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert list(got.keys) == [created]
    message = await next_message(second.watch())
    assert message.snapshot.tenants[0].keys[0].id == created.id


async def test_start_fails_cleanly_on_a_taken_port(make_harness: HarnessFactory, tmp_path: Path) -> None:
    running = await make_harness()
    plane = ControlPlane(make_config(tmp_path, listen=running.plane.address, store_url="sqlite:///:memory:"))
    try:
        with pytest.raises(ListenError, match=f"cannot listen on {running.plane.address}"):
            await plane.start()
        with pytest.raises(RuntimeError, match="not started"):
            _ = plane.hub
    finally:
        await plane.stop()


async def test_unknown_method_is_unimplemented(harness: Harness) -> None:
    call = harness.channel.unary_unary("/keyplane.v1.AdminService/Nope", None, None)
    with pytest.raises(aio.AioRpcError) as info:
        await call(b"", metadata=ADMIN_MD)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_config_repr_hides_secrets() -> None:
    config = ControlPlaneConfig(
        store_url="postgresql://kp:pgpassword@db:5432/kp",
        admin_token=ADMIN_TOKEN,
        sidecar_tokens={SIDECAR_ALL: ("*",)},
        master_key=b"M" * 32,
    )
    text = repr(config) + str(config)
    for secret in (ADMIN_TOKEN, SIDECAR_ALL, "pgpassword", "MMMM"):
        assert secret not in text
    assert "postgresql://kp:***@db:5432/kp" in text
    assert config.listen == "127.0.0.1:50051"
    with pytest.raises(ValueError, match="32 bytes"):
        ControlPlaneConfig(store_url="sqlite:///:memory:", admin_token="a", master_key=b"short")
    with pytest.raises(ValueError, match="admin_token"):
        ControlPlaneConfig(store_url="sqlite:///:memory:", admin_token="", master_key=b"M" * 32)
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"
