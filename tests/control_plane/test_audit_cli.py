"""``keyplane audit list``: the real command in a subprocess against a real
control plane."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from keyplane.crypto import fingerprint
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane_cli.audit import parse_time
from tests.control_plane.conftest import ADMIN_MD, SECRET, Harness
from tests.control_plane.test_etag_cli import keyplane


async def test_audit_list(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant("acme")
    await harness.tenant("beta")
    key = await harness.key("acme")
    await harness.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme", id=key.id, key=rpb.ProviderKey(weight=3), update_mask=FieldMask(paths=["weight"])
        ),
        metadata=ADMIN_MD,
    )
    code, out, err = await keyplane(harness, tmp_path, "audit", "list")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["TIME", "CALLER", "METHOD", "TENANT", "RESOURCE", "FIELDS", "FP", "RESULT"]
    assert len(lines) == 5
    assert "UpdateProviderKey" in lines[1] and f"provider_key/{key.id}" in lines[1] and "weight" in lines[1]
    assert "admin-token:bootstrap" in lines[1] and lines[1].rstrip().endswith("ok")
    assert fingerprint(SECRET) in lines[2] and SECRET not in out

    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "-t", "acme", "--kind", "provider_key", "--json")
    assert code == 0
    listed = json.loads(out)["events"]
    assert [(e["method"], e["resource_id"]) for e in listed] == [
        ("UpdateProviderKey", key.id),
        ("CreateProviderKey", key.id),
    ]
    assert listed[0]["fields"] == ["weight"] and listed[0]["caller"] == "admin-token:bootstrap"

    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "--resource", key.id, "--limit", "1", "--json")
    assert code == 0
    page = json.loads(out)
    assert [e["method"] for e in page["events"]] == ["UpdateProviderKey"] and page["next_page_token"]

    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "--limit", "3")
    assert code == 0 and len(out.strip().splitlines()) == 5  # header, 3 events, "more events" hint
    assert "raise --limit" in out

    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "--since", "1h", "-t", "beta")
    assert code == 0 and "CreateTenant" in out and "acme" not in out
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "--since", future)
    assert code == 0 and out.strip() == "(no audit events)"
    code, out, _ = await keyplane(harness, tmp_path, "audit", "list", "--until", "1h")
    assert code == 0 and out.strip() == "(no audit events)"

    code, _, err = await keyplane(harness, tmp_path, "audit", "list", "-t", "Bad Tenant")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: tenant")
    code, _, err = await keyplane(harness, tmp_path, "audit", "list", "--since", "yesterday")
    assert code == 2 and "--since" in err
    code, _, err = await keyplane(harness, tmp_path, "audit", "list", "--since", "1h", "--until", "2h")
    assert code == 2 and "--until must be after --since" in err


def test_parse_time() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_time("90s", now=now) == now - timedelta(seconds=90)
    assert parse_time("15m", now=now) == now - timedelta(minutes=15)
    assert parse_time("1h", now=now) == now - timedelta(hours=1)
    assert parse_time("2d", now=now) == now - timedelta(days=2)
    assert parse_time("1w", now=now) == now - timedelta(weeks=1)
    assert parse_time("2025-01-31T12:00:00+02:00") == datetime(2025, 1, 31, 10, 0, tzinfo=UTC)
    local = parse_time("2025-01-31T12:00")
    assert local.tzinfo is not None and local.replace(tzinfo=None) == datetime(2025, 1, 31, 12, 0)
    for bad in ("yesterday", "1y", "-1h", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_time(bad)
