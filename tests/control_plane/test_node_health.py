"""Node health learnt from outcome reports (issue 14): failures reported by
one sidecar demote the node for every sidecar (and on every replica), the
binding moves off it, and a success heals it."""

from __future__ import annotations

import asyncio
import os

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.affinity_helpers import bind, make_pool, wait_for_nodes
from tests.control_plane.conftest import ADMIN_MD, Harness, HarnessFactory, next_message
from tests.control_plane.test_health import outcome, report
from tests.control_plane.test_replicas_postgres import pg_url  # noqa: F401  (fixture)

C = spb


async def vllm_key(harness: Harness) -> str:
    created = await harness.admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme", provider=rpb.PROVIDER_VLLM, label="vllm", secret="sk-vllm-0123456789"
        ),
        metadata=ADMIN_MD,
    )
    return created.key.id


def on_node(key_id: str, node_id: str, outcome_class: int, status: int = 0) -> spb.Outcome:
    message = outcome(key_id, outcome_class, provider=rpb.PROVIDER_VLLM, model="meta/llama-3", status=status)
    message.node_id = node_id
    return message


async def node_health_change(call: object, within: float = 2.0) -> rpb.NodeHealth:
    async with asyncio.timeout(within):
        while True:
            message = await next_message(call, within=within)  # type: ignore[arg-type]
            for change in message.delta.changes:
                if change.HasField("node_health"):
                    return change.node_health


async def test_failures_reported_for_a_node_demote_it_fleet_wide_and_move_the_binding(harness: Harness) -> None:
    pool = await make_pool(harness)
    key_id = await vllm_key(harness)
    watcher = harness.watch(("acme",), sidecar_id="sc-watcher")
    await next_message(watcher)
    first = await bind(harness, pool.client_key_id)
    node = first.binding.node_id

    # Two errors stay under the threshold; the third trips a cooldown.
    await report(harness, [on_node(key_id, node, C.OUTCOME_CLASS_UPSTREAM_ERROR, 503)] * 2)
    assert (await bind(harness, pool.client_key_id)).result == spb.BINDING_RESULT_HIT
    await report(harness, [on_node(key_id, node, C.OUTCOME_CLASS_UPSTREAM_ERROR, 503)])
    health = await node_health_change(watcher)
    assert (health.node_id, health.state) == (node, rpb.HEALTH_STATE_COOLDOWN)
    assert health.reason == "503 upstream_error" and health.HasField("until")
    listed = await harness.admin.ListNodes(apb.ListNodesRequest(tenant="acme"), metadata=ADMIN_MD)
    assert {n.id: n.health.state for n in listed.nodes}[node] == rpb.HEALTH_STATE_COOLDOWN

    moved = await bind(harness, pool.client_key_id)
    assert moved.result == spb.BINDING_RESULT_MOVED and moved.binding.node_id != node

    # A success heals the node (a probe let through); the binding stays where it moved.
    await report(harness, [on_node(key_id, node, C.OUTCOME_CLASS_SUCCESS, 200)])
    healed = await node_health_change(watcher)
    assert (healed.node_id, healed.state) == (node, rpb.HEALTH_STATE_HEALTHY)
    after = await bind(harness, pool.client_key_id)
    assert after.result == spb.BINDING_RESULT_HIT and after.binding.node_id == moved.binding.node_id


async def test_client_errors_and_unknown_nodes_say_nothing_about_a_node(harness: Harness) -> None:
    pool = await make_pool(harness)
    key_id = await vllm_key(harness)
    node = pool.node_ids[0]
    await report(
        harness,
        [on_node(key_id, node, C.OUTCOME_CLASS_CLIENT_ERROR, 400)] * 5
        + [on_node(key_id, "nd_unknown", C.OUTCOME_CLASS_UPSTREAM_ERROR, 503)] * 5,
    )
    assert await harness.plane.store.list_node_health("acme") == []


async def test_a_node_demoted_through_one_replica_is_demoted_on_the_other(
    make_harness: HarnessFactory,
    pg_url: str,  # noqa: F811
) -> None:
    master_key = os.urandom(32)
    one = await make_harness(store_url=pg_url, master_key=master_key)
    two = await make_harness(store_url=pg_url, master_key=master_key)
    pool = await make_pool(one)
    key_id = await vllm_key(one)
    await wait_for_nodes(two, 3)
    watcher = two.watch(("acme",), sidecar_id="sc-on-two")
    await next_message(watcher)
    node = (await bind(two, pool.client_key_id)).binding.node_id
    await report(one, [on_node(key_id, node, C.OUTCOME_CLASS_UPSTREAM_ERROR, 502)] * 3)
    health = await node_health_change(watcher, within=3.0)
    assert (health.node_id, health.state) == (node, rpb.HEALTH_STATE_COOLDOWN)
    moved = await bind(two, pool.client_key_id)
    assert moved.result == spb.BINDING_RESULT_MOVED and moved.binding.node_id != node
