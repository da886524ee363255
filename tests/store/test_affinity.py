"""Affinity in the store (issue 14): nodes, node health and bindings,
conformance of both stores (SQLite and Postgres); the cross-connection lock
on Postgres."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from control_plane.store import Store
from control_plane.store.base import BindingFilter
from keyplane.affinity import BindingKey, BindingResult, NodeHealth, NodeState, SelfHostedNode, node_id_for
from keyplane.domain import ChangeOp, EntityKind, HealthState
from keyplane.errors import Aborted, FailedPrecondition, NotFound
from tests.store import factories as f
from tests.store.conftest import Backend

URL1 = "http://10.0.0.1:8000"
URL2 = "http://10.0.0.2:8000"
N1 = node_id_for("rt_1", URL1)
N2 = node_id_for("rt_1", URL2)
KEY = BindingKey("acme", "ck_1", "chat")
TTL = timedelta(minutes=5)
POOL = [("llama-3-70b", URL1), ("llama-3-70b", URL2)]


async def setup(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_route(f.route())
    await store.create_client_key(f.client_key())
    await store.sync_route_nodes("acme", "rt_1", POOL, f.ts(1))


async def changes_after(store: Store, version: int) -> list[tuple[EntityKind, str, ChangeOp]]:
    return [(c.kind, c.entity_id, c.op) for c in await store.changes_since(version)]


async def test_route_nodes_follow_node_urls(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_route(f.route())
    before = await store.latest_version()
    versions = await store.sync_route_nodes("acme", "rt_1", POOL, f.ts(1))
    assert len(versions) == 2
    nodes = await store.list_nodes("acme")
    assert {n.id for n in nodes} == {N1, N2}
    assert all(n.state is NodeState.ACTIVE and n.from_route and n.route_id == "rt_1" for n in nodes)
    assert await changes_after(store, before) == [
        (EntityKind.NODE, N1, ChangeOp.PUT),
        (EntityKind.NODE, N2, ChangeOp.PUT),
    ]
    # Idempotent; a URL dropped from node_urls removes its node.
    assert await store.sync_route_nodes("acme", "rt_1", POOL, f.ts(2)) == []
    assert len(await store.sync_route_nodes("acme", "rt_1", POOL[:1], f.ts(3))) == 1
    assert [n.id for n in await store.list_nodes("acme")] == [N1]
    removed = await store.get_node("acme", N2)
    assert removed.state is NodeState.REMOVED and removed.revision == 2
    with pytest.raises(NotFound):
        await store.sync_route_nodes("acme", "rt_nope", POOL, f.ts(4))


async def test_add_drain_remove_node(store: Store) -> None:
    await setup(store)
    url = "http://10.0.0.3:8000"
    node = SelfHostedNode(
        node_id_for("rt_1", url), "acme", "rt_1", url, "llama-3-70b", NodeState.ACTIVE, False, f.ts(5), f.ts(5)
    )
    added, version = await store.add_node(node)
    assert version is not None and added.id == node.id and not added.from_route
    again, version = await store.add_node(node)
    assert version is None and again == added
    drained, _, version = await store.set_node_state("acme", node.id, NodeState.DRAINING, f.ts(6))
    assert drained.state is NodeState.DRAINING and drained.revision == 2 and version is not None
    with pytest.raises(Aborted):
        await store.set_node_state("acme", node.id, NodeState.REMOVED, f.ts(7), expected_revision=1)
    removed, _, _ = await store.set_node_state("acme", node.id, NodeState.REMOVED, f.ts(7), expected_revision=2)
    assert removed.state is NodeState.REMOVED
    assert node.id not in {n.id for n in await store.list_nodes("acme")}
    assert node.id in {n.id for n in await store.list_nodes("acme", include_removed=True)}
    back, version = await store.add_node(node)
    assert back.state is NodeState.ACTIVE and version is not None
    with pytest.raises(NotFound):
        await store.set_node_state("acme", "nd_nope", NodeState.DRAINING, f.ts(8))


async def test_node_health_roundtrip(store: Store) -> None:
    await setup(store)
    before = await store.latest_version()
    health = NodeHealth("acme", N1, HealthState.COOLDOWN, f.ts(60), "503 upstream_error", f.ts(2))
    assert await store.put_node_health(health) is not None
    assert await store.put_node_health(health) is None  # unchanged: nothing logged
    assert await store.get_node_health("acme", N1) == health
    assert await store.list_node_health("acme") == [health]
    healthy = NodeHealth("acme", N1, HealthState.HEALTHY, None, "", f.ts(3))
    assert await store.put_node_health(healthy) is not None
    assert await store.get_node_health("acme", N1) is None
    assert await changes_after(store, before) == [
        (EntityKind.NODE_HEALTH, N1, ChangeOp.PUT),
        (EntityKind.NODE_HEALTH, N1, ChangeOp.DELETE),
    ]
    with pytest.raises(NotFound):
        await store.put_node_health(NodeHealth("acme", "nd_x", HealthState.UNHEALTHY, None, "", f.ts(3)))


async def test_claim_creates_once_then_hits_and_moves(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    assert await store.find_binding(KEY) is None
    before = await store.latest_version()
    binding, result = await store.claim_binding(KEY, frozenset({N1, N2}), N1, now, now + TTL)
    assert result is BindingResult.CREATED and binding.node_id == N1 and binding.node_url == URL1
    assert await changes_after(store, before) == []  # creations are not logged
    # A second claim (another replica that missed too) finds it under the lock.
    again, result = await store.claim_binding(KEY, frozenset({N1, N2}), N2, now, now + TTL)
    assert result is BindingResult.HIT and again == binding
    view = await store.find_binding(KEY)
    assert view is not None and view.binding == binding and view.node_state is NodeState.ACTIVE
    assert view.node_health is None
    # N1 excluded (unhealthy): moved to N2, logged once.
    moved, result = await store.claim_binding(KEY, frozenset({N2}), N2, now, now + TTL)
    assert result is BindingResult.MOVED and moved.node_id == N2 and moved.moves == 1
    assert await changes_after(store, before) == [(EntityKind.BINDING, "ck_1/chat", ChangeOp.PUT)]
    # Expired: replaced as a creation.
    later = now + TTL + timedelta(seconds=1)
    fresh, result = await store.claim_binding(KEY, frozenset({N1, N2}), N1, later, later + TTL)
    assert result is BindingResult.CREATED and fresh.node_id == N1 and fresh.moves == 0


async def test_claim_checks_client_key_and_node(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    with pytest.raises(NotFound):
        await store.claim_binding(BindingKey("acme", "ck_nope", "chat"), frozenset(), N1, now, now + TTL)
    await store.set_node_state("acme", N2, NodeState.DRAINING, now)
    with pytest.raises(FailedPrecondition):
        await store.claim_binding(KEY, frozenset({N1}), N2, now, now + TTL)
    assert await store.find_binding(KEY) is None


async def test_find_binding_carries_node_state_and_health(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    await store.claim_binding(KEY, frozenset({N1}), N1, now, now + TTL)
    await store.put_node_health(NodeHealth("acme", N1, HealthState.UNHEALTHY, None, "connect error", now))
    await store.set_node_state("acme", N1, NodeState.DRAINING, now)
    view = await store.find_binding(KEY)
    assert view is not None and view.node_state is NodeState.DRAINING
    assert view.node_health is not None and view.node_health.state is HealthState.UNHEALTHY


async def test_refresh_extends_only_active_matching_bindings(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    await store.create_client_key(f.client_key("ck_2", label="two", n=1))
    key2 = BindingKey("acme", "ck_2", "chat")
    await store.claim_binding(KEY, frozenset({N1}), N1, now, now + TTL)
    await store.claim_binding(key2, frozenset({N2}), N2, now, now + TTL)
    await store.set_node_state("acme", N2, NodeState.DRAINING, now)
    later = now + timedelta(minutes=1)
    gone_key = BindingKey("acme", "ck_1", "other-model")
    refreshed, current, gone = await store.refresh_bindings(
        [(KEY, N1), (KEY, N1), (key2, N2), (gone_key, N1)], later, later + TTL
    )
    assert refreshed == 1
    assert [b.key for b in current] == [key2] and current[0].expires_at == now + TTL  # draining: not extended
    assert gone == [(gone_key, N1)]
    view = await store.find_binding(KEY)
    assert view is not None and view.binding.expires_at == later + TTL
    # A ref naming another node than the binding's does not refresh it.
    refreshed, current, _ = await store.refresh_bindings([(KEY, N2)], later, later + TTL * 2)
    assert refreshed == 0 and current[0].node_id == N1


async def test_cascades_client_key_node_route(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    await store.create_client_key(f.client_key("ck_2", label="two", n=1))
    await store.claim_binding(KEY, frozenset({N1}), N1, now, now + TTL)
    await store.claim_binding(BindingKey("acme", "ck_2", "chat"), frozenset({N2}), N2, now, now + TTL)
    await store.delete_client_key("acme", "ck_1")
    assert await store.find_binding(KEY) is None
    assert await store.count_bindings("acme", now) == {N2: 1}
    _, deleted, _ = await store.set_node_state("acme", N2, NodeState.REMOVED, now)
    assert deleted == 1 and await store.count_bindings("acme", now) == {}
    await store.claim_binding(BindingKey("acme", "ck_2", "chat"), frozenset({N1}), N1, now, now + TTL)
    await store.delete_route("acme", "rt_1")
    assert await store.count_bindings("acme", now) == {}
    assert await store.list_nodes("acme", include_removed=True) == []


async def test_list_delete_and_sweep(store: Store) -> None:
    await setup(store)
    now = f.ts(10)
    for i in range(5):
        await store.create_client_key(f.client_key(f"ck_{i + 2}", label=f"l{i}", n=i + 1))
        ttl = timedelta(seconds=1) if i < 3 else TTL
        await store.claim_binding(BindingKey("acme", f"ck_{i + 2}", "chat"), frozenset({N1}), N1, now, now + ttl)
    await store.claim_binding(KEY, frozenset({N2}), N2, now, now + TTL)
    page = await store.list_bindings(BindingFilter("acme"), limit=4)
    assert [b.key.client_key_id for b in page] == ["ck_1", "ck_2", "ck_3", "ck_4"]
    rest = await store.list_bindings(BindingFilter("acme"), after=("ck_4", "chat"))
    assert [b.key.client_key_id for b in rest] == ["ck_5", "ck_6"]
    assert [b.key.client_key_id for b in await store.list_bindings(BindingFilter("acme", node_id=N2))] == ["ck_1"]
    # Sweep: bounded batches of expired ones only.
    later = now + timedelta(seconds=2)
    assert await store.sweep_bindings(later, limit=2) == 2
    assert await store.sweep_bindings(later, limit=2) == 1
    assert await store.sweep_bindings(later, limit=2) == 0
    assert sum((await store.count_bindings("acme", later)).values()) == 3
    before = await store.latest_version()
    deleted, version = await store.delete_bindings(BindingFilter("acme", node_id=N1))
    assert deleted == 2 and version is not None
    assert await changes_after(store, before) == [
        (EntityKind.BINDING, "ck_5/chat", ChangeOp.DELETE),
        (EntityKind.BINDING, "ck_6/chat", ChangeOp.DELETE),
    ]
    with pytest.raises(NotFound):
        await store.list_bindings(BindingFilter("nope"))


async def test_bindings_survive_a_restart(backend: Backend) -> None:
    store = backend.open()
    await store.migrate()
    await setup(store)
    now = f.ts(10)
    binding, _ = await store.claim_binding(KEY, frozenset({N1}), N1, now, now + TTL)
    await store.close()
    reopened = backend.open()
    await reopened.migrate()
    view = await reopened.find_binding(KEY)
    assert view is not None and view.binding == binding


async def test_concurrent_claims_from_two_stores_make_one_binding(backend: Backend) -> None:
    """Two stores on one database (two replicas on Postgres; on SQLite two
    connections of one file): 50 concurrent claims with different candidates
    all get the one node the first claim chose."""
    first, second = backend.open(), backend.open()
    await first.migrate()
    await setup(first)
    await second.migrate()
    now = f.ts(10)
    candidates = [N1, N2]

    async def claim(i: int) -> str:
        store = first if i % 2 else second
        binding, _ = await store.claim_binding(KEY, frozenset(candidates), candidates[i % 2], now, now + TTL)
        return binding.node_id

    nodes = await asyncio.gather(*(claim(i) for i in range(50)))
    assert len(set(nodes)) == 1
    assert len(await first.list_bindings(BindingFilter("acme"))) == 1
