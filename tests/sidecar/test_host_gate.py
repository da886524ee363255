"""The per-origin FIFO gate in front of the upstream client's connector."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.upstream.host_gate import HostGate

A = "https://a:443"


async def test_slots_go_to_waiters_in_order_and_newcomers_queue_behind_them() -> None:
    gate = HostGate(1)
    assert gate.try_enter(A)
    served: list[int] = []

    async def wait(n: int) -> None:
        await gate.enter(A)
        served.append(n)

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    gate.leave(A)  # to waiter 0, not to the newcomer below
    assert not gate.try_enter(A)
    await asyncio.sleep(0)
    assert served == [0]
    gate.leave(A)
    await asyncio.sleep(0)
    gate.leave(A)
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2]
    assert gate.in_use(A) == 1
    gate.leave(A)
    assert gate.in_use(A) == 0
    assert gate.try_enter(A) and gate.try_enter("http://b:80")


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_hands_it_on() -> None:
    gate = HostGate(1)
    assert gate.try_enter(A)
    first = asyncio.create_task(gate.enter(A))
    second = asyncio.create_task(gate.enter(A))
    await asyncio.sleep(0)
    gate.leave(A)  # handed to ``first`` ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)
    assert gate.in_use(A) == 1
    third = asyncio.create_task(gate.enter(A))
    await asyncio.sleep(0)
    third.cancel()  # cancelled while waiting: leaves the line, takes nothing
    with pytest.raises(asyncio.CancelledError):
        await third
    gate.leave(A)
    assert gate.in_use(A) == 0


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HostGate(0)
