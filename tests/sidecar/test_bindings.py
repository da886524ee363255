"""The sidecar's pure node-affinity pieces: the binding cache, the decision and single flight."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.bindings import Binding, BindingCache, Decision, SingleFlight, decide

KEY = ("t1", "ck1", "llama")


def test_cache_hit_until_expiry_then_forgotten() -> None:
    cache = BindingCache()
    cache.put(KEY, Binding("n1", expires_at=100.0))
    assert cache.get(KEY, 99.9) == Binding("n1", 100.0)
    assert cache.get(KEY, 100.0) is None
    assert KEY not in cache


def test_cache_is_bounded_oldest_first() -> None:
    cache = BindingCache(max_entries=2)
    cache.put(("t", "a", "m"), Binding("n1", 10))
    cache.put(("t", "b", "m"), Binding("n1", 10))
    cache.put(("t", "a", "m"), Binding("n2", 10))  # re-inserted: now the newest
    cache.put(("t", "c", "m"), Binding("n1", 10))
    assert ("t", "b", "m") not in cache
    assert cache.peek(("t", "a", "m")) == Binding("n2", 10)
    assert len(cache) == 2


def test_update_only_touches_held_bindings() -> None:
    cache = BindingCache()
    assert not cache.update(KEY, Binding("n2", 50))
    assert KEY not in cache
    cache.put(KEY, Binding("n1", 50))
    assert cache.update(KEY, Binding("n2", 60))
    assert cache.peek(KEY) == Binding("n2", 60)


def test_extend_only_for_the_same_node_and_later() -> None:
    cache = BindingCache()
    cache.put(KEY, Binding("n1", 50))
    cache.extend(KEY, "n1", 40)
    assert cache.peek(KEY) == Binding("n1", 50)
    cache.extend(KEY, "n2", 90)  # a refresh answered for a node this sidecar no longer uses
    assert cache.peek(KEY) == Binding("n1", 50)
    cache.extend(KEY, "n1", 90)
    assert cache.peek(KEY) == Binding("n1", 90)


def test_drops_and_sweep() -> None:
    cache = BindingCache()
    cache.put(("t1", "a", "m"), Binding("n1", 10))
    cache.put(("t1", "b", "m"), Binding("n1", 30))
    cache.put(("t2", "a", "m"), Binding("n1", 30))
    assert cache.evict_expired(20) == 1
    cache.drop_client("t1", "b")
    assert len(cache) == 1
    cache.drop_tenant("t2")
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("binding", "usable", "expected"),
    [
        (None, set(), Decision.MISS),
        (Binding("n1", 10), {"n1"}, Decision.HIT),
        (Binding("n1", 10), {"n2"}, Decision.OVERRIDE),  # unhealthy, draining or removed
    ],
)
def test_decide(binding: Binding | None, usable: set[str], expected: Decision) -> None:
    assert decide(binding, usable.__contains__) is expected


def test_no_flap_back_after_a_move() -> None:
    """Once moved to n2, the cache holds n2: n1 recovering changes nothing."""
    cache = BindingCache()
    cache.put(KEY, Binding("n1", 100))
    healthy = {"n2"}
    assert decide(cache.get(KEY, 1), healthy.__contains__) is Decision.OVERRIDE
    cache.put(KEY, Binding("n2", 100))  # the control plane moved it
    healthy.add("n1")  # the old node recovers before the binding expires
    found = cache.get(KEY, 2)
    assert found is not None and found.node_id == "n2"
    assert decide(found, healthy.__contains__) is Decision.HIT


async def test_single_flight_shares_one_call() -> None:
    flight: SingleFlight[tuple[str, str, str], str] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def call() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "n1"

    waiters = [asyncio.create_task(flight.do(KEY, call, wait=5)) for _ in range(50)]
    await asyncio.sleep(0)
    assert flight.inflight(KEY)
    release.set()
    assert await asyncio.gather(*waiters) == ["n1"] * 50
    assert calls == 1
    assert len(flight) == 0


async def test_single_flight_timeout_leaves_the_call_running() -> None:
    flight: SingleFlight[tuple[str, str, str], str] = SingleFlight()
    release = asyncio.Event()
    landed: list[str] = []

    async def call() -> str:
        await release.wait()
        landed.append("n1")
        return "n1"

    with pytest.raises(TimeoutError):
        await flight.do(KEY, call, wait=0.01)
    assert flight.inflight(KEY)
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert landed == ["n1"]
    assert not flight.inflight(KEY)


async def test_single_flight_failure_is_forgotten() -> None:
    flight: SingleFlight[tuple[str, str, str], str] = SingleFlight()
    attempts = 0

    async def call() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("control plane down")
        return "n2"

    with pytest.raises(ConnectionError):
        await flight.do(KEY, call, wait=1)
    assert await flight.do(KEY, call, wait=1) == "n2"
