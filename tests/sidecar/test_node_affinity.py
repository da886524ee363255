"""Node affinity end to end: real control planes, real sidecars over gRPC, fake vLLM nodes
(real local HTTP servers), every request over a socket.

- 50 concurrent first requests of one client key for one model, spread over two
  sidecars (attached to two control-plane replicas on one Postgres; to one
  control plane on SQLite), all land on one node, and one binding row exists.
- A hit makes no RPC (the sidecar's GetOrCreateBinding count) and so no store
  query on the request path (the control plane's binding counters do not move).
- The bound node fails -> the request goes to another node, the binding moves,
  and it does not flap back when the old node recovers before it expires.
- Draining keeps a node's bindings (no new ones); removing sends its clients elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from keyplane.domain import Provider
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from sidecar import nodes as sidecar_nodes
from tests.fakes.upstream import COMPLETION, SERVICE_UNAVAILABLE

from .affinity_fleet import ADMIN_MD, TENANT, UPSTREAM_MODEL, Fleet, open_fleet, postgres_url

STORES = ["sqlite", "postgres"]


async def until(check: object, within: float = 10.0) -> None:
    assert callable(check)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def known_everywhere(fleet: Fleet, token: str) -> None:
    """Every sidecar knows the client key and the route's nodes."""
    await until(
        lambda: all(
            sc.state.authenticate(token) == TENANT and sc.state.nodes_of(TENANT) is not None for sc in fleet.sidecars
        )
    )


# The claims below are about agreement, not speed: a lookup slower than the sidecar's
# default deadline (0.1 s, easily missed on a loaded CI machine) would fall back to round
# robin. The fallback has its own test.
PATIENT = 5.0


@pytest.fixture(params=STORES)
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    if request.param == "postgres":
        async with (
            postgres_url() as url,
            open_fleet(tmp_path, store_url=url, replicas=2, binding_timeout=PATIENT) as f,
        ):
            yield f
    else:
        async with open_fleet(tmp_path, binding_timeout=PATIENT) as f:
            yield f


async def test_concurrent_first_requests_share_one_node_and_one_binding(fleet: Fleet) -> None:
    client_id, token = await fleet.client_key("app")
    await known_everywhere(fleet, token)

    replies = await asyncio.gather(*(fleet.ask(i % 2, token) for i in range(50)))

    assert [r.status_code for r in replies] == [200] * 50
    served = fleet.served()
    print(f"\n50 first requests over 2 sidecars / {len(fleet.planes)} replica(s): per node {served}")
    assert sorted(served) == [0, 0, 50], served
    [binding] = await fleet.bindings(client_id)
    assert fleet.node_index(binding.node_id) == served.index(50)
    assert await fleet.binding_rows(client_id) == 1
    # One lookup per sidecar at most (concurrent misses share one RPC).
    rpcs = [sc.node_affinity.rpcs for sc in fleet.sidecars]
    print(f"GetOrCreateBinding calls per sidecar: {rpcs}")
    assert all(1 <= n <= 2 for n in rpcs), rpcs


async def test_a_hit_makes_no_rpc_and_no_store_query(tmp_path: Path) -> None:
    async with open_fleet(tmp_path, sidecars=1, binding_timeout=PATIENT) as fleet:
        client_id, token = await fleet.client_key("app")
        await known_everywhere(fleet, token)
        assert (await fleet.ask(0, token)).status_code == 200
        affinity = fleet.sidecars[0].node_affinity
        rpcs, refreshes = affinity.rpcs, affinity.refresh_calls
        [created] = await fleet.bindings(client_id)
        before = await fleet.admin.GetBindingStats(apb.GetBindingStatsRequest(tenant=TENANT), metadata=ADMIN_MD)
        for _ in range(20):
            assert (await fleet.ask(0, token)).status_code == 200
        after = await fleet.admin.GetBindingStats(apb.GetBindingStatsRequest(tenant=TENANT), metadata=ADMIN_MD)
        assert affinity.rpcs == rpcs  # no GetOrCreateBinding: the control plane (and its store) never asked
        assert (after.hits, after.misses) == (before.hits, before.misses)
        assert affinity.total.hits == 20
        assert sorted(fleet.served()) == [0, 0, 21]
        # The successes pushed the binding's expiry back, in a few batched RefreshBindings calls.
        await until(lambda: affinity.refresh_calls > refreshes)
        await asyncio.sleep(0.3)
        [refreshed] = await fleet.bindings(client_id)
        assert refreshed.expire_time.ToNanoseconds() > created.expire_time.ToNanoseconds()
        print(f"\n20 hits: {affinity.refresh_calls - refreshes} RefreshBindings call(s), 0 GetOrCreateBinding")
        assert affinity.refresh_calls - refreshes < 10


async def test_an_unhealthy_node_moves_the_binding_and_it_does_not_flap_back(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sidecar_nodes, "DEFAULT_LOCAL_COOLDOWN", 0.5)
    client_id, token = await fleet.client_key("app")
    await known_everywhere(fleet, token)
    assert (await fleet.ask(0, token)).status_code == 200
    [first] = await fleet.bindings(client_id)
    old = fleet.node_index(first.node_id)

    fleet.nodes[old].program("", SERVICE_UNAVAILABLE)  # the bound node fails (keyless vLLM: no secret)
    reply = await fleet.ask(0, token)
    assert reply.status_code == 200  # answered by another node in the same request
    assert reply.headers["x-keyplane-attempts"] == "2"

    # The next request ignores the binding (override) and the control plane moves it.
    before = fleet.served()
    assert (await fleet.ask(0, token)).status_code == 200
    [moved] = await fleet.bindings(client_id)
    assert moved.node_id != first.node_id
    new = fleet.node_index(moved.node_id)
    assert fleet.served()[new] == before[new] + 1
    assert fleet.sidecars[0].node_affinity.total.overrides >= 1

    # The old node recovers before the binding expires: no flap back, on either sidecar.
    fleet.nodes[old].program("", COMPLETION)
    await asyncio.sleep(0.6)  # the local cooldown is over
    before = fleet.served()
    for i in range(10):
        assert (await fleet.ask(i % 2, token)).status_code == 200
    after = fleet.served()
    assert after[old] == before[old]
    assert after[new] == before[new] + 10
    [still] = await fleet.bindings(client_id)
    assert still.node_id == moved.node_id


async def test_draining_keeps_bindings_and_removing_sends_clients_elsewhere(tmp_path: Path) -> None:
    async with open_fleet(tmp_path, binding_timeout=PATIENT) as fleet:
        bound_id, bound_token = await fleet.client_key("bound")
        await known_everywhere(fleet, bound_token)
        assert (await fleet.ask(0, bound_token)).status_code == 200
        [binding] = await fleet.bindings(bound_id)
        node = fleet.node_index(binding.node_id)

        await fleet.admin.DrainNode(apb.DrainNodeRequest(tenant=TENANT, id=binding.node_id), metadata=ADMIN_MD)
        await until(
            lambda: all(
                not sc.state.nodes(TENANT).usable(binding.node_id, 0)
                and sc.state.nodes(TENANT).bound_usable(binding.node_id, 0)
                for sc in fleet.sidecars
            )
        )
        # The bound client stays on the draining node; a new client never gets it.
        before = fleet.served()
        for i in range(4):
            assert (await fleet.ask(i % 2, bound_token)).status_code == 200
        assert fleet.served()[node] == before[node] + 4
        new_id, new_token = await fleet.client_key("new")
        await known_everywhere(fleet, new_token)
        for i in range(4):
            assert (await fleet.ask(i % 2, new_token)).status_code == 200
        [fresh] = await fleet.bindings(new_id)
        assert fresh.node_id != binding.node_id
        assert fleet.served()[node] == before[node] + 4

        # Removing the node takes its bindings away (pushed to the sidecars): the client goes elsewhere.
        await fleet.admin.RemoveNode(apb.RemoveNodeRequest(tenant=TENANT, id=binding.node_id), metadata=ADMIN_MD)
        await until(lambda: all(sc.state.nodes(TENANT).node(binding.node_id) is None for sc in fleet.sidecars))
        before = fleet.served()
        for i in range(4):
            assert (await fleet.ask(i % 2, bound_token)).status_code == 200
        assert fleet.served()[node] == before[node]
        [moved] = await fleet.bindings(bound_id)
        assert moved.node_id != binding.node_id
        assert fleet.served()[fleet.node_index(moved.node_id)] == before[fleet.node_index(moved.node_id)] + 4


async def test_without_affinity_the_nodes_take_turns(tmp_path: Path) -> None:
    async with open_fleet(tmp_path, sidecars=1, node_affinity=False) as fleet:
        client_id, token = await fleet.client_key("app")
        await known_everywhere(fleet, token)
        for _ in range(6):
            assert (await fleet.ask(0, token)).status_code == 200
        assert fleet.served() == [2, 2, 2]
        assert await fleet.bindings(client_id) == []
        assert fleet.sidecars[0].node_affinity.rpcs == 0


async def test_without_a_control_plane_a_miss_falls_back_at_once(tmp_path: Path) -> None:
    """The lookup fails (the control plane is gone): the request goes round robin, not delayed."""
    async with open_fleet(tmp_path, sidecars=1, binding_timeout=0.2) as fleet:
        _, token = await fleet.client_key("app")
        await known_everywhere(fleet, token)
        await fleet.planes[0].stop(grace=0.1)
        affinity = fleet.sidecars[0].node_affinity
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(3):
            assert (await fleet.ask(0, token)).status_code == 200
        elapsed = loop.time() - started
        print(f"\n3 requests without a control plane: {elapsed * 1000:.0f} ms, fallbacks {affinity.total.fallbacks}")
        assert affinity.total.fallbacks == 3
        assert elapsed < 3 * 0.2 + 1.0  # at most the binding deadline each, plus the answer
        assert sorted(fleet.served()) == [1, 1, 1]  # the normal strategy: round robin


async def test_a_node_failing_on_one_sidecar_is_left_out_by_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcome reports carry the node's id: the control plane demotes the node for the fleet."""
    monkeypatch.setattr(sidecar_nodes, "DEFAULT_LOCAL_COOLDOWN", 0.0)  # only the pushed verdict keeps it out
    async with open_fleet(tmp_path, binding_timeout=PATIENT) as fleet:
        secret = "sk-vllm-node-health-0123"
        created = await fleet.admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(tenant=TENANT, provider=rpb.PROVIDER_VLLM, label="vllm", secret=secret),
            metadata=ADMIN_MD,
        )
        client_id, token = await fleet.client_key("app")
        await known_everywhere(fleet, token)
        await until(lambda: all(sc.state.keys(TENANT, Provider.VLLM) for sc in fleet.sidecars))
        assert (await fleet.ask(0, token)).status_code == 200
        [binding] = await fleet.bindings(client_id)
        bad = binding.node_id
        fleet.nodes[fleet.node_index(bad)].program(secret, SERVICE_UNAVAILABLE)
        other = fleet.sidecars[1].state
        for _ in range(5):
            await fleet.ask(0, token)
            if not other.nodes(TENANT).usable(bad, time.time()):
                break
        await until(lambda: not other.nodes(TENANT).usable(bad, time.time()))
        assert [r.secret for r in fleet.nodes[fleet.node_index(bad)].chat_requests()].count(secret) >= 2
        # The node's failures are the node's: the key the pool shares stays usable on every
        # sidecar and at the control plane, and the other nodes keep serving with it.
        key_id = created.key.id
        for sc in fleet.sidecars:
            assert sc.state.health(TENANT).key_block_reason(key_id, UPSTREAM_MODEL, time.time()) is None
        assert not [c for c in fleet.planes[0].aggregator.verdicts(TENANT) if getattr(c.scope, "key_id", "") == key_id]
        assert [(await fleet.ask(i % 2, token)).status_code for i in range(4)] == [200] * 4
