"""Affinity bindings through the real control plane over gRPC (issue 14):
concurrent misses agree on one node (two replicas on one Postgres; SQLite),
hits take no lock and write nothing, unusable nodes move the binding without
flapping back, draining, removing, cascade, sweep and restart."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc import aio

from control_plane.binding_sweep import LEASE as SWEEP_LEASE
from control_plane.server import ControlPlane
from control_plane.store import PostgresStore
from keyplane.affinity import BindingKey, NodeHealth, node_id_for
from keyplane.domain import HealthState, Provider, Route, RouteTarget
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import admin_service_pb2_grpc, sidecar_service_pb2_grpc
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.affinity_helpers import (
    MODEL,
    URLS,
    bind,
    list_bindings,
    make_pool,
    new_client_key,
    wait_for_nodes,
)
from tests.control_plane.conftest import (
    ADMIN_MD,
    SIDECAR_ACME_MD,
    SIDECAR_ALL_MD,
    Harness,
    HarnessFactory,
    make_config,
    next_message,
    rpc_error,
)
from tests.control_plane.test_replicas_postgres import PG_DSN, pg_url  # noqa: F401  (fixture)

HIT = spb.BINDING_RESULT_HIT
CREATED = spb.BINDING_RESULT_CREATED
MOVED = spb.BINDING_RESULT_MOVED


async def _fifty_concurrent(harnesses: Sequence[Harness], client_key_id: str) -> list[spb.GetOrCreateBindingResponse]:
    return list(await asyncio.gather(*(bind(harnesses[i % len(harnesses)], client_key_id) for i in range(50))))


async def test_fifty_concurrent_misses_through_two_replicas_on_postgres_make_one_binding(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key)
    two = await make_harness(store_url=pg_url, master_key=master_key)
    pool = await make_pool(one)
    await wait_for_nodes(two, 3)

    answers = await _fifty_concurrent((one, two), pool.client_key_id)

    nodes = {a.binding.node_id for a in answers}
    results = [spb.BindingResult.Name(a.result) for a in answers]
    counts = {r: results.count(r) for r in sorted(set(results))}
    assert len(nodes) == 1 and nodes <= set(pool.node_ids)
    assert results.count("BINDING_RESULT_CREATED") == 1 and results.count("BINDING_RESULT_HIT") == 49
    schema = pg_url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(PG_DSN)
    try:
        rows = await conn.fetchval(f'SELECT count(*) FROM "{schema}".bindings')
    finally:
        await conn.close()
    assert rows == 1
    stats = [
        await h.admin.GetBindingStats(apb.GetBindingStatsRequest(tenant="acme"), metadata=ADMIN_MD) for h in (one, two)
    ]
    # Hits: found by the lock-free read; misses: took the lock (one created,
    # the others found it there).
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    print(
        f"50 concurrent first requests over 2 replicas: {len(nodes)} node, {rows} row, {counts}, "
        f"lock-free hits {hits}, serialized misses {misses}"
    )
    assert sum(s.created for s in stats) == 1 and hits + misses == 50
    assert stats[0].bindings == stats[1].bindings == 1


async def test_fifty_concurrent_misses_on_sqlite_make_one_binding(harness: Harness) -> None:
    pool = await make_pool(harness)
    answers = await _fifty_concurrent((harness,), pool.client_key_id)
    assert len({a.binding.node_id for a in answers}) == 1
    assert [a.result for a in answers].count(CREATED) == 1
    assert len(await list_bindings(harness)) == 1


class _Counting:
    """Counts what the binding path does against the real store: advisory
    locks of a triple, claims, and statements writing the bindings table."""

    locks = 0
    claims = 0
    finds = 0
    binding_writes = 0

    def _note(self, sql: str) -> None:
        head = sql.lstrip().upper()
        if head.startswith(("INSERT INTO BINDINGS", "UPDATE BINDINGS", "DELETE FROM BINDINGS")):
            type(self).binding_writes += 1


class CountingPostgres(_Counting, PostgresStore):
    async def _lock_binding(self, conn: Any, key: BindingKey) -> None:
        type(self).locks += 1
        await super()._lock_binding(conn, key)

    async def _execute(self, conn: Any, sql: str, params: Sequence[Any]) -> int:
        self._note(sql)
        return await super()._execute(conn, sql, params)

    async def find_binding(self, key: BindingKey) -> Any:
        type(self).finds += 1
        return await super().find_binding(key)

    async def claim_binding(self, *args: Any) -> Any:
        type(self).claims += 1
        return await super().claim_binding(*args)


@pytest.fixture
async def counted_plane(tmp_path: Path, pg_url: str) -> AsyncIterator[Harness]:  # noqa: F811
    schema = pg_url.rsplit("schema=", 1)[1]
    store = CountingPostgres(PG_DSN, schema=schema)
    plane = ControlPlane(make_config(tmp_path, store_url=pg_url), store=store)
    await plane.start()
    channel = aio.insecure_channel(plane.address)
    try:
        yield Harness(
            plane=plane,
            channel=channel,
            admin=admin_service_pb2_grpc.AdminServiceStub(channel),
            sidecar=sidecar_service_pb2_grpc.SidecarServiceStub(channel),
        )
    finally:
        await channel.close(grace=None)
        await plane.stop(grace=0.2)


async def test_a_hit_takes_no_advisory_lock_and_writes_nothing(counted_plane: Harness) -> None:
    pool = await make_pool(counted_plane)
    first = await bind(counted_plane, pool.client_key_id)
    assert first.result == CREATED
    assert (CountingPostgres.locks, CountingPostgres.claims) == (1, 1)
    CountingPostgres.locks = CountingPostgres.claims = CountingPostgres.finds = CountingPostgres.binding_writes = 0

    for _ in range(20):
        again = await bind(counted_plane, pool.client_key_id)
        assert again.result == HIT and again.binding.node_id == first.binding.node_id
    print(
        f"20 hits: finds={CountingPostgres.finds} locks={CountingPostgres.locks} "
        f"claims={CountingPostgres.claims} binding writes={CountingPostgres.binding_writes}"
    )
    assert CountingPostgres.finds == 20
    assert (CountingPostgres.locks, CountingPostgres.claims, CountingPostgres.binding_writes) == (0, 0, 0)


async def test_an_unhealthy_node_moves_the_binding_and_it_does_not_flap_back(harness: Harness) -> None:
    pool = await make_pool(harness)
    call = harness.watch(("acme",))
    snapshot = await next_message(call)
    assert {n.id for n in snapshot.snapshot.tenants[0].nodes} == set(pool.node_ids)
    first = await bind(harness, pool.client_key_id)
    old = first.binding.node_id
    store = harness.plane.store
    now = datetime.now(UTC)
    await store.put_node_health(NodeHealth("acme", old, HealthState.COOLDOWN, now + timedelta(minutes=1), "503", now))
    await harness.plane.hub.catch_up()
    health = await next_message(call)
    assert health.delta.changes[0].node_health.node_id == old

    moved = await bind(harness, pool.client_key_id)
    assert moved.result == MOVED and moved.binding.node_id != old and moved.binding.moves == 1
    # Sidecars holding the binding hear of the move.
    put = await next_message(call)
    assert put.delta.changes[0].binding_put.node_id == moved.binding.node_id
    assert put.delta.changes[0].binding_put.client_key_id == pool.client_key_id

    # The old node recovers before the binding expires: the binding stays.
    await store.put_node_health(NodeHealth("acme", old, HealthState.HEALTHY, None, "", datetime.now(UTC)))
    await harness.plane.hub.catch_up()
    after = await bind(harness, pool.client_key_id)
    assert after.result == HIT and after.binding.node_id == moved.binding.node_id


async def test_a_sidecar_can_exclude_the_bound_node(harness: Harness) -> None:
    pool = await make_pool(harness)
    first = await bind(harness, pool.client_key_id)
    moved = await bind(harness, pool.client_key_id, exclude=(first.binding.node_id,))
    assert moved.result == MOVED and moved.binding.node_id != first.binding.node_id
    with pytest.raises(aio.AioRpcError) as caught:
        await bind(harness, pool.client_key_id, exclude=pool.node_ids)
    assert rpc_error(caught)[0] is grpc.StatusCode.FAILED_PRECONDITION


async def test_draining_keeps_bindings_until_expiry_but_takes_no_new_ones(make_harness: HarnessFactory) -> None:
    harness = await make_harness(binding_ttl=1.0)
    pool = await make_pool(harness)
    first = await bind(harness, pool.client_key_id)
    drained = first.binding.node_id
    answer = await harness.admin.DrainNode(apb.DrainNodeRequest(tenant="acme", id=drained), metadata=ADMIN_MD)
    assert answer.node.state == rpb.NODE_STATE_DRAINING
    assert (await bind(harness, pool.client_key_id)).result == HIT  # kept
    # No new bindings to it: 12 other client keys land elsewhere.
    others = [await new_client_key(harness, f"c{i}") for i in range(12)]
    assert all([(await bind(harness, c)).binding.node_id != drained for c in others])
    # A refresh does not extend a draining node's binding; it runs out and moves.
    refreshed = await harness.sidecar.RefreshBindings(
        spb.RefreshBindingsRequest(
            sidecar_id="sc",
            bindings=[
                spb.BindingRef(tenant="acme", client_key_id=pool.client_key_id, public_model=MODEL, node_id=drained)
            ],
        ),
        metadata=SIDECAR_ALL_MD,
    )
    assert refreshed.refreshed == 0 and refreshed.current[0].node_id == drained
    await asyncio.sleep(1.1)
    later = await bind(harness, pool.client_key_id)
    assert later.result == CREATED and later.binding.node_id != drained


async def test_removing_a_node_deletes_its_bindings_and_the_next_request_moves(harness: Harness) -> None:
    pool = await make_pool(harness)
    first = await bind(harness, pool.client_key_id)
    removed = await harness.admin.RemoveNode(
        apb.RemoveNodeRequest(tenant="acme", id=first.binding.node_id), metadata=ADMIN_MD
    )
    assert removed.node.state == rpb.NODE_STATE_REMOVED and removed.bindings_deleted == 1
    assert await list_bindings(harness) == []
    nodes = await harness.admin.ListNodes(apb.ListNodesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert first.binding.node_id not in {n.id for n in nodes.nodes}
    after = await bind(harness, pool.client_key_id)
    assert after.result == CREATED and after.binding.node_id != first.binding.node_id


async def test_refresh_extends_and_deleting_the_client_key_cascades(harness: Harness) -> None:
    pool = await make_pool(harness)
    first = await bind(harness, pool.client_key_id)
    ref = spb.BindingRef(
        tenant="acme", client_key_id=pool.client_key_id, public_model=MODEL, node_id=first.binding.node_id
    )
    counters = spb.BindingCounters(tenant="acme", local_hits=7, overrides=2, fallbacks=1)
    refreshed = await harness.sidecar.RefreshBindings(
        spb.RefreshBindingsRequest(sidecar_id="sc", bindings=[ref], counters=[counters]), metadata=SIDECAR_ALL_MD
    )
    assert refreshed.refreshed == 1
    stats = await harness.admin.GetBindingStats(apb.GetBindingStatsRequest(tenant="acme"), metadata=ADMIN_MD)
    assert (stats.sidecar_hits, stats.overrides, stats.fallbacks, stats.created) == (7, 2, 1, 1)
    await harness.admin.DeleteClientKey(
        apb.DeleteClientKeyRequest(tenant="acme", id=pool.client_key_id), metadata=ADMIN_MD
    )
    assert await list_bindings(harness) == []
    gone = await harness.sidecar.RefreshBindings(
        spb.RefreshBindingsRequest(sidecar_id="sc", bindings=[ref]), metadata=SIDECAR_ALL_MD
    )
    assert gone.refreshed == 0 and list(gone.gone) == [ref]


async def test_the_sweep_removes_expired_bindings(make_harness: HarnessFactory) -> None:
    harness = await make_harness(binding_ttl=0.3)
    pool = await make_pool(harness)
    others = [await new_client_key(harness, f"c{i}") for i in range(4)]
    for client_key_id in (pool.client_key_id, *others):
        await bind(harness, client_key_id)
    assert len(await list_bindings(harness)) == 5
    await asyncio.sleep(0.4)
    assert await harness.plane.sweeper.sweep_once() == 5
    assert await list_bindings(harness) == []
    stats = await harness.admin.GetBindingStats(apb.GetBindingStatsRequest(tenant="acme"), metadata=ADMIN_MD)
    assert stats.swept == 5 and stats.bindings == 0


async def test_a_restart_loses_no_binding(tmp_path: Path, make_harness: HarnessFactory) -> None:
    master_key = os.urandom(32)
    first_plane = await make_harness(master_key=master_key)
    pool = await make_pool(first_plane)
    first = await bind(first_plane, pool.client_key_id)
    await first_plane.plane.stop(grace=0)
    again = await make_harness(master_key=master_key)
    answer = await bind(again, pool.client_key_id)
    assert answer.result == HIT and answer.binding.node_id == first.binding.node_id


async def test_bad_requests_and_scope(harness: Harness) -> None:
    pool = await make_pool(harness)
    await harness.tenant("other")
    cases: list[tuple[spb.GetOrCreateBindingRequest, Any, grpc.StatusCode]] = [
        (
            spb.GetOrCreateBindingRequest(tenant="acme", public_model=MODEL),
            SIDECAR_ALL_MD,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            spb.GetOrCreateBindingRequest(tenant="acme", client_key_id=pool.client_key_id),
            SIDECAR_ALL_MD,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            spb.GetOrCreateBindingRequest(tenant="acme", client_key_id="ck_nope", public_model=MODEL),
            SIDECAR_ALL_MD,
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            spb.GetOrCreateBindingRequest(tenant="acme", client_key_id=pool.client_key_id, public_model="nope"),
            SIDECAR_ALL_MD,
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            spb.GetOrCreateBindingRequest(tenant="other", client_key_id=pool.client_key_id, public_model=MODEL),
            SIDECAR_ACME_MD,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    for request, metadata, code in cases:
        with pytest.raises(aio.AioRpcError) as caught:
            await harness.sidecar.GetOrCreateBinding(request, metadata=metadata)
        assert rpc_error(caught)[0] is code, request
    assert await list_bindings(harness) == []
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.DeleteBindings(apb.DeleteBindingsRequest(tenant="acme"), metadata=ADMIN_MD)
    assert rpc_error(caught)[0] is grpc.StatusCode.INVALID_ARGUMENT


async def test_admin_nodes_and_bindings(harness: Harness) -> None:
    pool = await make_pool(harness)
    added = await harness.admin.AddNode(
        apb.AddNodeRequest(tenant="acme", route_id=pool.route_id, url="http://10.1.0.9:8000/"), metadata=ADMIN_MD
    )
    assert added.node.url == "http://10.1.0.9:8000" and not added.node.from_route
    assert added.node.state == rpb.NODE_STATE_ACTIVE and added.node.upstream_model == "meta/llama-3"
    again = await harness.admin.AddNode(
        apb.AddNodeRequest(tenant="acme", route_id=pool.route_id, url="http://10.1.0.9:8000"), metadata=ADMIN_MD
    )
    assert again.node.id == added.node.id and again.node.etag == added.node.etag
    keys = [pool.client_key_id] + [await new_client_key(harness, f"c{i}") for i in range(5)]
    for key in keys:
        await bind(harness, key)
    listed = await harness.admin.ListNodes(apb.ListNodesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert len(listed.nodes) == 4 and sum(c.bindings for c in listed.binding_counts) == 6
    page = await harness.admin.ListBindings(apb.ListBindingsRequest(tenant="acme", page_size=4), metadata=ADMIN_MD)
    rest = await harness.admin.ListBindings(
        apb.ListBindingsRequest(tenant="acme", page_size=4, page_token=page.next_page_token), metadata=ADMIN_MD
    )
    assert len(page.bindings) == 4 and len(rest.bindings) == 2 and not rest.next_page_token
    assert sorted(b.client_key_id for b in [*page.bindings, *rest.bindings]) == sorted(keys)
    one = await list_bindings(harness, client_key_id=keys[1])
    deleted = await harness.admin.DeleteBindings(
        apb.DeleteBindingsRequest(tenant="acme", node_id=one[0].node_id), metadata=ADMIN_MD
    )
    assert deleted.deleted >= 1 and await list_bindings(harness, node_id=one[0].node_id) == []
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.DrainNode(
            apb.DrainNodeRequest(tenant="acme", id=added.node.id, etag="r99"), metadata=ADMIN_MD
        )
    assert rpc_error(caught)[0] is grpc.StatusCode.ABORTED
    events = await harness.admin.ListAuditEvents(
        apb.ListAuditEventsRequest(tenant="acme", resource_kind="node"), metadata=ADMIN_MD
    )
    assert {e.method for e in events.events} >= {"AddNode", "DrainNode"}


async def test_the_sweep_runs_on_one_replica_at_a_time(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key, binding_ttl=0.2)
    two = await make_harness(store_url=pg_url, master_key=master_key, binding_ttl=0.2)
    pool = await make_pool(one)
    await bind(one, pool.client_key_id)
    await asyncio.sleep(0.3)
    async with one.plane.store.try_lease(SWEEP_LEASE) as held:
        assert held
        assert await two.plane.sweeper.sweep_once() is None  # the other replica holds it
    assert await two.plane.sweeper.sweep_once() == 1


async def test_no_log_line_above_debug_names_a_client_key_with_a_model(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = await make_pool(harness)
    first = await bind(harness, pool.client_key_id)
    moved = await bind(harness, pool.client_key_id, exclude=(first.binding.node_id,))
    await harness.admin.DrainNode(apb.DrainNodeRequest(tenant="acme", id=moved.binding.node_id), metadata=ADMIN_MD)
    await harness.admin.RemoveNode(apb.RemoveNodeRequest(tenant="acme", id=moved.binding.node_id), metadata=ADMIN_MD)
    await bind(harness, pool.client_key_id)
    await harness.admin.DeleteBindings(
        apb.DeleteBindingsRequest(tenant="acme", client_key_id=pool.client_key_id), metadata=ADMIN_MD
    )
    await harness.plane.hub.catch_up()
    both = [
        r.getMessage()
        for r in caplog.records
        if pool.client_key_id in r.getMessage() and MODEL in r.getMessage().replace(pool.client_key_id, "")
    ]
    assert both, "the move is logged at debug with both (the check below would be vacuous otherwise)"
    assert [
        r.getMessage()
        for r in caplog.records
        if r.levelno > logging.DEBUG
        and pool.client_key_id in r.getMessage()
        and MODEL in r.getMessage().replace(pool.client_key_id, "")
    ] == []


async def test_routes_written_before_nodes_existed_get_their_nodes_at_start(make_harness: HarnessFactory) -> None:
    master_key = os.urandom(32)
    first = await make_harness(master_key=master_key)
    await first.tenant()
    now = datetime.now(UTC)
    target = RouteTarget(Provider.VLLM, "meta/llama-3", node_urls=("http://10.2.0.1:8000", "http://10.2.0.2:8000"))
    # As an older release wrote it: the route row only, no node rows.
    await first.plane.store.create_route(Route("rt_legacy", "acme", MODEL, (target,), now, now))
    assert await first.plane.store.list_nodes("acme") == []
    await first.plane.stop(grace=0)
    again = await make_harness(master_key=master_key)
    listed = await again.admin.ListNodes(apb.ListNodesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert sorted(n.id for n in listed.nodes) == sorted(node_id_for("rt_legacy", u) for u in target.node_urls)
    assert all(n.from_route and n.state == rpb.NODE_STATE_ACTIVE for n in listed.nodes)
    client_key_id = await new_client_key(again, "app")
    assert (await bind(again, client_key_id)).result == CREATED


async def test_nodes_reach_the_watch_and_go_with_their_route(harness: Harness) -> None:
    pool = await make_pool(harness)
    call = harness.watch(("acme",))
    [state] = (await next_message(call)).snapshot.tenants
    assert sorted(n.id for n in state.nodes) == sorted(pool.node_ids)
    assert {n.url for n in state.nodes} == set(URLS) and all(n.route_id == pool.route_id for n in state.nodes)
    drained = await harness.admin.DrainNode(apb.DrainNodeRequest(tenant="acme", id=pool.node_ids[0]), metadata=ADMIN_MD)
    put = (await next_message(call)).delta.changes[0].node_put
    assert (put.id, put.state) == (drained.node.id, rpb.NODE_STATE_DRAINING)
    await harness.admin.DeleteRoute(apb.DeleteRouteRequest(tenant="acme", id=pool.route_id), metadata=ADMIN_MD)
    assert (await next_message(call)).delta.changes[0].route_deleted == pool.route_id
    assert harness.plane.hub.cache.route_nodes("acme", MODEL) is None
    [state] = (await next_message(harness.watch(("acme",)))).snapshot.tenants
    assert list(state.nodes) == []
