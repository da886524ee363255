"""A replica that lags the store never sends a sidecar a version older than
the one it holds: it catches up from the store first (the sidecar gets the
missing changes as a delta), refuses with UNAVAILABLE when it cannot, and
marks its snapshot as a version reset only when the store itself is behind
the sidecar (restored from a backup).

Two replicas on one SQLite file, no change-log polling: the second hears of
the first's writes only when something makes it read the log, so it lags
the store for real.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, SIDECAR_ACME_MD, Harness, HarnessFactory, next_message


async def lagging_pair(make_harness: HarnessFactory) -> tuple[Harness, Harness, int]:
    """Replicas one and two on one SQLite file; a key disabled through one,
    which two has not read (returns the write's version)."""
    master_key = os.urandom(32)
    one = await make_harness(master_key=master_key, replica_id="cp-one")
    two = await make_harness(master_key=master_key, replica_id="cp-two")
    await one.tenant()
    key = await one.key()
    await two.plane.hub.catch_up()
    disabled = await one.admin.UpdateProviderKey(
        apb.UpdateProviderKeyRequest(
            tenant="acme",
            id=key.id,
            key=rpb.ProviderKey(status=rpb.KEY_STATUS_DISABLED),
            update_mask=FieldMask(paths=["status"]),
        ),
        metadata=ADMIN_MD,
    )
    assert two.plane.hub.version < disabled.version  # two lags the store
    return one, two, disabled.version


async def test_a_sidecar_ahead_of_a_lagging_replica_gets_a_delta_after_it_caught_up(
    make_harness: HarnessFactory,
) -> None:
    _, two, version = await lagging_pair(make_harness)
    # A sidecar that applied the disable through replica one moves to replica two.
    call = two.watch(("acme",), resume_version=version, metadata=SIDECAR_ACME_MD, sidecar_id="sc-moved")
    first = await next_message(call, within=5.0)
    assert first.WhichOneof("payload") == "delta"  # never an older snapshot
    assert first.version >= version and not first.version_reset
    assert two.plane.hub.version >= version

    # A sidecar that holds less than the replica is served as before.
    older = two.watch(("acme",), resume_version=1, metadata=SIDECAR_ACME_MD, sidecar_id="sc-old")
    message = await next_message(older, within=5.0)
    assert [c.key_put.status for c in message.delta.changes if c.HasField("key_put")][-1] == rpb.KEY_STATUS_DISABLED


async def test_a_replica_that_cannot_catch_up_refuses_instead_of_sending_an_older_snapshot(
    make_harness: HarnessFactory,
) -> None:
    _, two, version = await lagging_pair(make_harness)
    await two.plane.store.close()  # its store is gone: it cannot read what it missed
    call = two.watch(("acme",), resume_version=version, metadata=SIDECAR_ACME_MD, sidecar_id="sc-moved")
    with pytest.raises(aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10.0)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert f"behind the version {version} the sidecar holds" in (info.value.details() or "")


async def test_a_sidecar_ahead_of_the_store_itself_gets_a_version_reset(make_harness: HarnessFactory) -> None:
    _, two, version = await lagging_pair(make_harness)
    call = two.watch(("acme",), resume_version=version + 1000, metadata=SIDECAR_ACME_MD, sidecar_id="sc-restored")
    message = await next_message(call, within=5.0)
    assert message.WhichOneof("payload") == "snapshot"
    assert message.version_reset
    assert message.version == version  # the store's newest, after catching up
