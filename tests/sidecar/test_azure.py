"""Azure OpenAI through the sidecar, both API shapes, with the official openai SDK.

The app speaks plain OpenAI to the sidecar; the sidecar calls a fake Azure
resource (a real HTTP server that checks the path, the api-version and the
``api-key`` header, and answers with Azure's real error bodies).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from sidecar.server import Sidecar
from tests.fakes.azure import AZURE_CONTENT_FILTER, AZURE_INVALID_KEY, AZURE_RATE_LIMITED, FakeAzure

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT

DEPLOYMENT = "gpt4o-prod"


@pytest.fixture
async def azure() -> AsyncIterator[FakeAzure]:
    async with FakeAzure(deployments={DEPLOYMENT}) as az:
        yield az


def _apply(sidecar: Sidecar, azure: FakeAzure, *, base_url: str, secrets: tuple[str, ...] = ("az-key-1",)) -> None:
    keys = [
        p.pkey(f"az{i + 1}", secret, provider=p.AZURE, base_url=base_url, weight=100 - i)
        for i, secret in enumerate(secrets)
    ]
    routes = [
        p.route("r-v1", "chat-v1", p.target("gpt-4o", provider=p.AZURE)),
        p.route(
            "r-classic",
            "chat-classic",
            p.target("gpt-4o", provider=p.AZURE, api_version="2024-10-21", deployment=DEPLOYMENT),
        ),
        # No deployment: the upstream model names it.
        p.route(
            "r-classic-model", "chat-classic-model", p.target(DEPLOYMENT, provider=p.AZURE, api_version="2024-10-21")
        ),
    ]
    sidecar.state.apply(
        p.snapshot(
            10, p.tenant_state(TENANT, keys=keys, routes=routes, client_keys=[p.client_key("ck1", CLIENT_TOKEN)])
        )
    )


def _client(sidecar: Sidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sidecar.url}/v1", max_retries=0)


@pytest.mark.parametrize("base", ["/openai/v1", ""])
async def test_v1_api_plain_and_streaming(sidecar: Sidecar, azure: FakeAzure, base: str) -> None:
    _apply(sidecar, azure, base_url=azure.url + base)
    async with _client(sidecar) as client:
        reply = await client.chat.completions.create(model="chat-v1", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="chat-v1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert reply.choices[0].message.content == "Hello from the fake upstream!"
    assert "".join(parts) == "Hello from the fake upstream!"
    assert [(c.shape, c.path, c.api_version, c.api_key, c.authorization) for c in azure.calls] == [
        ("v1", "/openai/v1/chat/completions", None, "az-key-1", None)
    ] * 2
    assert [r.model for r in azure.requests] == ["gpt-4o", "gpt-4o"]


@pytest.mark.parametrize("base", ["", "/openai/v1"])
async def test_classic_deployment_plain_and_streaming(sidecar: Sidecar, azure: FakeAzure, base: str) -> None:
    _apply(sidecar, azure, base_url=azure.url + base)
    async with _client(sidecar) as client:
        reply = await client.chat.completions.create(model="chat-classic", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="chat-classic-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert reply.choices[0].message.content == "Hello from the fake upstream!"
    assert "".join(parts) == "Hello from the fake upstream!"
    path = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert [(c.shape, c.path, c.api_version, c.api_key, c.authorization) for c in azure.calls] == [
        ("deployment", path, "2024-10-21", "az-key-1", None)
    ] * 2


async def test_azure_errors_fail_over_or_reach_the_app(sidecar: Sidecar, azure: FakeAzure) -> None:
    _apply(sidecar, azure, base_url=azure.url, secrets=("az-key-1", "az-key-2", "az-key-3"))
    # The first key is rate limited (429 with Retry-After), the second invalid (401): the third answers.
    azure.program("az-key-1", AZURE_RATE_LIMITED)
    azure.program("az-key-2", AZURE_INVALID_KEY)
    async with _client(sidecar) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat-classic", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == "Hello from the fake upstream!"
        assert raw.headers["x-keyplane-key"] == "az3"
        assert raw.headers["x-keyplane-excluded"] == "az1:rate_limited,az2:credential"
        print("azure failover:", raw.headers["x-keyplane-attempts"], "attempts;", raw.headers["x-keyplane-excluded"])
        assert [c.api_key for c in azure.calls] == ["az-key-1", "az-key-2", "az-key-3"]
        health = sidecar.state.health(TENANT)
        now = sidecar.state.wall_clock()
        assert health.key_block_reason("az1", "gpt-4o", now) == "cooldown"
        assert health.key_block_reason("az2", "gpt-4o", now) == "unhealthy"

        # The content filter is the prompt's fault: passed to the app as it is, on the first try, no key blamed.
        azure.program("az-key-3", AZURE_CONTENT_FILTER)
        before = len(azure.calls)
        with pytest.raises(openai.BadRequestError) as filtered:
            await client.chat.completions.create(model="chat-classic", messages=[{"role": "user", "content": "hi"}])
    assert filtered.value.code == "content_filter"
    assert filtered.value.param == "prompt"
    assert len(azure.calls) == before + 1
    assert sidecar.state.health(TENANT).key_block_reason("az3", "gpt-4o", sidecar.state.wall_clock()) is None


async def test_the_fake_checks_what_azure_checks(azure: FakeAzure) -> None:
    """The fake refuses what Azure refuses, so the tests above prove the sidecar's URL and header."""
    async with openai.AsyncOpenAI(api_key="x", base_url=azure.url, max_retries=0) as raw:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        no_version = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
        with pytest.raises(openai.NotFoundError):
            await raw.post(no_version, body=body, cast_to=object, options={"headers": {"api-key": "k"}})
        with pytest.raises(openai.NotFoundError):
            await raw.post(
                "/openai/deployments/nope/chat/completions",
                body=body,
                cast_to=object,
                options={"headers": {"api-key": "k"}, "params": {"api-version": "2024-10-21"}},
            )
    async with openai.AsyncAzureOpenAI(
        api_key="k", azure_endpoint=azure.url, api_version="2024-10-21", max_retries=0
    ) as sdk:
        done = await sdk.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "Hello from the fake upstream!"
    assert azure.calls[-1].shape == "deployment" and azure.calls[-1].api_key == "k"


async def test_other_endpoints_reach_the_deployment_too(sidecar: Sidecar, azure: FakeAzure) -> None:
    _apply(sidecar, azure, base_url=azure.url)
    async with _client(sidecar) as client:
        embedded = await client.embeddings.create(model="chat-classic", input="hello")
        v1 = await client.embeddings.create(model="chat-v1", input="hello")
    assert len(embedded.data[0].embedding) == len(v1.data[0].embedding) == 3
    assert [(c.shape, c.path, c.api_version) for c in azure.calls] == [
        ("deployment", f"/openai/deployments/{DEPLOYMENT}/embeddings", "2024-10-21"),
        ("v1", "/openai/v1/embeddings", None),
    ]
