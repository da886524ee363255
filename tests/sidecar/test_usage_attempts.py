"""Requests and attempts in usage, end to end over real sockets: an app calls a
sidecar with two OpenAI keys, the fake provider answers the first key with its real
error bodies (500, 429), the sidecar fails over and reports each attempt to a real
control plane, and GetUsage and ``keyplane usage show -o json`` (subprocess) count
the app's request once, in the row of its last attempt, and each upstream attempt.

- failed over (500 on the first key, then an answer): 1 request, 0 failed, 2 attempts;
- a stream failed over (429 on the first key): the same, though the first attempt is
  reported when the stream starts and the last when it ends;
- every attempt failed: 1 request, 1 failed, 2 attempts;
- every key rate limited, the sidecar's rescue waits for the first to recover and
  tries it again (the 429 the attempt loop passed on is superseded by the rescue's
  attempt): 1 request, 0 failed, 3 attempts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from sidecar.server import Sidecar
from tests.fakes.upstream import RATE_LIMITED, SERVER_ERROR, FakeUpstream, rate_limited

from .plane import ADMIN_MD, ADMIN_TOKEN, Plane, eventually
from .test_reporter import reporter_config

CHAT = "/v1/chat/completions"
FIRST, SECOND = "sk-first-0001", "sk-second-0001"
# public model -> upstream model
ROUTES = {"failover": "gpt-failover", "streamed": "gpt-streamed", "down": "gpt-down", "waited": "gpt-waited"}


async def setup(plane: Plane, up: FakeUpstream) -> tuple[str, dict[str, str]]:
    """The tenant, its two keys (the first weighted to be tried first), routes, a client key."""
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    key_ids: dict[str, str] = {}
    for label, secret, weight in (("first", FIRST, 1000), ("second", SECOND, 1)):
        created = await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme",
                provider=rpb.PROVIDER_OPENAI,
                label=label,
                secret=secret,
                base_url=up.base_url,
                weight=weight,
            ),
            metadata=ADMIN_MD,
        )
        key_ids[secret] = created.key.id
    for public, upstream in ROUTES.items():
        target = rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=upstream)
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model=public, targets=[target]), metadata=ADMIN_MD
        )
    up.program(FIRST, SERVER_ERROR, model="gpt-failover")
    up.program(FIRST, RATE_LIMITED, model="gpt-streamed")
    up.program(FIRST, SERVER_ERROR, model="gpt-down")
    up.program(SECOND, SERVER_ERROR, model="gpt-down")
    up.program(FIRST, rate_limited(1.2), model="gpt-waited", times=1)
    up.program(SECOND, rate_limited(3), model="gpt-waited", times=1)
    created_client = await admin.CreateClientKey(
        apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD
    )
    return created_client.token, key_ids


async def usage_show_json(plane: Plane, home: Path) -> dict[str, dict[str, str]]:
    """``keyplane usage show -t acme --by model -o json``: its rows by public model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYPLANE_")}
    env.update({"KEYPLANE_HOME": str(home), "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyplane_cli",
        "usage",
        "show",
        "-t",
        "acme",
        "--by",
        "model",
        "-o",
        "json",
        "--server",
        plane.address,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return {row["public_model"]: row for row in json.loads(stdout)["rows"]}


def counted(row: dict[str, str]) -> tuple[int, int, int]:
    """(requests, failed, attempts) of a JSON row (proto3 JSON leaves zeros out)."""
    return int(row.get("requests", 0)), int(row.get("failed_requests", 0)), int(row.get("attempts", 0))


async def test_a_failed_over_request_is_one_request_of_two_attempts(plane: Plane, tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        token, key_ids = await setup(plane, up)
        headers = {"authorization": f"Bearer {token}"}
        async with (
            Sidecar(reporter_config(plane.address, sidecar_id="sc-attempts")) as sc,
            httpx.AsyncClient(base_url=sc.url, timeout=20) as client,
        ):
            assert await sc.wait_ready(10)
            body = {"model": "failover", "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(CHAT, json=body, headers=headers)
            assert r.status_code == 200
            assert r.headers["x-keyplane-attempts"] == "2"
            assert r.headers["x-keyplane-key"] == key_ids[SECOND]
            assert up.secrets(model="gpt-failover") == [FIRST, SECOND]
            stream = {"model": "streamed", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with client.stream("POST", CHAT, json=stream, headers=headers) as streamed:
                assert streamed.status_code == 200 and streamed.headers["x-keyplane-attempts"] == "2"
                assert b"[DONE]" in await streamed.aread()
            assert up.secrets(model="gpt-streamed") == [FIRST, SECOND]
            body = {"model": "down", "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(CHAT, json=body, headers=headers)
            assert r.status_code >= 500
            assert sorted(s or "" for s in up.secrets(model="gpt-down")) == [FIRST, SECOND]

            admin = plane.admin
            assert admin is not None
            request = apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_PUBLIC_MODEL])
            rows: dict[str, upb.UsageRow] = {}

            async def all_reported() -> bool:
                answer = await admin.GetUsage(request, metadata=ADMIN_MD)
                rows.clear()
                rows.update({row.public_model: row for row in answer.rows})
                return sum(row.attempts for row in answer.rows) >= 6

            await eventually(all_reported, within=10)
    got = {model: (row.requests, row.failed_requests, row.attempts) for model, row in rows.items()}
    assert got == {"failover": (1, 0, 2), "streamed": (1, 0, 2), "down": (1, 1, 2)}
    # Per provider key: the request is in the row of the key that answered it.
    by_key = apb.GetUsageRequest(
        tenant="acme", group_by=[upb.USAGE_DIMENSION_PUBLIC_MODEL, upb.USAGE_DIMENSION_PROVIDER_KEY]
    )
    answer = await admin.GetUsage(by_key, metadata=ADMIN_MD)
    keyed = {(r.public_model, r.provider_key_id): (r.requests, r.failed_requests, r.attempts) for r in answer.rows}
    first, second = key_ids[FIRST], key_ids[SECOND]
    assert keyed[("failover", first)] == (0, 0, 1) and keyed[("failover", second)] == (1, 0, 1)
    assert keyed[("streamed", first)] == (0, 0, 1) and keyed[("streamed", second)] == (1, 0, 1)
    assert sum(keyed[("down", k)][0] for k in (first, second)) == 1
    # The answered attempts' usage is in their rows.
    assert rows["failover"].input_tokens > 0 and rows["streamed"].input_tokens > 0
    # The CLI says the same.
    shown = await usage_show_json(plane, tmp_path)
    assert {model: counted(row) for model, row in shown.items()} == got


async def test_a_request_the_rescue_retried_after_a_wait_is_one_request(plane: Plane) -> None:
    async with FakeUpstream() as up:
        token, key_ids = await setup(plane, up)
        async with (
            Sidecar(reporter_config(plane.address, sidecar_id="sc-rescued")) as sc,
            httpx.AsyncClient(base_url=sc.url, timeout=20) as client,
        ):
            assert await sc.wait_ready(10)
            body = {"model": "waited", "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(CHAT, json=body, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-keyplane-attempts"] == "3"
            assert up.secrets(model="gpt-waited") == [FIRST, SECOND, FIRST]
            admin = plane.admin
            assert admin is not None
            by_key = apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_PROVIDER_KEY])
            keyed: dict[str, tuple[int, int, int]] = {}

            async def all_reported() -> bool:
                answer = await admin.GetUsage(by_key, metadata=ADMIN_MD)
                keyed.clear()
                keyed.update({r.provider_key_id: (r.requests, r.failed_requests, r.attempts) for r in answer.rows})
                return sum(attempts for _, _, attempts in keyed.values()) >= 3

            await eventually(all_reported, within=10)
    assert keyed == {key_ids[FIRST]: (1, 0, 2), key_ids[SECOND]: (0, 0, 1)}
