"""``keyplane health show|reset`` and ``keyplane sidecars list`` as a user runs
them: the real command in a subprocess against a real control plane."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import ADMIN_MD, ADMIN_TOKEN, SIDECAR_ACME_MD, Harness, next_message
from tests.control_plane.test_health import MODEL, credential, outcome, report, setup_keys


async def keyplane(harness: Harness, home: Path, *args: str) -> str:
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
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_health_show_reset_and_sidecars_list(harness: Harness, tmp_path: Path) -> None:
    key1, key2 = await setup_keys(harness)
    watcher = harness.watch(("acme",), metadata=SIDECAR_ACME_MD, sidecar_id="pod-a")
    await next_message(watcher)
    assert "all keys and providers are healthy" in await keyplane(harness, tmp_path, "health", "show", "-t", "acme")

    limited = outcome(key2, spb.OUTCOME_CLASS_RATE_LIMITED, status=429, retry_after=120, reason="429 rate limited")
    degraded = [
        outcome(key2, spb.OUTCOME_CLASS_UPSTREAM_ERROR, provider_final=True, model="o3", reason="503 unavailable")
        for _ in range(3)
    ]
    assert await report(harness, [credential(key1), limited, *degraded]) == 5
    health = await harness.admin.GetHealth(apb.GetHealthRequest(tenant="acme"), metadata=ADMIN_MD)
    cooldown = next(h for h in health.key_health if h.model == MODEL)
    local = datetime.fromtimestamp(cooldown.until.ToNanoseconds() / 1e9).astimezone().strftime("%Y-%m-%d %H:%M:%S")

    text = await keyplane(harness, tmp_path, "health", "show", "-t", "acme")
    lines = text.splitlines()
    assert lines[0].split() == ["KEY", "MODEL", "STATE", "UNTIL", "REASON"]
    [wide] = [line for line in lines if line.startswith(key1)]
    assert re.fullmatch(rf"{key1}\s+\(all models\)\s+unhealthy\s+-\s+400 API key not valid", wide)
    [cool] = [line for line in lines if line.startswith(key2) and MODEL in line]
    match = re.fullmatch(rf"{key2}\s+{MODEL}\s+cooldown\s+{re.escape(local)} \(in (\d+)s\)\s+429 rate limited", cool)
    assert match is not None, cool
    assert 100 <= int(match.group(1)) <= 120
    [provider] = [line for line in lines if line.startswith("openai")]
    assert re.fullmatch(r"openai\s+o3\s+degraded\s+\S+ \S+ \(in \d+s\)\s+503 unavailable", provider), provider
    assert any(line.split() == ["PROVIDER", "MODEL", "STATE", "UNTIL", "REASON"] for line in lines)

    as_json = json.loads(await keyplane(harness, tmp_path, "health", "show", "-t", "acme", "--json"))
    assert {h["key_id"] for h in as_json["key_health"]} == {key1, key2}
    assert as_json["provider_health"][0]["state"] == rpb.HealthState.Name(rpb.HEALTH_STATE_DEGRADED)

    assert f"reset the health of key {key1}" in await keyplane(harness, tmp_path, "health", "reset", "-t", "acme", key1)
    text = await keyplane(harness, tmp_path, "health", "show", "-t", "acme")
    assert key1 not in text and key2 in text

    sidecars = (await keyplane(harness, tmp_path, "sidecars", "list")).splitlines()
    assert sidecars[0].split() == ["SIDECAR", "TENANTS", "PEER", "CONNECTED", "VERSION"]
    assert len(sidecars) == 2 and sidecars[1].startswith("pod-a ") and " acme " in sidecars[1]
