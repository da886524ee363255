"""RouteTarget.endpoints on both stores: stored, updated and read back; a targets value
written before the field existed reads as "the provider's default" (empty)."""

from __future__ import annotations

from dataclasses import replace

from control_plane.store import RouteUpdate, Store
from keyplane.domain import Provider, RouteTarget
from tests.store import factories as f
from tests.store import legacy


async def test_endpoints_round_trip(store: Store) -> None:
    await store.create_tenant(f.tenant())
    targets = (
        RouteTarget(Provider.OPENAI, "text-embedding-3-small", endpoints=("embeddings",)),
        RouteTarget(Provider.OPENAI_COMPATIBLE, "local", priority=1),
    )
    route = await store.create_route(replace(f.route(), targets=targets))
    assert (await store.get_route("acme", route.id)).targets == targets
    retargeted = (RouteTarget(Provider.OPENAI, "gpt-4o", endpoints=("responses", "chat_completions")),)
    updated = await store.update_route("acme", route.id, RouteUpdate(updated_at=f.ts(1), targets=retargeted))
    assert updated.targets == retargeted
    assert (await store.get_route("acme", route.id)).targets == retargeted


async def test_targets_written_before_endpoints_read_as_default(store: Store) -> None:
    await store.create_tenant(f.tenant())
    route = f.route()
    await legacy.insert_route(
        store,
        route,
        '[{"provider":"openai","upstream_model":"gpt-4o","priority":0,"weight":2,"node_urls":[]}]',
    )
    [target] = (await store.get_route("acme", route.id)).targets
    assert target == RouteTarget(Provider.OPENAI, "gpt-4o", priority=0, weight=2)
    assert target.endpoints == ()
