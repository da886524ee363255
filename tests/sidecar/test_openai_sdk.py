"""The official OpenAI SDK talks to the sidecar as if it were OpenAI."""

from __future__ import annotations

import openai
import pytest

from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from .conftest import CLIENT_TOKEN, PUBLIC_MODEL, UPSTREAM_MODEL, standard_snapshot


async def test_sdk_plain_completion(sidecar: Sidecar, upstream: FakeUpstream) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sidecar.url}/v1", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model=PUBLIC_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        models = await client.models.list()
    assert completion.choices[0].message.content == "Hello from the fake upstream!"
    assert completion.model == UPSTREAM_MODEL
    assert [m.id for m in models.data] == [PUBLIC_MODEL]
    [seen] = upstream.chat_requests()
    assert seen.headers["authorization"] == "Bearer sk-one"


async def test_sdk_streaming_completion(sidecar: Sidecar, upstream: FakeUpstream) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sidecar.url}/v1", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=PUBLIC_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(parts) == "Hello from the fake upstream!"
    assert len(parts) > 3


async def test_sdk_sees_openai_errors(sidecar: Sidecar, upstream: FakeUpstream) -> None:
    sidecar.state.apply(standard_snapshot(upstream))
    async with openai.AsyncOpenAI(api_key="kp-wrong", base_url=f"{sidecar.url}/v1", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as exc:
            await client.chat.completions.create(model=PUBLIC_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{sidecar.url}/v1", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"
