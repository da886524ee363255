"""Responses API continuations stick to the key that created the response: through the
sidecar with the official SDK (known id: pinned, no failover; pinned key unusable: 409;
unknown id: stateless pass-through), and the bounded TTL memory itself."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from sidecar.affinity import ResponseAffinity, response_id_in
from tests.fakes.upstream import rate_limited

from . import protos as p
from .conftest import TENANT
from .endpoint_fleet import MODEL, Fleet


async def _created_by_o2(fleet: Fleet, client: openai.AsyncOpenAI, *, stream: bool = False) -> str:
    """A response created by key o2 (o1, picked first, answers 429 once)."""
    fleet.first.program("sk-one", rate_limited(1), times=1)
    if stream:
        events = [e async for e in await client.responses.create(model=MODEL, input="hi", stream=True)]
        assert events[-1].type == "response.completed"
        return events[-1].response.id
    raw = await client.responses.with_raw_response.create(model=MODEL, input="hi")
    assert raw.headers["x-keyplane-key"] == "o2"
    return raw.parse().id


@pytest.mark.parametrize("stream", [False, True])
async def test_continuation_goes_to_the_creating_key(fleet: Fleet, stream: bool) -> None:
    async with fleet.client() as client:
        first = await _created_by_o2(fleet, client, stream=stream)
        # o1 would be picked now (it is heavier, and the 429's short cooldown is over).
        await asyncio.sleep(1.5)
        plain = await client.responses.with_raw_response.create(model=MODEL, input="again")
        assert plain.headers["x-keyplane-key"] == "o1"
        raw = await client.responses.with_raw_response.create(model=MODEL, input="more", previous_response_id=first)
    assert raw.headers["x-keyplane-key"] == "o2"
    assert raw.headers["x-keyplane-attempts"] == "1"
    assert raw.parse().output_text == "Continued from the fake upstream!"
    assert fleet.first.requests_to("/responses")[-1].json["previous_response_id"] == first


async def test_continuation_never_fails_over(fleet: Fleet) -> None:
    async with fleet.client() as client:
        first = await _created_by_o2(fleet, client)
        fleet.first.program("sk-two", rate_limited(30), times=1)
        with pytest.raises(openai.RateLimitError) as exc:
            await client.responses.create(model=MODEL, input="more", previous_response_id=first)
    assert exc.value.response.headers["x-keyplane-attempts"] == "1"
    assert [r.secret for r in fleet.first.requests_to("/responses")][-1] == "sk-two"
    assert fleet.second.requests_to("/responses") == []


async def test_continuation_of_an_unusable_key_is_a_409(fleet: Fleet) -> None:
    async with fleet.client() as client:
        first = await _created_by_o2(fleet, client)
        until = time.time() + 600
        fleet.sidecar.state.apply(
            p.delta(p.key_health_put(11, TENANT, p.key_health("o2", "", p.COOLDOWN, until=until, reason="429")))
        )
        sent = len(fleet.first.requests)
        with pytest.raises(openai.ConflictError) as exc:
            await client.responses.create(model=MODEL, input="more", previous_response_id=first)
    assert exc.value.status_code == 409
    assert exc.value.code == "previous_response_unavailable"
    assert exc.value.param == "previous_response_id"
    assert "cooldown" in exc.value.message
    assert len(fleet.first.requests) == sent  # nothing was sent upstream


async def test_unknown_previous_response_is_passed_through(fleet: Fleet) -> None:
    async with fleet.client() as client:
        with pytest.raises(openai.BadRequestError) as exc:
            await client.responses.create(model=MODEL, input="more", previous_response_id="resp_elsewhere")
    # The upstream's own answer, unchanged; a client error is not retried.
    assert exc.value.code == "previous_response_not_found"
    assert exc.value.response.headers["x-keyplane-attempts"] == "1"


def test_affinity_is_bounded_and_expires() -> None:
    now = [1000.0]
    memory = ResponseAffinity(max_entries=3, ttl=60.0, clock=lambda: now[0])
    for n in range(5):
        memory.remember(TENANT, f"resp_{n}", f"k{n}")
    assert len(memory) == 3
    assert memory.lookup(TENANT, "resp_0") is None  # the oldest forgotten first
    assert memory.lookup(TENANT, "resp_4") == "k4"
    assert memory.lookup("other-tenant", "resp_4") is None  # per tenant
    now[0] += 61
    assert memory.lookup(TENANT, "resp_4") is None
    assert len(memory) == 2


def test_response_id_in_answers() -> None:
    assert response_id_in(b'{"id":"resp_1","object":"response"}', streaming=False) == "resp_1"
    head = b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_2"}}\n\n'
    assert response_id_in(head, streaming=True) == "resp_2"
    assert response_id_in(b"event: response.created\ndata: {trunc", streaming=True) is None
    assert response_id_in(b"not json", streaming=False) is None
