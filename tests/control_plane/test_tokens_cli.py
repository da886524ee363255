"""``keyplane admin-tokens`` and ``keyplane sidecar-tokens``: the real command
in a subprocess against a real control plane."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from tests.control_plane.conftest import Harness, next_message
from tests.control_plane.test_etag_cli import keyplane
from tests.control_plane.test_tokens import bearer


async def test_cli_sidecar_tokens_create_list_revoke(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant("acme")
    code, out, err = await keyplane(
        harness, tmp_path, "sidecar-tokens", "create", "-l", "eu-fleet", "--tenant", "acme", "-t", "globex"
    )
    assert (code, err) == (0, "")
    head, shown = out.splitlines()
    assert head.startswith("created sidecar token st_") and head.endswith("(eu-fleet) for tenants acme,globex")
    token = shown.removeprefix("token (shown once, store it now): ")
    assert token.startswith("kps-") and len(token) == 47
    token_id = head.split()[3]
    # The printed token works, within its scope.
    assert (await next_message(harness.watch(("acme",), metadata=bearer(token)))).HasField("snapshot")

    code, out, _ = await keyplane(harness, tmp_path, "sidecar-tokens", "list")
    assert code == 0 and token not in out
    [header, row] = out.splitlines()
    assert header.split() == ["ID", "LABEL", "PREFIX", "TENANTS", "CREATED", "REVOKED", "ETAG"]
    assert row.split()[:4] == [token_id, "eu-fleet", token[:10] + "...", "acme,globex"]
    assert " - " in row  # not revoked

    code, out, err = await keyplane(harness, tmp_path, "sidecar-tokens", "revoke", token_id, "--json")
    assert (code, err) == (0, "")
    revoked = json.loads(out)["sidecar_token"]
    assert revoked["id"] == token_id and "revoke_time" in revoked and token not in out
    with pytest.raises(aio.AioRpcError) as exc_info:
        await next_message(harness.watch(("acme",), metadata=bearer(token)))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED

    code, out, err = await keyplane(harness, tmp_path, "sidecar-tokens", "revoke", "bootstrap")
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: id: the bootstrap sidecar tokens")
    code, _, err = await keyplane(harness, tmp_path, "sidecar-tokens", "create", "-l", "x")
    assert code == 2 and "--tenant" in err  # a scope is required


async def test_cli_admin_tokens_create_list_revoke(harness: Harness, tmp_path: Path) -> None:
    code, out, err = await keyplane(harness, tmp_path, "admin-tokens", "create", "-l", "ci", "--json")
    assert (code, err) == (0, "")
    created = json.loads(out)
    token, token_id = created["token"], created["admin_token"]["id"]
    assert token.startswith("kpa-") and created["admin_token"]["prefix"] == token[:10]
    await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(token))

    code, out, _ = await keyplane(harness, tmp_path, "admin-tokens", "list")
    assert code == 0 and token not in out and out.splitlines()[1].split()[:3] == [token_id, "ci", token[:10] + "..."]
    code, out, _ = await keyplane(harness, tmp_path, "admin-tokens", "revoke", token_id)
    assert (code, out) == (0, f"revoked admin token {token_id} (ci)\n")
    with pytest.raises(aio.AioRpcError) as exc_info:
        await harness.admin.ListTenants(apb.ListTenantsRequest(), metadata=bearer(token))
    assert exc_info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    code, _, err = await keyplane(harness, tmp_path, "admin-tokens", "revoke", "at_unknown")
    assert code == 1 and err == "error: NOT_FOUND: admin token 'at_unknown' not found\n"
