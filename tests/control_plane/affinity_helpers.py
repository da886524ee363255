"""Shared steps of the affinity tests (issue 14): a tenant with a vllm route
of three nodes and a client key, binding calls over real gRPC."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from keyplane.affinity import node_id_for
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from tests.control_plane.conftest import ADMIN_MD, SIDECAR_ALL_MD, Harness

URLS = ("http://10.1.0.1:8000", "http://10.1.0.2:8000", "http://10.1.0.3:8000")
MODEL = "llama"


@dataclass
class Pool:
    route_id: str
    node_ids: tuple[str, ...]
    client_key_id: str


async def make_pool(harness: Harness, *, tenant: str = "acme") -> Pool:
    await harness.tenant(tenant)
    route = await harness.admin.CreateRoute(
        apb.CreateRouteRequest(
            tenant=tenant,
            public_model=MODEL,
            targets=[rpb.RouteTarget(provider=rpb.PROVIDER_VLLM, upstream_model="meta/llama-3", node_urls=URLS)],
        ),
        metadata=ADMIN_MD,
    )
    client_key_id = await new_client_key(harness, "app", tenant=tenant)
    return Pool(route.route.id, tuple(node_id_for(route.route.id, u) for u in URLS), client_key_id)


async def new_client_key(harness: Harness, label: str, *, tenant: str = "acme") -> str:
    created = await harness.admin.CreateClientKey(
        apb.CreateClientKeyRequest(tenant=tenant, label=label), metadata=ADMIN_MD
    )
    return created.client_key.id


async def bind(
    harness: Harness,
    client_key_id: str,
    *,
    exclude: tuple[str, ...] = (),
    tenant: str = "acme",
    model: str = MODEL,
) -> spb.GetOrCreateBindingResponse:
    response: spb.GetOrCreateBindingResponse = await harness.sidecar.GetOrCreateBinding(
        spb.GetOrCreateBindingRequest(
            tenant=tenant, client_key_id=client_key_id, public_model=model, exclude_node_ids=exclude
        ),
        metadata=SIDECAR_ALL_MD,
        timeout=10,
    )
    return response


async def wait_for_nodes(harness: Harness, count: int, *, tenant: str = "acme") -> None:
    """The replica's memory holds ``count`` nodes of the route (another
    replica's writes arrive through the change log)."""
    async with asyncio.timeout(5):
        while True:
            await harness.plane.hub.catch_up()
            found = harness.plane.hub.cache.route_nodes(tenant, MODEL)
            if found is not None and len(found[0]) == count:
                return
            await asyncio.sleep(0.05)


async def list_bindings(
    harness: Harness, *, tenant: str = "acme", client_key_id: str = "", node_id: str = ""
) -> list[rpb.Binding]:
    request = apb.ListBindingsRequest(tenant=tenant, client_key_id=client_key_id, node_id=node_id)
    response = await harness.admin.ListBindings(request, metadata=ADMIN_MD)
    return list(response.bindings)
