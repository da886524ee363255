"""A stored response's calls (retrieve, delete, cancel, input items) through the sidecar,
with the official SDK and raw HTTP: they go to the key that created the response (even
when another key would be picked), never fail over, pass the query on; an unknown id is
OpenAI's 404, an unusable creating key a 409, no client key a 401; and their upstream
URLs per provider shape (pure)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from keyplane.domain import Provider
from sidecar.endpoints import RESPONSES_CANCEL, RESPONSES_INPUT_ITEMS
from sidecar.model import Key, Target
from sidecar.router import Attempt
from sidecar.stored_responses import request_builder
from tests.fakes.upstream import rate_limited

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT
from .endpoint_fleet import AUDIO, MODEL, Fleet

AUTH = {"authorization": f"Bearer {CLIENT_TOKEN}"}


async def _created_by_o2(fleet: Fleet, client: openai.AsyncOpenAI) -> str:
    """A response created by key o2 (o1, picked first, answers 429 once), once o1 is
    the key picked again."""
    fleet.first.program("sk-one", rate_limited(1), times=1)
    raw = await client.responses.with_raw_response.create(model=MODEL, input="hi")
    assert raw.headers["x-keyplane-key"] == "o2"
    await asyncio.sleep(1.5)  # o1's short cooldown is over: it is the key picked now
    plain = await client.responses.with_raw_response.create(model=MODEL, input="again")
    assert plain.headers["x-keyplane-key"] == "o1"
    return raw.parse().id


def _calls_to(fleet: Fleet, response_id: str) -> list[tuple[str, str, str | None]]:
    return [(r.method, r.path, r.secret) for r in fleet.first.requests if response_id in r.path]


async def test_calls_go_to_the_creating_key(fleet: Fleet) -> None:
    async with fleet.client() as client:
        made = await _created_by_o2(fleet, client)
        raw = await client.responses.with_raw_response.retrieve(made)
        got = raw.parse()
        assert (got.id, got.object, got.output_text) == (made, "response", "Hello from the fake upstream!")
        assert (raw.headers["x-keyplane-key"], raw.headers["x-keyplane-attempts"]) == ("o2", "1")
        events = [e async for e in await client.responses.retrieve(made, stream=True)]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        assert events[-1].response.output_text == "Hello from the fake upstream!"
        items = await client.responses.input_items.list(made)
        assert [i.type for i in items.data] == ["message"]
        cancelled = await client.responses.cancel(made)
        assert (cancelled.id, cancelled.status) == (made, "cancelled")
        deleted = await client.responses.with_raw_response.delete(made)
        assert deleted.headers["x-keyplane-key"] == "o2"
        assert json.loads(deleted.content) == {"id": made, "object": "response", "deleted": True}
        # Deleted: forgotten here too, so the next call is the sidecar's 404 (nothing sent).
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.retrieve(made)
    assert gone.value.code == "response_not_found"
    base = f"/v1/responses/{made}"
    assert _calls_to(fleet, made) == [
        ("GET", base, "sk-two"),
        ("GET", base, "sk-two"),
        ("GET", base + "/input_items", "sk-two"),
        ("POST", base + "/cancel", "sk-two"),
        ("DELETE", base, "sk-two"),
    ]
    assert fleet.second.requests_to(made) == []


async def test_the_query_is_passed_on(fleet: Fleet) -> None:
    async with fleet.client() as client:
        made = await _created_by_o2(fleet, client)
    query = "include%5B%5D=message.output_text.logprobs&starting_after=3"
    async with httpx.AsyncClient(base_url=fleet.sidecar.url) as http:
        answer = await http.get(f"/v1/responses/{made}?{query}", headers=AUTH)
        assert answer.status_code == 200 and answer.json()["object"] == "response"
        listed = await http.get(f"/v1/responses/{made}/input_items?limit=5&order=asc", headers=AUTH)
        assert listed.status_code == 200 and listed.json()["object"] == "list"
    seen = [r for r in fleet.first.requests if made in r.path]
    assert [r.query for r in seen] == [query, "limit=5&order=asc"]
    assert "content-type" not in seen[0].headers


async def test_a_call_never_fails_over(fleet: Fleet) -> None:
    async with fleet.client() as client:
        made = await _created_by_o2(fleet, client)
        fleet.first.program("sk-two", rate_limited(30), times=1)
        with pytest.raises(openai.RateLimitError) as exc:
            await client.responses.retrieve(made)
    assert exc.value.response.headers["x-keyplane-attempts"] == "1"
    assert _calls_to(fleet, made) == [("GET", f"/v1/responses/{made}", "sk-two")]


async def test_an_unknown_id_is_openais_404(fleet: Fleet) -> None:
    async with fleet.client() as client:
        with pytest.raises(openai.NotFoundError) as exc:
            await client.responses.retrieve("resp_elsewhere")
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete("resp_elsewhere")
    assert exc.value.code == "response_not_found"
    assert exc.value.body == {
        "message": "Response with id 'resp_elsewhere' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": "response_not_found",
    }
    assert fleet.first.requests == [] and fleet.second.requests == []


async def test_an_unusable_creating_key_is_a_409(fleet: Fleet) -> None:
    async with fleet.client() as client:
        made = await _created_by_o2(fleet, client)
        until = time.time() + 600
        fleet.sidecar.state.apply(
            p.delta(p.key_health_put(11, TENANT, p.key_health("o2", "", p.COOLDOWN, until=until, reason="429")))
        )
        with pytest.raises(openai.ConflictError) as exc:
            await client.responses.retrieve(made)
    assert exc.value.code == "response_unavailable"
    assert "cooldown" in exc.value.message
    assert _calls_to(fleet, made) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/responses/resp_x"),
        ("DELETE", "/v1/responses/resp_x"),
        ("POST", "/v1/responses/resp_x/cancel"),
        ("GET", "/v1/responses/resp_x/input_items"),
        ("POST", "/v1/audio/translations"),
    ],
)
async def test_a_client_key_is_required(fleet: Fleet, method: str, path: str) -> None:
    files = {"file": ("a.wav", AUDIO)} if path.endswith("translations") else None
    async with httpx.AsyncClient(base_url=fleet.sidecar.url) as http:
        answer = await http.request(method, path, files=files, data={"model": MODEL} if files else None)
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert fleet.first.requests == []


async def test_other_paths_and_methods(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.sidecar.url) as http:
        wrong = await http.put("/v1/responses/resp_x", headers=AUTH)
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
        cancel = await http.get("/v1/responses/resp_x/cancel", headers=AUTH)
        assert cancel.status_code == 405
        unknown = await http.get("/v1/responses/resp_x/nope", headers=AUTH)
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_url")
        translations = await http.get("/v1/audio/translations", headers=AUTH)
        assert translations.status_code == 405


@pytest.mark.parametrize(
    ("base_url", "api_version", "url"),
    [
        ("https://api.openai.com/v1", "", "https://api.openai.com/v1/responses/resp_1/input_items?limit=5"),
        (
            "https://res.openai.azure.com",
            "",
            "https://res.openai.azure.com/openai/v1/responses/resp_1/input_items?limit=5",
        ),
        (
            "https://res.openai.azure.com",
            "2025-04-01-preview",
            "https://res.openai.azure.com/openai/deployments/m/responses/resp_1/input_items"
            "?limit=5&api-version=2025-04-01-preview",
        ),
    ],
)
def test_request_urls(base_url: str, api_version: str, url: str) -> None:
    provider = Provider.AZURE_OPENAI if "azure" in base_url else Provider.OPENAI
    key = Key("k", provider, base_url, "sk-test", True, 1, frozenset(), "k")
    target = Target(provider=provider, upstream_model="m", priority=0, weight=1, node_urls=(), api_version=api_version)
    build = request_builder(RESPONSES_INPUT_ITEMS, "resp_1", "limit=5")
    made = build(Attempt(target=target, key=key), {"x-request-id": "r1"})
    assert (made.method, made.url) == ("GET", url)
    assert "content-type" not in made.headers and made.headers["x-request-id"] == "r1"
    cancel = request_builder(RESPONSES_CANCEL, "resp_1", "")(Attempt(target=target, key=key), {})
    assert (cancel.method, cancel.url.partition("?")[0]) == (
        "POST",
        url.partition("?")[0].replace("input_items", "cancel"),
    )
