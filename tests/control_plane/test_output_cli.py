"""``-o table|json|yaml`` on every admin command family: the real ``keyplane``
command in subprocesses against a real control plane.

For each list/show command: ``-o json`` and ``-o yaml`` parse back to the
same data (and ``--json`` is still ``-o json``); ``-o table`` (the default)
has a header row; no output of any format holds the provider secret.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, SECRET, Harness
from tests.control_plane.test_etag_cli import keyplane
from tests.control_plane.test_health import credential, report, watching

# (command, the key of the data it lists, the table's header starts with)
FAMILIES: list[tuple[tuple[str, ...], str, str]] = [
    (("tenants", "list"), "tenants", "TENANT"),
    (("keys", "list", "-t", "acme"), "keys", "ID  PROVIDER"),
    (("routes", "list", "-t", "acme"), "routes", "ID  MODEL"),
    (("client-keys", "list", "-t", "acme"), "client_keys", "ID  LABEL"),
    (("health", "show", "-t", "acme"), "key_health", "KEY  MODEL"),
    (("sidecars", "list"), "sidecars", "SIDECAR  TENANTS"),
    (("audit", "list", "--limit", "5"), "events", "TIME  CALLER"),
    (("admin-tokens", "list"), "admin_tokens", "ID  LABEL"),
    (("sidecar-tokens", "list"), "sidecar_tokens", "ID  LABEL"),
    (("master-key", "status"), "usage", "MASTER KEY"),
]


async def _populate(harness: Harness) -> str:
    await harness.tenant()
    key = await harness.key()
    await harness.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant="acme",
            public_model="chat",
            targets=[rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model="gpt-4o")],
        ),
        metadata=ADMIN_MD,
    )
    await harness.admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    await harness.admin.CreateAdminToken(apb.CreateAdminTokenRequest(label="ops"), metadata=ADMIN_MD)
    await harness.admin.CreateSidecarToken(
        apb.CreateSidecarTokenRequest(label="fleet", tenants=["acme"]), metadata=ADMIN_MD
    )
    assert await report(harness, [credential(key.id)]) == 1  # something for health show
    return key.id


async def _outputs(harness: Harness, home: Path, command: tuple[str, ...]) -> dict[str, str]:
    runs = {
        "table": keyplane(harness, home, *command),
        "json": keyplane(harness, home, *command, "-o", "json"),
        "yaml": keyplane(harness, home, *command, "--output", "yaml"),
        "alias": keyplane(harness, home, *command, "--json"),
    }
    results = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    for name, (code, _, err) in results.items():
        assert code == 0, (command, name, err)
    return {name: out for name, (_, out, _) in results.items()}


@pytest.mark.parametrize(("command", "field", "header"), FAMILIES, ids=[" ".join(f[0][:2]) for f in FAMILIES])
async def test_every_admin_command_prints_table_json_and_yaml(
    harness: Harness, tmp_path: Path, command: tuple[str, ...], field: str, header: str
) -> None:
    await _populate(harness)
    watcher = await watching(harness)  # a connected sidecar for sidecars list
    try:
        outputs = await _outputs(harness, tmp_path, command)
    finally:
        watcher.cancel()
    as_json: dict[str, Any] = json.loads(outputs["json"])
    as_yaml: dict[str, Any] = yaml.safe_load(outputs["yaml"])
    assert as_json == as_yaml
    assert json.loads(outputs["alias"]) == as_json
    assert as_json[field], as_json  # the data, not an empty answer
    first = outputs["table"].splitlines()[0].split()
    assert first[: len(header.split())] == header.split(), outputs["table"]
    for out in outputs.values():
        assert SECRET not in out


async def test_show_and_write_commands_take_output_too(harness: Harness, tmp_path: Path) -> None:
    key_id = await _populate(harness)
    show = await _outputs(harness, tmp_path, ("keys", "show", "-t", "acme", key_id))
    assert json.loads(show["json"]) == yaml.safe_load(show["yaml"])
    assert json.loads(show["json"])["key"]["id"] == key_id
    assert "secret" not in json.loads(show["json"])["key"]
    assert show["table"].startswith(key_id)

    code, out, _ = await keyplane(harness, tmp_path, "tenants", "create", "beta", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["tenant"]["name"] == "beta"
    code, out, err = await keyplane(
        harness, tmp_path, "keys", "add", "-t", "beta", "-p", "openai", "-l", "k", "--secret-stdin", "-o", "yaml",
        stdin=SECRET + "\n",
    )  # fmt: skip
    assert code == 0, err
    added = yaml.safe_load(out)["key"]
    assert added["label"] == "k" and SECRET not in out and SECRET[-4:] == added["last4"]
    code, out, err = await keyplane(harness, tmp_path, "tenants", "list", "-o", "xml")
    assert code == 2 and "invalid choice: 'xml'" in err
