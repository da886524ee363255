"""``keyplane apply`` writes with compare-and-set and update masks: a change
made between its read and its write is never undone (ABORTED), and an update
names only the fields that differ. A real control plane, the CLI's own client."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane_cli.admin_client import AdminClient
from keyplane_cli.apply import execute_action, read_current
from keyplane_cli.config_plan import Action, KeySpec, TenantSpec, plan
from tests.control_plane.conftest import ADMIN_MD, ADMIN_TOKEN, SECRET, Harness

WANTED = [TenantSpec("acme", (KeySpec("openai", "main", weight=5, secret=SECRET),))]


def _plan(address: str) -> tuple[AdminClient, list[Action]]:
    client = AdminClient(address, ADMIN_TOKEN)
    return client, plan(WANTED, read_current(client, WANTED))


async def test_an_update_names_only_the_changed_fields(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    client, actions = await asyncio.to_thread(_plan, harness.plane.address)
    try:
        assert [(a.op, a.fields, a.etag) for a in actions] == [("update", ("weight",), key.etag)]
        await asyncio.to_thread(execute_action, client, actions[0])
    finally:
        client.close()
    events = await harness.admin.ListAuditEvents(apb.ListAuditEventsRequest(resource_id=key.id), metadata=ADMIN_MD)
    latest = events.events[0]  # newest first
    assert (latest.method, list(latest.fields)) == ("UpdateProviderKey", ["weight"])
    got = await harness.admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert got.key.weight == 5 and got.key.fingerprint == key.fingerprint


async def test_a_change_since_the_read_is_not_overwritten(harness: Harness) -> None:
    await harness.tenant()
    key = await harness.key()
    client, actions = await asyncio.to_thread(_plan, harness.plane.address)
    try:
        # Another admin disables the key after apply read it.
        await harness.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(
                tenant="acme",
                id=key.id,
                key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=ADMIN_MD,
        )
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(execute_action, client, actions[0])
    finally:
        client.close()
    assert isinstance(info.value, grpc.Call) and info.value.code() is grpc.StatusCode.ABORTED
    got = await harness.admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    assert (got.key.weight, got.key.status) == (1, rpb.KEY_STATUS_DISABLED)
