"""Master-key rotation through a real control plane on SQLite and on
Postgres: the keyring file is picked up without a restart, RewrapSecrets
re-encrypts every secret (batched, resumable, idempotent, no change a
sidecar sees), races safely with rotations, GetMasterKeyStatus counts, and
a control plane restarted with only the new key opens everything."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc import aio

from control_plane import master_keys
from keyplane.crypto import SecretBox
from keyplane.keyring import Keyring, ciphertext_key_id, legacy_key_id
from keyplane.keyring_file import write_keyring_file
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from tests.control_plane.conftest import ADMIN_MD, SIDECAR_ALL_MD, Harness, HarnessFactory, next_message, rpc_error
from tests.pg import fresh_schema, schema_url
from tests.store import factories as f

K0, K1 = os.urandom(32), os.urandom(32)
LEGACY = legacy_key_id(K0)


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keyplane.db'}"
        return
    async with fresh_schema("kp_mk") as schema:
        yield schema_url(schema)


async def _plane(make_harness: HarnessFactory, store_url: str, keyring: Path, master_key: bytes = K0) -> Harness:
    return await make_harness(
        store_url=store_url,
        master_key=master_key,
        master_keyring_file=keyring,
        master_keyring_check_interval=0.02,
    )


def _secret(n: int) -> str:
    return f"sk-rotation-test-{n:04d}-SECRET"


async def _keys(harness: Harness, count: int, tenant: str = "acme") -> list[rpb.ProviderKey]:
    await harness.tenant(tenant)
    return list(await asyncio.gather(*(harness.key(tenant, label=f"k{n}", secret=_secret(n)) for n in range(count))))


async def _status(harness: Harness) -> tuple[str, dict[str, int], int]:
    resp = await harness.admin.GetMasterKeyStatus(apb.GetMasterKeyStatusRequest(), metadata=ADMIN_MD)
    return resp.primary_key_id, {u.key_id: u.secrets for u in resp.usage}, resp.total_secrets


async def _rewrap_all(harness: Harness, **request: object) -> dict[str, int]:
    totals: dict[str, int] = {}
    token = ""
    calls = 0
    while True:
        resp = await harness.admin.RewrapSecrets(
            apb.RewrapSecretsRequest(page_token=token, **request),  # type: ignore[arg-type]
            metadata=ADMIN_MD,
        )
        calls += 1
        for name in ("examined", "rewrapped", "already_current", "skipped_changed", "unreadable"):
            totals[name] = totals.get(name, 0) + getattr(resp, name)
        token = resp.next_page_token
        if not token:
            totals["calls"] = calls
            return totals


async def _snapshot_secrets(harness: Harness) -> dict[str, str]:
    call = harness.watch()
    message = await next_message(call, within=5.0)
    call.cancel()
    return {k.id: k.secret for t in message.snapshot.tenants for k in t.keys}


async def _wait_primary(harness: Harness, key_id: str) -> None:
    for _ in range(250):
        if (await _status(harness))[0] == key_id:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the control plane never picked up master key {key_id}")


async def test_rotation_rewraps_everything_without_a_change_and_survives_a_restart(
    make_harness: HarnessFactory, store_url: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "master.keyring"  # absent: the single key K0 is the ring
    plane = await _plane(make_harness, store_url, keyring)
    created = await _keys(plane, 120)
    await plane.tenant("beta")
    # Two secrets in the format keyplane wrote before the keyring.
    for n in (0, 1):
        key = replace(f.provider_key(f"pk_legacy{n}", tenant="beta", label=f"legacy{n}"), base_url="")
        secret = _secret(900 + n)
        await plane.plane.store.create_provider_key(replace(key, secret_ciphertext=SecretBox(K0).seal(secret, key.id)))
    await plane.plane.hub.catch_up()
    total = 122
    expected = {k.id: _secret(n) for n, k in enumerate(created)} | {
        "pk_legacy0": _secret(900),
        "pk_legacy1": _secret(901),
    }
    assert await _status(plane) == (LEGACY, {LEGACY: total}, total)
    assert await _snapshot_secrets(plane) == expected

    watcher = plane.watch()
    await next_message(watcher)  # the snapshot
    version = await plane.latest_version()
    etags = {k.id: k.etag for k in created}

    # A key added on disk is used without a restart.
    write_keyring_file(keyring, [(LEGACY, K0), ("k1", K1)])
    await _wait_primary(plane, "k1")
    fresh = await plane.key("beta", label="fresh", secret=_secret(999))
    expected[fresh.id] = _secret(999)
    total += 1
    version = await plane.latest_version()
    await next_message(watcher)  # its delta
    stored = await plane.plane.store.get_provider_key("beta", fresh.id)
    assert ciphertext_key_id(stored.secret_ciphertext) == "k1"
    assert await _status(plane) == ("k1", {LEGACY: total - 1, "k1": 1}, total)

    # Rewrap: 50 a transaction, across several calls when the time budget runs out.
    totals = await _rewrap_all(plane, primary_key_id="k1", batch_size=50)
    assert totals["examined"] == total
    assert totals["rewrapped"] == total - 1 and totals["already_current"] == 1
    assert totals["skipped_changed"] == totals["unreadable"] == 0
    assert await _status(plane) == ("k1", {LEGACY: 0, "k1": total}, total)
    # Nothing a sidecar could see: no change row, same etags, no message on the stream.
    assert await plane.latest_version() == version
    listed = await plane.admin.ListProviderKeys(apb.ListProviderKeysRequest(tenant="acme"), metadata=ADMIN_MD)
    assert {k.id: k.etag for k in listed.keys} == etags
    with pytest.raises(TimeoutError):
        await next_message(watcher, within=0.3)
    assert await _snapshot_secrets(plane) == expected

    # Idempotent: again, nothing to do.
    again = await _rewrap_all(plane)
    assert (again["rewrapped"], again["already_current"]) == (0, total)

    # Retired on disk: a restarted control plane with only the new key opens everything.
    await plane.plane.stop(grace=0)
    write_keyring_file(keyring, [("k1", K1)])
    restarted = await _plane(make_harness, store_url, keyring, master_key=b"")
    assert restarted.plane.master_keys.current().ids == ("k1",)
    assert await _snapshot_secrets(restarted) == expected
    assert await _status(restarted) == ("k1", {"k1": total}, total)


async def test_rewrap_preconditions_and_arguments(make_harness: HarnessFactory, store_url: str, tmp_path: Path) -> None:
    keyring = tmp_path / "master.keyring"
    write_keyring_file(keyring, [("k0", K0)])
    plane = await _plane(make_harness, store_url, keyring, master_key=b"")
    with pytest.raises(aio.AioRpcError) as info:
        await plane.admin.RewrapSecrets(apb.RewrapSecretsRequest(primary_key_id="k1"), metadata=ADMIN_MD)
    code, details = rpc_error(info)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'k0', not 'k1'" in details and "re-read the keyring file" in details
    for bad in ({"batch_size": 1001}, {"batch_size": -1}, {"page_token": "has space"}):
        with pytest.raises(aio.AioRpcError) as info:
            await plane.admin.RewrapSecrets(apb.RewrapSecretsRequest(**bad), metadata=ADMIN_MD)
        code, details = rpc_error(info)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.split(":")[0].split()[0] in bad
    empty = await _rewrap_all(plane)
    assert empty["examined"] == 0


async def test_a_secret_under_an_unknown_master_key_is_not_sent_and_not_rewrapped(
    make_harness: HarnessFactory, store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keyring = tmp_path / "master.keyring"
    write_keyring_file(keyring, [("k0", K0)])
    plane = await _plane(make_harness, store_url, keyring, master_key=b"")
    good = (await _keys(plane, 1))[0]
    ghost = replace(f.provider_key("pk_ghost", label="ghost"), base_url="")
    sealed = Keyring([("ghost-key", os.urandom(32))]).seal("sk-ghost-SECRET-value", ghost.id)
    caplog.set_level(logging.INFO)
    await plane.plane.store.create_provider_key(replace(ghost, secret_ciphertext=sealed))
    await plane.plane.hub.catch_up()
    assert await _snapshot_secrets(plane) == {good.id: _secret(0)}  # the ghost key is not sent
    assert "pk_ghost" in caplog.text and "ghost-key" in caplog.text and "not in the keyring" in caplog.text
    resp = await plane.admin.GetMasterKeyStatus(apb.GetMasterKeyStatusRequest(), metadata=ADMIN_MD)
    assert [(u.key_id, u.secrets, u.in_keyring) for u in resp.usage] == [("k0", 1, True), ("ghost-key", 1, False)]
    assert (list(resp.keyring_key_ids), resp.primary_key_id, resp.total_secrets) == (["k0"], "k0", 2)

    write_keyring_file(keyring, [("k0", K0), ("k1", K1)])
    await _wait_primary(plane, "k1")
    totals = await _rewrap_all(plane, primary_key_id="k1")
    assert (totals["rewrapped"], totals["unreadable"]) == (1, 1)
    assert "sk-ghost-SECRET-value" not in caplog.text
    stored = await plane.plane.store.get_provider_key("acme", "pk_ghost")
    assert stored.secret_ciphertext == sealed  # left alone


async def test_rewrap_races_rotations_and_the_rotation_always_wins(
    make_harness: HarnessFactory, store_url: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "master.keyring"
    write_keyring_file(keyring, [("k0", K0)])
    plane = await _plane(make_harness, store_url, keyring, master_key=b"")
    created = await _keys(plane, 120)
    write_keyring_file(keyring, [("k0", K0), ("k1", K1)])
    await _wait_primary(plane, "k1")
    rotated = {k.id: f"sk-rotated-{n:04d}-NEWSECRET" for n, k in enumerate(created) if n % 3 == 0}

    async def rotate(key_id: str, secret: str) -> None:
        await plane.admin.UpdateProviderKey(
            apb.UpdateProviderKeyRequest(tenant="acme", id=key_id, new_secret=secret), metadata=ADMIN_MD
        )

    # Rewrap in small batches while the rotations run.
    rewraps = [
        asyncio.create_task(master_keys.rewrap_secrets(plane.plane.store, plane.plane.master_keys, batch_size=5))
        for _ in range(3)
    ]
    await asyncio.gather(*(rotate(k, s) for k, s in rotated.items()))
    results = await asyncio.gather(*rewraps)
    assert all(r.unreadable == 0 and r.examined == len(created) for r in results)

    expected = {k.id: rotated.get(k.id, _secret(n)) for n, k in enumerate(created)}
    assert await _snapshot_secrets(plane) == expected
    for key in await plane.plane.store.list_provider_keys("acme"):
        assert ciphertext_key_id(key.secret_ciphertext) == "k1"  # rotations seal with the new primary too
        assert plane.plane.master_keys.open(key.secret_ciphertext, key.id) == expected[key.id]
        assert key.revision == (2 if key.id in rotated else 1)
    assert (await _status(plane))[1] == {"k0": 0, "k1": len(created)}


async def test_rewrap_is_batched_and_resumes_where_it_stopped(
    make_harness: HarnessFactory, store_url: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "master.keyring"
    write_keyring_file(keyring, [("k0", K0)])
    plane = await _plane(make_harness, store_url, keyring, master_key=b"")
    await _keys(plane, 25)
    write_keyring_file(keyring, [("k0", K0), ("k1", K1)])
    await _wait_primary(plane, "k1")
    store, keys = plane.plane.store, plane.plane.master_keys
    # No time budget: one transaction of 10 per call, then where it stopped.
    first = await master_keys.rewrap_secrets(store, keys, batch_size=10, time_budget=0)
    assert (first.examined, first.rewrapped) == (10, 10) and first.next_after
    assert (await _status(plane))[1] == {"k0": 15, "k1": 10}
    # Interrupted: a new run from the start skips what is done and finishes the rest.
    rerun = await master_keys.rewrap_secrets(store, keys, batch_size=10)
    assert (rerun.examined, rerun.already_current, rerun.rewrapped, rerun.next_after) == (25, 10, 15, "")
    assert (await _status(plane))[1] == {"k0": 0, "k1": 25}


async def test_master_key_rpcs_need_the_admin_token(harness: Harness) -> None:
    for call, request in (
        (harness.admin.GetMasterKeyStatus, apb.GetMasterKeyStatusRequest()),
        (harness.admin.RewrapSecrets, apb.RewrapSecretsRequest()),
    ):
        for metadata in ((), SIDECAR_ALL_MD):
            with pytest.raises(aio.AioRpcError) as info:
                await call(request, metadata=metadata)  # type: ignore[arg-type]
            assert rpc_error(info)[0] in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


async def test_each_rewrap_batch_is_audited_with_its_write(
    make_harness: HarnessFactory, store_url: str, tmp_path: Path
) -> None:
    keyring = tmp_path / "master.keyring"
    write_keyring_file(keyring, [("k0", K0)])
    plane = await _plane(make_harness, store_url, keyring, master_key=b"")
    await _keys(plane, 12)
    write_keyring_file(keyring, [("k0", K0), ("k1", K1)])
    await _wait_primary(plane, "k1")

    async def rewrap_events() -> list[rpb.AuditEvent]:
        listed = await plane.admin.ListAuditEvents(
            apb.ListAuditEventsRequest(resource_kind="master_key"), metadata=ADMIN_MD
        )
        return list(listed.events)

    response = await plane.admin.RewrapSecrets(apb.RewrapSecretsRequest(batch_size=5), metadata=ADMIN_MD)
    assert (response.rewrapped, response.next_page_token) == (12, "")
    events = await rewrap_events()
    # Three transactions (5 + 5 + 2 secrets), one event each, written with them.
    assert [(e.method, e.resource_id, e.result, list(e.fields)) for e in events] == [
        ("RewrapSecrets", "k1", "ok", ["secret_ciphertext"])
    ] * 3
    assert {e.caller for e in events} == {"admin-token:bootstrap"}
    # Nothing left to rewrap: nothing written, nothing audited.
    again = await plane.admin.RewrapSecrets(apb.RewrapSecretsRequest(), metadata=ADMIN_MD)
    assert (again.rewrapped, again.already_current) == (0, 12)
    assert len(await rewrap_events()) == 3
    # A refused call is audited as such.
    with pytest.raises(aio.AioRpcError):
        await plane.admin.RewrapSecrets(apb.RewrapSecretsRequest(primary_key_id="k9"), metadata=ADMIN_MD)
    events = await rewrap_events()
    assert (events[0].method, events[0].result) == ("RewrapSecrets", "FAILED_PRECONDITION")
