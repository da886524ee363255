"""SnapshotCache fed by hand: no store, no gRPC, no secrets to open."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from control_plane.snapshot_cache import SnapshotCache, SnapshotTooLarge, Subscription, TenantContents
from keyplane.domain import ChangeOp, ChangeRecord, EntityKind
from keyplane.limits import MAX_DELTA_MESSAGE_BYTES, MAX_WATCH_MESSAGE_BYTES
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def _route(route_id: str, *, padding: int = 0) -> rpb.Route:
    return rpb.Route(
        id=route_id,
        public_model=route_id,
        targets=[
            rpb.RouteTarget(provider=rpb.PROVIDER_VLLM, upstream_model="m", node_urls=["http://n/" + "x" * padding])
        ],
    )


def _put_route(cache: SnapshotCache, tenant: str, route: rpb.Route) -> None:
    version = cache.version + 1
    record = ChangeRecord(version, tenant, EntityKind.ROUTE, route.id, ChangeOp.PUT, NOW)
    cache.apply(record, spb.Change(version=version, tenant=tenant, route_put=route))


async def _next(subscription: Subscription) -> spb.WatchResponse:
    message = await asyncio.wait_for(subscription.next(), 1)
    assert message is not None
    return message


def test_subscribing_before_load_is_refused() -> None:
    with pytest.raises(RuntimeError, match="load"):
        SnapshotCache().subscribe(None, 0)


async def test_load_then_changes_reach_only_matching_subscribers() -> None:
    cache = SnapshotCache()
    cache.load(7, {"acme": TenantContents(routes=(_route("rt_a"),)), "other": TenantContents()})
    acme = cache.subscribe(frozenset({"acme"}), 0, sidecar_id="acme")
    other = cache.subscribe(frozenset({"other"}), 0, sidecar_id="other")
    first = await _next(acme)
    assert first.version == 7
    assert [r.id for r in first.snapshot.tenants[0].routes] == ["rt_a"]
    await _next(other)
    seen: list[int] = []
    cache.add_listener(lambda record, change: seen.append(record.version))
    _put_route(cache, "acme", _route("rt_b"))
    delta = await _next(acme)
    assert (delta.version, [c.route_put.id for c in delta.delta.changes]) == (8, ["rt_b"])
    assert other.pending == 0
    assert seen == [8]
    assert cache.usage("acme").routes == 2
    # A sidecar resuming at 7 gets just what it missed.
    resumed = cache.subscribe(frozenset({"acme"}), 7)
    again = await _next(resumed)
    assert [c.route_put.id for c in again.delta.changes] == ["rt_b"]
    cache.close()
    assert await asyncio.wait_for(acme.next(), 1) is None


async def test_a_backlog_bigger_than_one_message_goes_in_several_deltas() -> None:
    cache = SnapshotCache()
    cache.load(0, {"acme": TenantContents()})
    subscription = cache.subscribe(None, 0)
    await _next(subscription)
    size = MAX_DELTA_MESSAGE_BYTES // 3
    for n in range(5):
        _put_route(cache, "acme", _route(f"rt_{n}", padding=size))
    messages = [await _next(subscription) for _ in range(3)]
    assert [[c.route_put.id for c in m.delta.changes] for m in messages] == [
        ["rt_0", "rt_1"],
        ["rt_2", "rt_3"],
        ["rt_4"],
    ]
    assert [m.version for m in messages] == [2, 4, 5]
    assert all(m.ByteSize() < MAX_DELTA_MESSAGE_BYTES for m in messages)
    assert subscription.pending == 0


def test_a_snapshot_over_the_receive_limit_is_refused() -> None:
    cache = SnapshotCache()
    big = TenantContents(routes=(_route("rt_big", padding=MAX_WATCH_MESSAGE_BYTES // 3),))
    cache.load(1, {f"t{n}": big for n in range(3)})
    assert len(cache.snapshot(frozenset({"t0", "t1"})).snapshot.tenants) == 2
    with pytest.raises(SnapshotTooLarge, match="watch fewer tenants"):
        cache.snapshot(None)
