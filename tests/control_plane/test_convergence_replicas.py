"""Acknowledged convergence across two control-plane replicas on one Postgres
and three real sidecars (real gRPC sockets, the real CLI in a subprocess);
one sidecar serves only OpenAI and rejects a version with a Gemini route.

Proves: every sidecar on every replica is listed by ``keyplane proxy-status``
on either replica (SYNCED / REJECTED with the sidecar's error); a write
returns its version and ``--wait`` / WaitForVersion says at once which
sidecar rejected it; the rejecting sidecar keeps serving what it held (and
holds back later changes that stand on the rejected one); deleting the bad
route lets it apply everything, and ``--wait`` then sees all three converge.

Fails when Postgres is unreachable under CI=true; skips otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
from google.protobuf.duration_pb2 import Duration

from keyplane.domain import Provider
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.control_plane.conftest import ADMIN_MD, ADMIN_TOKEN, SIDECAR_ACME, Harness, HarnessFactory
from tests.control_plane.test_replicas_postgres import pg_url  # noqa: F401  (fixture)

SYNCED, REJECTED = apb.SYNC_STATE_SYNCED, apb.SYNC_STATE_REJECTED


async def keyplane(server: str, home: Path, *args: str) -> tuple[int, str, str]:
    """The real CLI in a subprocess: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")}
    env.update({"KEYPLANE_HOME": str(home), "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyplane_cli",
        *args,
        "--server",
        server,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def states(harness: Harness) -> dict[str, int]:
    resp = await harness.admin.GetProxyStatus(apb.GetProxyStatusRequest(tenant="acme"), metadata=ADMIN_MD)
    return {s.sidecar_id: s.state for s in resp.sidecars}


async def until_states(harness: Harness, wanted: Mapping[str, int], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    seen = await states(harness)
    while seen != wanted:
        assert loop.time() < deadline, f"states {seen}, wanted {wanted}"
        await asyncio.sleep(0.05)
        seen = await states(harness)


def sidecar(harness: Harness, sidecar_id: str, *providers: Provider) -> Sidecar:
    return Sidecar(
        SidecarConfig(
            control_plane_target=harness.plane.address,
            sidecar_token=SIDECAR_ACME,
            tenants=("acme",),
            port=0,
            sidecar_id=sidecar_id,
            providers=providers,
            watch_backoff_cap=0.5,
            report_outcomes=False,
        )
    )


async def models(sc: Sidecar, token: str) -> list[str]:
    async with httpx.AsyncClient(base_url=sc.url) as http:
        r = await http.get("/v1/models", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return sorted(m["id"] for m in r.json()["data"])


async def test_proxy_status_and_wait_with_two_replicas_and_a_rejecting_sidecar(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key, replica_id="cp-one")
    two = await make_harness(store_url=pg_url, master_key=master_key, replica_id="cp-two")
    await one.tenant()
    key = await one.key()
    await one.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="gpt",
            targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")],
        ),
        metadata=ADMIN_MD,
    )
    token = (
        await one.admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    ).token

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(sidecar(one, "sc-a"))
        b = await stack.enter_async_context(sidecar(two, "sc-b"))
        c = await stack.enter_async_context(sidecar(two, "sc-c-openai-only", Provider.OPENAI))
        for sc in (a, b, c):
            assert await sc.wait_ready(10)
        all_synced = {"sc-a": SYNCED, "sc-b": SYNCED, "sc-c-openai-only": SYNCED}
        await until_states(one, all_synced)
        await until_states(two, all_synced)

        # proxy-status on replica one lists the sidecars of both replicas.
        code, out, err = await keyplane(one.plane.address, tmp_path, "proxy-status", "-o", "json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["replica"] == "cp-one"
        listed = {s["sidecar_id"]: s for s in doc["sidecars"]}
        assert {k: (s["replica"], s["state"]) for k, s in listed.items()} == {
            "sc-a": ("cp-one", "SYNCED"),
            "sc-b": ("cp-two", "SYNCED"),
            "sc-c-openai-only": ("cp-two", "SYNCED"),
        }
        assert all(s["applied_version"] >= s["latest_version"] > 0 for s in listed.values())
        held = c.state.version

        # A route to Gemini, written through replica two: sc-c rejects it, and WaitForVersion
        # (asked of replica one) says so at once instead of running out its 10 s.
        created = await two.admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant="acme",
                public_model="gem",
                targets=[rpb.RouteTarget(provider=rpb.PROVIDER_GEMINI, upstream_model="gemini-2.0-flash")],
            ),
            metadata=ADMIN_MD,
        )
        assert created.version > held
        started = time.monotonic()
        waited = await one.admin.WaitForVersion(
            apb.WaitForVersionRequest(tenant="acme", version=created.version, timeout=Duration(seconds=10)),
            metadata=ADMIN_MD,
        )
        took = time.monotonic() - started
        print(f"\nWaitForVersion with one rejecting sidecar answered in {took * 1000:.0f} ms (timeout 10 s)")
        assert not waited.converged
        assert (waited.sidecars, waited.applied) == (3, 2)
        [pending] = waited.pending
        assert (pending.sidecar_id, pending.replica, pending.state) == ("sc-c-openai-only", "cp-two", REJECTED)
        assert pending.rejected_version == created.version and pending.applied_version == held
        assert "targets provider gemini, which this sidecar does not serve (--provider)" in pending.error_detail
        assert took < 5.0
        # It keeps serving the version it held; the others serve the new route.
        assert await models(a, token) == await models(b, token) == ["gem", "gpt"]
        assert await models(c, token) == ["gpt"]
        assert c.state.version == held

        # Disabling the key, with --wait, through replica one: sc-c holds it back too
        # (it stands on the rejected version), and the CLI names it, exit code 3.
        code, out, err = await keyplane(
            one.plane.address, tmp_path, "keys", "disable", "-t", "acme", key.id, "--wait", "10"
        )
        assert code == 3, err
        assert "2 of 3 sidecars of tenant acme applied version" in out
        assert "one rejected it" in out
        assert "sc-c-openai-only (replica cp-two): REJECTED" in out and "gemini" in out

        code, out, err = await keyplane(two.plane.address, tmp_path, "proxy-status", "--tenant", "acme")
        assert code == 0, err
        print(out)
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
        assert rows["sc-a"][1:4] == ["cp-one", "acme", "SYNCED"]
        assert rows["sc-b"][1:4] == ["cp-two", "acme", "SYNCED"]
        assert rows["sc-c-openai-only"][1:4] == ["cp-two", "acme", "REJECTED"]
        assert "which this sidecar does not serve (--provider)" in out

        # Deleting the bad route (--wait): sc-c applies everything it held back, in order.
        gem = next(
            r
            for r in (await one.admin.ListRoutes(apb.ListRoutesRequest(tenant="acme"), metadata=ADMIN_MD)).routes
            if r.public_model == "gem"
        )
        started = time.monotonic()
        code, out, err = await keyplane(
            one.plane.address, tmp_path, "routes", "delete", "-t", "acme", gem.id, "--wait", "10"
        )
        took = time.monotonic() - started
        print(f"routes delete --wait: {out.strip()} (CLI round trip {took:.2f}s)")
        assert code == 0, err
        assert "3 of 3 sidecars of tenant acme applied version" in out
        assert c.state.version > held
        assert c.state.keys("acme", Provider.OPENAI) == ()  # the disable reached it
        assert await models(c, token) == ["gpt"]
        await until_states(one, all_synced)

        # A sidecar that leaves drops out of the shared record.
        await c.stop()
        await until_states(two, {"sc-a": SYNCED, "sc-b": SYNCED})
