"""``--wait`` through the real CLI against a real control plane (SQLite):
a stream that never acknowledges makes the wait time out and is named
(NOT ACKED); ``keyplane apply --wait`` waits for every tenant it wrote;
the Ack RPC refuses what it cannot record."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio

from keyplane.v1 import sidecar_service_pb2 as spb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.control_plane.conftest import SIDECAR_ACME, SIDECAR_ACME_MD, SIDECAR_ALL_MD, Harness, next_message
from tests.control_plane.test_convergence_replicas import keyplane

CONFIG = """
version: 1
tenants:
  - name: acme
    routes:
      - model: chat
        targets: ["openai:gpt-4o"]
    client_keys: [app]
"""


async def test_a_stream_that_never_acknowledges_times_the_wait_out(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant()
    await harness.key()
    silent = harness.watch(("acme",), metadata=SIDECAR_ACME_MD, sidecar_id="silent-sidecar")
    first = await next_message(silent)
    await asyncio.sleep(0.2)  # the replica records what it sent (50 ms batches)

    code, out, err = await keyplane(harness.plane.address, tmp_path, "proxy-status", "-o", "json")
    assert code == 0, err
    [status] = json.loads(out)["sidecars"]
    assert (status["sidecar_id"], status["state"]) == ("silent-sidecar", "NOT ACKED")
    assert (status["sent_version"], status["applied_version"]) == (first.version, 0)

    started = time.monotonic()
    code, out, err = await keyplane(
        harness.plane.address, tmp_path, "client-keys", "create", "-t", "acme", "-l", "app", "--wait", "1"
    )
    took = time.monotonic() - started
    print(f"\n--wait 1 against a silent sidecar returned after {took:.2f}s (CLI round trip)")
    assert code == 3, err
    assert "token (shown once" in out  # the write itself happened and is reported first
    assert "0 of 1 sidecars of tenant acme applied version" in out
    assert "not within 1s" in out
    assert "silent-sidecar (replica " in out and "NOT ACKED, applied 0" in out
    assert took >= 1.0

    # Once the stream acknowledges what it got, it counts as applied.
    latest = await next_message(silent)
    await harness.sidecar.Ack(
        spb.AckRequest(sidecar_id="silent-sidecar", applied_version=latest.version), metadata=SIDECAR_ACME_MD
    )
    code, out, err = await keyplane(harness.plane.address, tmp_path, "proxy-status")
    assert code == 0, err
    assert out.splitlines()[1].split()[:4] == ["silent-sidecar", harness.plane.fleet.replica, "acme", "SYNCED"]


async def test_apply_waits_for_every_tenant_it_wrote(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant()
    (tmp_path / "keyplane.yaml").write_text(CONFIG)
    config = SidecarConfig(
        control_plane_target=harness.plane.address,
        sidecar_token=SIDECAR_ACME,
        tenants=("acme",),
        port=0,
        sidecar_id="pod-1",
        report_outcomes=False,
    )
    async with Sidecar(config) as sc:
        assert await sc.wait_ready(10)
        code, out, err = await keyplane(
            harness.plane.address, tmp_path, "apply", "-f", str(tmp_path / "keyplane.yaml"), "--wait", "10"
        )
        assert code == 0, err
        assert "1 of 1 sidecars of tenant acme applied version" in out
        assert sc.state.route("acme", "chat") is not None


async def test_ack_refuses_what_it_cannot_record(harness: Harness) -> None:
    with pytest.raises(aio.AioRpcError) as info:
        await harness.sidecar.Ack(spb.AckRequest(applied_version=3), metadata=SIDECAR_ACME_MD)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as info:
        await harness.sidecar.Ack(spb.AckRequest(sidecar_id="x", applied_version=3))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_acknowledges_only_for_sidecars_within_its_scope(harness: Harness) -> None:
    """One tenant's sidecar token cannot overwrite the status of a sidecar that
    watches tenants outside its scope, nor invent a sidecar id."""
    await harness.tenant()
    everything = harness.watch((), metadata=SIDECAR_ALL_MD, sidecar_id="all-tenants")
    first = await next_message(everything)
    with pytest.raises(aio.AioRpcError) as info:
        await harness.sidecar.Ack(
            spb.AckRequest(sidecar_id="all-tenants", rejected_version=first.version + 1, error_detail="spoofed"),
            metadata=SIDECAR_ACME_MD,
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(aio.AioRpcError) as info:
        await harness.sidecar.Ack(spb.AckRequest(sidecar_id="nobody", applied_version=1), metadata=SIDECAR_ACME_MD)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # The stream's own (all-tenant) token may, and an acme-only stream takes acme's acks.
    await harness.sidecar.Ack(
        spb.AckRequest(sidecar_id="all-tenants", applied_version=first.version), metadata=SIDECAR_ALL_MD
    )
    acme = harness.watch(("acme",), metadata=SIDECAR_ACME_MD, sidecar_id="acme-only")
    latest = await next_message(acme)
    await harness.sidecar.Ack(
        spb.AckRequest(sidecar_id="acme-only", applied_version=latest.version), metadata=SIDECAR_ACME_MD
    )
    await harness.plane.fleet.flush()
    states = {r.sidecar_id: r for r in await harness.plane.fleet.records()}
    assert states["all-tenants"].rejected_version == 0 and states["all-tenants"].error_detail == ""
    assert states["acme-only"].applied_version == latest.version
