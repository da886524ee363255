from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from keyplane.v1 import sidecar_service_pb2
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from . import protos as p
from .plane import Plane

TENANT = "acme"
CLIENT_TOKEN = "kp-acme-client-token-0123456789"
OTHER_TENANT = "globex"
OTHER_TOKEN = "kp-globex-client-token-9876543210"
PUBLIC_MODEL = "gpt-4o-mini"
UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"


def sidecar_config(**overrides: object) -> SidecarConfig:
    values: dict[str, object] = {
        "control_plane_target": "127.0.0.1:9",
        "sidecar_token": "sidecar-token-not-used",
        "port": 0,
        "sidecar_id": "test-sidecar",
        "upstream_connect_timeout": 2.0,
        "upstream_read_timeout": 10.0,
        "request_timeout": 30.0,
        "shutdown_grace": 2.0,
    }
    values.update(overrides)
    return SidecarConfig(**values)  # type: ignore[arg-type]


def standard_snapshot(
    upstream: FakeUpstream, *, version: int = 10, secrets: tuple[str, ...] = ("sk-one",)
) -> sidecar_service_pb2.WatchResponse:
    keys = [p.pkey(f"k{i + 1}", secret, base_url=upstream.base_url) for i, secret in enumerate(secrets)]
    return p.snapshot(
        version,
        p.tenant_state(
            TENANT,
            keys=keys,
            routes=[p.route("r1", PUBLIC_MODEL, p.target(UPSTREAM_MODEL))],
            client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
        ),
        p.tenant_state(
            OTHER_TENANT,
            keys=[p.pkey("g1", "sk-globex", base_url=upstream.base_url)],
            routes=[p.route("gr1", "globex-model", p.target("gpt-4o"))],
            client_keys=[p.client_key("gck1", OTHER_TOKEN)],
        ),
    )


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    async with Sidecar(sidecar_config(), watch=False) as sc:
        yield sc


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sidecar.url, timeout=20.0) as c:
        yield c


def auth(token: str = CLIENT_TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
async def plane(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[Plane]:
    """A real control plane on a fixed port, stopped after the test."""
    p = Plane(tmp_path, unused_tcp_port)
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def fleet() -> AsyncIterator[object]:
    """The endpoint tests' sidecar and fake upstreams (``endpoint_fleet.Fleet``)."""
    from .endpoint_fleet import open_fleet

    async with open_fleet() as f:
        yield f
