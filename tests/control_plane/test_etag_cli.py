"""Etags in the admin CLI: shown in rows and --json, sent with --etag; the
real command in a subprocess against a real control plane."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from keyplane.crypto import fingerprint
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, ADMIN_TOKEN, SECRET, Harness

ROTATED = "sk-cli-rotated-SECRET-0123456789abcdef"


async def keyplane(harness: Harness, home: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")}
    env.update({"KEYPLANE_HOME": str(home), "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyplane_cli",
        *args,
        "--server",
        harness.plane.address,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_shows_and_sends_etags(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant()
    key = await harness.key()

    code, out, _ = await keyplane(harness, tmp_path, "keys", "show", "-t", "acme", key.id, "--json")
    assert code == 0
    shown = json.loads(out)["key"]
    assert shown["etag"] == key.etag
    code, out, _ = await keyplane(harness, tmp_path, "keys", "list", "-t", "acme")
    assert out.rstrip().endswith(f"etag={key.etag}")

    # Without --etag: unconditional, as before.
    code, out, _ = await keyplane(harness, tmp_path, "keys", "disable", "-t", "acme", key.id, "--json")
    assert code == 0
    disabled = json.loads(out)["key"]
    assert disabled["status"] == "KEY_STATUS_DISABLED" and disabled["etag"] != key.etag

    # A stale --etag fails with ABORTED and changes nothing.
    code, out, err = await keyplane(
        harness, tmp_path, "keys", "rotate", "-t", "acme", key.id, "--secret-stdin", "--etag", key.etag, stdin=ROTATED
    )
    assert code == 1 and out == ""
    assert err.startswith("error: ABORTED: ") and "was changed since it was read" in err
    assert ROTATED not in err and SECRET not in err
    got = await harness.admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert got.key.fingerprint == fingerprint(SECRET)

    # The current one goes through; the rotation keeps the key disabled.
    code, out, _ = await keyplane(
        harness,
        tmp_path,
        "keys",
        "rotate",
        "-t",
        "acme",
        key.id,
        "--secret-stdin",
        "--etag",
        disabled["etag"],
        "--json",
        stdin=ROTATED,
    )
    assert code == 0
    rotated = json.loads(out)["key"]
    assert (rotated["fingerprint"], rotated["status"]) == (fingerprint(ROTATED), "KEY_STATUS_DISABLED")
    code, _, err = await keyplane(harness, tmp_path, "keys", "enable", "-t", "acme", key.id, "--etag", key.etag)
    assert code == 1 and "ABORTED" in err


async def test_cli_route_set_targets_with_etag(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant()
    route = (
        await harness.admin.CreateRoute(
            apb.CreateRouteRequest(
                tenant="acme",
                public_model="chat",
                targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")],
            ),
            metadata=ADMIN_MD,
        )
    ).route
    code, out, _ = await keyplane(harness, tmp_path, "routes", "list", "-t", "acme")
    assert code == 0 and out.rstrip().endswith(f"etag={route.etag}")
    args = ("routes", "set-targets", "-t", "acme", route.id, "--target", "openai:gpt-4o-mini")
    code, out, _ = await keyplane(harness, tmp_path, *args, "--etag", route.etag, "--json")
    assert code == 0
    updated = json.loads(out)["route"]
    assert [t["upstream_model"] for t in updated["targets"]] == ["gpt-4o-mini"]
    code, _, err = await keyplane(harness, tmp_path, *args, "--etag", route.etag)
    assert code == 1 and "error: ABORTED: route" in err
