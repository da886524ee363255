"""``keyplane apply`` / ``keyplane diff`` round-trip a config through the real
command against a real control plane, on SQLite and on Postgres."""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from keyplane.crypto import fingerprint
from tests.e2e.processes import CliResult, Running, child_env, cli, start
from tests.pg import PG_DSN

ADMIN_TOKEN = "adm-apply-0a1b2c3d4e5f"
SIDECAR_TOKEN = "sc-apply-0a1b2c3d4e5f"
OPENAI = "sk-apply-openai-0123456789abcdef"
OPENAI_ROTATED = "sk-apply-rotated-0123456789abcdef"
ANTHROPIC = "sk-ant-apply-0123456789abcdef"

V1 = """
version: 1
tenants:
  - name: acme
    keys:
      - provider: openai
        label: main
        secret: {env: KPA_OPENAI}
        allowed_models: [gpt-4o, gpt-4o-mini]
    routes:
      - model: chat
        targets: ["openai:gpt-4o", "openai:gpt-4o-mini@1"]
      - model: legacy
        targets: [{provider: openai, model: gpt-4o-mini}]
    client_keys: [app]
"""

# weight 1 -> 3, chat's second target, a new key; the route legacy is gone.
V2 = """
version: 1
tenants:
  - name: acme
    keys:
      - provider: openai
        label: main
        secret: {env: KPA_OPENAI}
        weight: 3
        allowed_models: [gpt-4o, gpt-4o-mini]
      - provider: anthropic
        label: claude
        secret: {file: anthropic.secret}
    routes:
      - model: chat
        targets: ["openai:gpt-4o", "anthropic:claude-3-5-sonnet@1*2"]
    client_keys: [app]
"""


class Plane:
    def __init__(self, running: Running, tmp_path: Path) -> None:
        self.running = running
        self.file = tmp_path / "keyplane.yaml"
        (tmp_path / "anthropic.secret").write_text(ANTHROPIC + "\n")
        port = running.find(r"control plane listening on port (\d+)").group(1)
        self.env = child_env(
            tmp_path / "home",
            {"KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN, "KEYPLANE_SERVER": f"127.0.0.1:{port}", "KPA_OPENAI": OPENAI},
        )

    async def kp(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        return await cli(list(args), {**self.env, **(env or {})})

    async def ok(self, *args: str) -> str:
        result = await self.kp(*args)
        assert result.code == 0, result.stderr
        return result.stdout

    async def plan(self, *flags: str, code: int, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """``diff -o json``: the planned actions, the exit code checked."""
        result = await self.kp("diff", "-f", str(self.file), "-o", "json", *flags, env=env)
        assert result.code == code, result.stdout + result.stderr
        actions: list[dict[str, Any]] = json.loads(result.stdout)["actions"]
        return actions

    async def listed(self, what: str) -> list[dict[str, Any]]:
        out = json.loads(await self.ok(what, "list", "-t", "acme", "--json"))
        field = {"keys": "keys", "routes": "routes", "client-keys": "client_keys"}[what]
        items: list[dict[str, Any]] = out.get(field, [])
        return items


async def _start(tmp_path: Path, store: str) -> Running:
    env = child_env(
        tmp_path / "home",
        {
            "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "KEYPLANE_SIDECAR_TOKEN": SIDECAR_TOKEN,
            "KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        },
    )
    return await start(
        ["control-plane", "--listen", "127.0.0.1:0", "--store", store], env, r"control plane listening on port \d+"
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def plane(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Plane]:
    if request.param == "sqlite":
        running = await _start(tmp_path, f"sqlite:///{tmp_path / 'keyplane.db'}")
        try:
            yield Plane(running, tmp_path)
        finally:
            assert await running.stop() == 0, running.output
        return
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"Postgres at {PG_DSN} is unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"kp_apply_{uuid.uuid4().hex}"
    try:
        running = await _start(tmp_path, f"{PG_DSN}?schema={schema}")
        try:
            yield Plane(running, tmp_path)
        finally:
            assert await running.stop() == 0, running.output
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def _summary(actions: list[dict[str, Any]]) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [(a["op"], a["kind"], a["name"], a.get("changes", {})) for a in actions]


async def test_apply_and_diff_round_trip(plane: Plane) -> None:
    plane.file.write_text(V1)
    planned = await plane.plan(code=1)
    assert [(a["op"], a["kind"], a["name"]) for a in planned] == [
        ("create", "tenant", "acme"),
        ("create", "provider_key", "main"),
        ("create", "route", "chat"),
        ("create", "route", "legacy"),
        ("create", "client_key", "app"),
    ]
    assert all(a["state"] == "planned" for a in planned)
    # diff changed nothing.
    assert "acme" not in await plane.ok("tenants", "list")

    out = await plane.ok("apply", "-f", str(plane.file))
    token = re.search(r"token of client key acme/app \(shown once, store it now\): (\S+)", out)
    assert token is not None and out.count(token.group(1)) == 1
    (client_key,) = await plane.listed("client-keys")
    assert token.group(1).startswith(client_key["prefix"])
    assert OPENAI not in out
    (key,) = await plane.listed("keys")
    assert key["fingerprint"] == fingerprint(OPENAI) and key["allowed_models"] == ["gpt-4o", "gpt-4o-mini"]

    # Applied: no changes, and applying again writes nothing (etags stay).
    result = await plane.kp("diff", "-f", str(plane.file))
    assert (result.code, result.stdout) == (0, "no changes\n")
    before = (await plane.listed("keys"), await plane.listed("routes"), await plane.listed("client-keys"))
    assert await plane.ok("apply", "-f", str(plane.file)) == "no changes\n"
    assert (await plane.listed("keys"), await plane.listed("routes"), await plane.listed("client-keys")) == before

    # The file changes: diff shows exactly that (the dropped route only with --prune).
    plane.file.write_text(V2)
    expected = [
        ("update", "provider_key", "main", {"weight": {"from": "1", "to": "3"}}),
        ("create", "provider_key", "claude", {}),
        (
            "update",
            "route",
            "chat",
            {
                "targets": {
                    "from": "openai:gpt-4o@0*1 openai:gpt-4o-mini@1*1",
                    "to": "openai:gpt-4o@0*1 anthropic:claude-3-5-sonnet@1*2",
                }
            },
        ),
    ]
    assert _summary(await plane.plan(code=1)) == expected
    result = await plane.kp("diff", "-f", str(plane.file))
    assert (result.code, result.stderr) == (1, "")
    assert result.stdout.splitlines() == [
        "planned changes:",
        "~ provider_key acme/main: weight: 1 -> 3",
        "+ provider_key acme/claude: anthropic, weight 1, models *, secret from file:anthropic.secret",
        "~ route acme/chat: targets: openai:gpt-4o@0*1 openai:gpt-4o-mini@1*1 -> "
        "openai:gpt-4o@0*1 anthropic:claude-3-5-sonnet@1*2",
    ]
    yaml_out = (await plane.kp("diff", "-f", str(plane.file), "-o", "yaml")).stdout
    assert yaml_out.startswith("actions:\n- op: update\n  kind: provider_key\n  tenant: acme\n  name: main\n")
    applied = await plane.ok("apply", "-f", str(plane.file), "-o", "json")
    assert _summary(json.loads(applied)["actions"]) == expected
    assert await plane.plan(code=0) == []
    keys = {k["label"]: k for k in await plane.listed("keys")}
    assert keys["main"]["weight"] == 3 and keys["main"]["etag"] != key["etag"]
    assert keys["main"]["fingerprint"] == fingerprint(OPENAI)
    assert keys["claude"]["fingerprint"] == fingerprint(ANTHROPIC)

    # --prune: diff shows the deletion; apply without --yes deletes nothing.
    pruned: list[tuple[str, str, str, dict[str, Any]]] = [("delete", "route", "legacy", {})]
    assert _summary(await plane.plan("--prune", code=1)) == pruned
    out = await plane.ok("apply", "-f", str(plane.file), "--prune")
    assert out == "applied:\n- route acme/legacy  (dry run: pass --yes to delete)\n"
    assert sorted(r["public_model"] for r in await plane.listed("routes")) == ["chat", "legacy"]
    out = await plane.ok("apply", "-f", str(plane.file), "--prune", "--yes")
    assert out == "applied:\n- route acme/legacy\n"
    assert [r["public_model"] for r in await plane.listed("routes")] == ["chat"]
    assert await plane.plan("--prune", code=0) == []


async def test_secret_by_env_reference_rotates_only_when_it_changes(plane: Plane) -> None:
    plane.file.write_text(V1)
    await plane.ok("apply", "-f", str(plane.file))
    (key,) = await plane.listed("keys")
    assert await plane.plan(code=0) == []

    rotated = {"KPA_OPENAI": OPENAI_ROTATED}
    change = {
        "secret": {"from": f"fingerprint {fingerprint(OPENAI)}", "to": f"fingerprint {fingerprint(OPENAI_ROTATED)}"}
    }
    assert _summary(await plane.plan(code=1, env=rotated)) == [("update", "provider_key", "main", change)]
    result = await plane.kp("apply", "-f", str(plane.file), env=rotated)
    assert result.code == 0, result.stderr
    assert OPENAI_ROTATED not in result.stdout + result.stderr
    (after,) = await plane.listed("keys")
    assert after["fingerprint"] == fingerprint(OPENAI_ROTATED) and after["etag"] != key["etag"]
    assert {k: v for k, v in after.items() if k not in ("fingerprint", "last4", "etag", "update_time")} == {
        k: v for k, v in key.items() if k not in ("fingerprint", "last4", "etag", "update_time")
    }
    assert await plane.plan(code=0, env=rotated) == []
    # The old value again is a rotation back; an unchanged value never is.
    assert len(await plane.plan(code=1)) == 1


async def test_bad_files_are_errors_that_change_nothing(plane: Plane) -> None:
    plane.file.write_text(V1.replace("secret: {env: KPA_OPENAI}", f"secret: {OPENAI}"))
    for command in ("apply", "diff"):
        result = await plane.kp(command, "-f", str(plane.file))
        assert result.code == 2, result
        assert result.stderr == (
            f"error: {plane.file} is not a valid keyplane config:\n"
            "  tenants[0].keys[0].secret: must be a reference, {env: VAR} or {file: PATH}; "
            "a literal secret is not allowed in the file\n"
        )
        assert OPENAI not in result.stdout + result.stderr
    plane.file.write_text(V1.replace("provider: openai", "provider: nosuch"))
    result = await plane.kp("diff", "-f", str(plane.file))
    assert result.code == 2 and "tenants[0].keys[0].provider: 'nosuch' is not one of [" in result.stderr
    # An error from the API is exit code 2 too (never 1, which means changes).
    result = await plane.kp("diff", "-f", str(plane.file).replace("keyplane.yaml", "missing.yaml"))
    assert result.code == 2 and "missing.yaml: cannot read" in result.stderr
    plane.file.write_text(V1)
    result = await plane.kp("diff", "-f", str(plane.file), env={"KEYPLANE_ADMIN_TOKEN": "adm-wrong-000000000000"})
    assert result.code == 2 and result.stderr.startswith("error: UNAUTHENTICATED: "), result.stderr
    assert "acme" not in await plane.ok("tenants", "list")


async def test_routes_to_providers_without_an_active_key_are_warned_about(plane: Plane) -> None:
    plane.file.write_text(V1.replace('"openai:gpt-4o-mini@1"', '"gemini:gemini-2.0-flash@1"'))
    result = await plane.kp("apply", "-f", str(plane.file))
    assert result.code == 0
    assert result.stderr == (
        "warning: tenant 'acme': no active key for the provider of chat -> gemini:gemini-2.0-flash: "
        "requests routed there get 503 no_usable_key\n"
    )
    assert sorted(r["public_model"] for r in await plane.listed("routes")) == ["chat", "legacy"]


async def test_a_step_the_api_refuses_stops_apply_and_says_what_was_done(plane: Plane) -> None:
    plane.file.write_text(V1.replace('"openai:gpt-4o-mini@1"', '"vllm:llama@1"'))
    result = await plane.kp("apply", "-f", str(plane.file))
    assert result.code == 2
    assert result.stdout == (
        "applied:\n+ tenant acme\n"
        "+ provider_key acme/main: openai, weight 1, models gpt-4o,gpt-4o-mini, secret from env:KPA_OPENAI\n"
    )
    assert result.stderr.endswith(
        "error: create route acme/chat failed: INVALID_ARGUMENT: targets[1].node_urls needs at least one node URL "
        "for provider vllm (what is listed above was done, nothing after it; run diff, then apply again)\n"
    )
    assert [r["public_model"] for r in await plane.listed("routes")] == []


AZURE = """
version: 1
tenants:
  - name: acme
    keys:
      - {provider: azure_openai, label: east, secret: {env: KPA_OPENAI}, base_url: "https://east.openai.azure.com"}
    routes:
      - model: gpt-4o
        targets:
          - "azure_openai:gpt-4o?api-version=2024-10-21&deployment=gpt4o-prod"
          - {provider: azure_openai, model: gpt-4o, priority: 1, api_version: "API"}
          - azure_openai:gpt-4.1@2
"""


async def test_azure_deployments_round_trip(plane: Plane) -> None:
    plane.file.write_text(AZURE.replace("API", "2025-04-01-preview"))
    await plane.ok("apply", "-f", str(plane.file))
    assert await plane.plan(code=0) == []  # api-version and deployment came back as written
    (route,) = await plane.listed("routes")
    assert [(t.get("api_version", ""), t.get("deployment", "")) for t in route["targets"]] == [
        ("2024-10-21", "gpt4o-prod"),
        ("2025-04-01-preview", ""),
        ("", ""),
    ]
    plane.file.write_text(AZURE.replace("API", "2024-10-21"))
    [(op, kind, name, changes)] = _summary(await plane.plan(code=1))
    assert (op, kind, name) == ("update", "route", "gpt-4o")
    assert changes["targets"]["to"] == (
        "azure_openai:gpt-4o@0*1?api-version=2024-10-21&deployment=gpt4o-prod "
        "azure_openai:gpt-4o@1*1?api-version=2024-10-21 azure_openai:gpt-4.1@2*1"
    )
    # The control plane validates what the file says: a bad api-version changes nothing.
    plane.file.write_text(AZURE.replace("API", "2024-10-21").replace("deployment=gpt4o-prod", "deployment=a%2Fb"))
    result = await plane.kp("apply", "-f", str(plane.file))
    assert result.code == 2 and "deployment must be 1-64 letters" in result.stderr, result.stdout + result.stderr
