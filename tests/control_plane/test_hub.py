"""SnapshotHub against a real SQLite store, without gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane import hub as hub_module
from control_plane.hub import SnapshotHub
from control_plane.snapshot_cache import Subscription
from control_plane.store import SqliteStore
from keyplane.crypto import SecretBox, fingerprint, last4
from keyplane.domain import ClientKey, KeyStatus, Provider, ProviderKey, Route, RouteTarget, Tenant
from keyplane.v1 import sidecar_service_pb2 as spb

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
SECRET = "sk-hub-TOPSECRET-abcdef0123456789"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "hub.db"))
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(32))


def _key(box: SecretBox, key_id: str, *, tenant: str = "acme", label: str = "", secret: str = SECRET) -> ProviderKey:
    return ProviderKey(
        id=key_id,
        tenant=tenant,
        provider=Provider.OPENAI,
        label=label or key_id,
        base_url="",
        status=KeyStatus.ACTIVE,
        weight=1,
        allowed_models=(),
        secret_ciphertext=box.seal(secret, associated_data=key_id),
        fingerprint=fingerprint(secret),
        last4=last4(secret),
        created_at=NOW,
        updated_at=NOW,
    )


def _route(route_id: str, tenant: str = "acme") -> Route:
    return Route(
        id=route_id,
        tenant=tenant,
        public_model=f"model-{route_id}",
        targets=(RouteTarget(Provider.VLLM, "llama", node_urls=("http://10.0.0.1:8000",)),),
        created_at=NOW,
        updated_at=NOW,
    )


async def _next(subscription: Subscription, within: float = 1.0) -> spb.WatchResponse:
    message = await asyncio.wait_for(subscription.next(), within)
    assert message is not None
    return message


@pytest.fixture
async def hub(store: SqliteStore, box: SecretBox) -> AsyncIterator[SnapshotHub]:
    hub = SnapshotHub(store, box, max_pending=5, log_size=50)
    await hub.start()
    yield hub
    await hub.close()


async def test_start_loads_everything_and_snapshots_come_from_memory(store: SqliteStore, box: SecretBox) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    await store.create_tenant(Tenant("empty", NOW))
    await store.create_provider_key(_key(box, "pk_1"))
    await store.create_route(_route("rt_1"))
    await store.create_client_key(ClientKey("ck_1", "acme", "app", "kp-abcdefg", b"\x01" * 32, NOW))
    hub = SnapshotHub(store, box)
    await hub.start()
    try:
        assert hub.version == await store.latest_version()
        await store.close()  # the database is gone: snapshots still work
        message = hub.cache.snapshot(None)
        assert message.version == hub.version
        acme, empty = message.snapshot.tenants
        assert (acme.tenant, empty.tenant) == ("acme", "empty")
        assert list(empty.keys) == [] and list(empty.routes) == []
        assert [(k.id, k.secret) for k in acme.keys] == [("pk_1", SECRET)]
        assert [r.id for r in acme.routes] == ["rt_1"]
        assert list(acme.routes[0].targets[0].node_urls) == ["http://10.0.0.1:8000"]
        assert [(c.id, c.token_sha256) for c in acme.client_keys] == [("ck_1", b"\x01" * 32)]
        only_empty = hub.cache.snapshot(frozenset({"empty", "gone"}))
        assert [t.tenant for t in only_empty.snapshot.tenants] == ["empty"]
    finally:
        await hub.close()


async def test_catch_up_publishes_in_version_order(hub: SnapshotHub, store: SqliteStore, box: SecretBox) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    await hub.catch_up()
    subscription = hub.cache.subscribe(None, 0, sidecar_id="s1")
    assert (await _next(subscription)).snapshot.tenants[0].tenant == "acme"

    await store.create_provider_key(_key(box, "pk_1"))
    await store.create_route(_route("rt_1"))
    await store.delete_route("acme", "rt_1")
    version = await hub.catch_up()
    message = await _next(subscription)
    assert message.version == version == await store.latest_version()
    kinds = [c.WhichOneof("change") for c in message.delta.changes]
    # The route PUT re-reads a route that no longer exists: only its delete is sent.
    assert kinds == ["key_put", "route_deleted"]
    assert [c.version for c in message.delta.changes] == sorted(c.version for c in message.delta.changes)

    await store.delete_tenant("acme")
    await hub.catch_up()
    message = await _next(subscription)
    assert [c.tenant_deleted for c in message.delta.changes] == [True]
    assert not hub.cache.has_tenant("acme")
    assert list(hub.cache.snapshot(None).snapshot.tenants) == []

    subscription.close()
    assert hub.cache.connected() == []
    assert await subscription.next() is None


async def test_slow_subscriber_gets_one_snapshot_and_never_blocks(
    hub: SnapshotHub, store: SqliteStore, box: SecretBox
) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    await hub.catch_up()
    slow = hub.cache.subscribe(None, 0, sidecar_id="slow")
    fast = hub.cache.subscribe(frozenset({"acme"}), 0, sidecar_id="fast")
    await _next(slow)
    await _next(fast)
    for n in range(20):  # max_pending is 5
        await store.create_provider_key(_key(box, f"pk_{n}"))
        await asyncio.wait_for(hub.catch_up(), 1.0)  # publishing never waits for a reader
        message = await _next(fast)
        assert [c.key_put.id for c in message.delta.changes] == [f"pk_{n}"]
    assert slow.pending == 0  # dropped in favour of a snapshot
    message = await _next(slow)
    assert message.WhichOneof("payload") == "snapshot"
    assert message.version == hub.version
    assert len(message.snapshot.tenants[0].keys) == 20
    # After the snapshot, deltas flow again.
    await store.create_provider_key(_key(box, "pk_last"))
    await hub.catch_up()
    assert [c.key_put.id for c in (await _next(slow)).delta.changes] == ["pk_last"]
    infos = {i.sidecar_id: i for i in hub.cache.connected()}
    assert infos["slow"].version == hub.version  # fast has not read pk_last yet
    assert infos["fast"].version == hub.version - 1
    assert infos["fast"].tenants == frozenset({"acme"})


async def test_a_few_pending_changes_are_coalesced_into_one_delta(
    hub: SnapshotHub, store: SqliteStore, box: SecretBox
) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    await hub.catch_up()
    subscription = hub.cache.subscribe(None, hub.version)
    assert list((await _next(subscription)).delta.changes) == []
    for n in range(3):
        await store.create_provider_key(_key(box, f"pk_{n}"))
        await hub.catch_up()
    message = await _next(subscription)
    assert [c.key_put.id for c in message.delta.changes] == ["pk_0", "pk_1", "pk_2"]


async def test_resume_too_far_back_for_the_queue_gets_a_snapshot(
    hub: SnapshotHub, store: SqliteStore, box: SecretBox
) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    await hub.catch_up()
    held = hub.version
    for n in range(8):  # inside the ring (50) but more than max_pending (5)
        await store.create_provider_key(_key(box, f"pk_{n}"))
    await hub.catch_up()
    assert (await _next(hub.cache.subscribe(None, held))).WhichOneof("payload") == "snapshot"
    assert (await _next(hub.cache.subscribe(None, held + 5))).WhichOneof("payload") == "delta"


async def test_catch_up_pages_through_a_long_log(
    hub: SnapshotHub, store: SqliteStore, box: SecretBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "_PAGE", 2)
    await store.create_tenant(Tenant("acme", NOW))
    for n in range(5):
        await store.create_route(_route(f"rt_{n}"))
    assert await hub.catch_up() == await store.latest_version()
    assert len(hub.cache.snapshot(None).snapshot.tenants[0].routes) == 5


async def test_a_key_that_does_not_open_is_not_sent(
    store: SqliteStore, box: SecretBox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await store.create_tenant(Tenant("acme", NOW))
    good = _key(box, "pk_good", label="good")
    moved = _key(box, "pk_bad", label="bad")
    # A ciphertext sealed for another key id must not open for this one.
    await store.create_provider_key(good)
    await store.create_provider_key(dataclasses.replace(moved, secret_ciphertext=good.secret_ciphertext))
    hub = SnapshotHub(store, box)
    await hub.start()
    keys = hub.cache.snapshot(None).snapshot.tenants[0].keys
    assert [k.id for k in keys] == ["pk_good"]
    await hub.close()
    assert "pk_bad" in caplog.text and SECRET not in caplog.text


async def test_subscribe_after_close_ends_at_once(hub: SnapshotHub) -> None:
    await hub.close()
    assert await hub.cache.subscribe(None, 0).next() is None


async def test_the_poller_picks_up_writes_nobody_announced(store: SqliteStore, box: SecretBox) -> None:
    await store.create_tenant(Tenant("acme", NOW))
    hub = SnapshotHub(store, box, poll_interval=0.02)
    await hub.start()
    try:
        subscription = hub.cache.subscribe(None, hub.version)
        await _next(subscription)
        await store.create_route(_route("rt_1"))  # no catch_up() call
        message = await _next(subscription, within=1.0)
        assert [c.route_put.id for c in message.delta.changes] == ["rt_1"]
    finally:
        await hub.close()
