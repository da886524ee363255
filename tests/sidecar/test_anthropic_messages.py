"""Anthropic's own Messages API through the sidecar, with the official anthropic SDK.

The app points the Anthropic SDK at the sidecar with its keyplane client key;
the sidecar forwards to a fake Anthropic API (a real HTTP server that wants
``x-api-key`` and ``anthropic-version`` and answers in Anthropic's shapes),
rotating and failing over between anthropic keys on Anthropic's own errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam

from sidecar.server import Sidecar
from tests.fakes.anthropic import (
    ANTHROPIC_CREDIT_TOO_LOW,
    ANTHROPIC_INVALID_KEY,
    ANTHROPIC_OVERLOADED,
    ANTHROPIC_PERMISSION,
    ANTHROPIC_RATE_LIMITED,
    FakeAnthropic,
)
from tests.fakes.upstream import BROKEN_STREAM

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT

MODEL = "claude-sonnet-4-5-20250929"
TEXT = "Hello from the fake upstream!"
ASK: list[MessageParam] = [{"role": "user", "content": "Hello, Claude"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as up:
        yield up


def _apply(sidecar: Sidecar, fake: FakeAnthropic, secrets: tuple[str, ...] = ("sk-ant-1",)) -> None:
    keys = [
        p.pkey(f"ak{i + 1}", secret, provider=p.ANTHROPIC, base_url=fake.base_url, weight=100 - i)
        for i, secret in enumerate(secrets)
    ]
    routes = [
        p.route("r1", "claude", p.target(MODEL, provider=p.ANTHROPIC)),
        # OpenAI first for chat; the Messages API takes the anthropic target only.
        p.route("r2", "mixed", p.target("gpt-4o"), p.target(MODEL, provider=p.ANTHROPIC, priority=1)),
        p.route("r3", "gpt", p.target("gpt-4o")),
        # An anthropic target that says it serves chat completions only.
        p.route("r4", "claude-chat", p.target(MODEL, provider=p.ANTHROPIC, endpoints=[p.ENDPOINT_CHAT_COMPLETIONS])),
    ]
    keys.append(p.pkey("oa1", "sk-openai", base_url=fake.url + "/openai/v1"))
    state = p.tenant_state(TENANT, keys=keys, routes=routes, client_keys=[p.client_key("ck1", CLIENT_TOKEN)])
    sidecar.state.apply(p.snapshot(10, state))


def _client(sidecar: Sidecar, token: str = CLIENT_TOKEN) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=token, base_url=sidecar.url, max_retries=0)


async def test_plain_message_and_count_tokens(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    _apply(sidecar, fake)
    async with _client(sidecar) as client:
        raw = await client.messages.with_raw_response.create(
            model="claude", max_tokens=256, messages=ASK, extra_headers={"anthropic-beta": "context-1m-2025-08-07"}
        )
        counted = await client.messages.count_tokens(model="mixed", messages=ASK)
    message = await raw.parse()
    assert message.content[0].type == "text" and message.content[0].text == TEXT
    assert message.model == MODEL and message.stop_reason == "end_turn"
    assert counted.input_tokens == 14
    assert raw.headers["x-keyplane-key"] == "ak1" and raw.headers["x-keyplane-provider"] == "anthropic"
    assert raw.headers["request-id"] == "req_fake"  # Anthropic's own headers reach the app
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    sent, count = fake.requests
    assert (sent.path, count.path) == ("/v1/messages", "/v1/messages/count_tokens")
    assert sent.json["model"] == MODEL and count.json["model"] == MODEL
    assert sent.headers["x-api-key"] == "sk-ant-1"
    assert sent.headers["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
    # The client key stays at the sidecar.
    assert "authorization" not in sent.headers
    assert all(CLIENT_TOKEN not in v for r in fake.requests for v in r.headers.values())


async def test_streaming_relays_anthropic_events(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    _apply(sidecar, fake)
    async with _client(sidecar) as client:
        async with client.messages.stream(model="claude", max_tokens=256, messages=ASK) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        events = [
            e.type async for e in await client.messages.create(model="claude", max_tokens=9, messages=ASK, stream=True)
        ]
    assert text == TEXT and final.stop_reason == "end_turn" and final.usage.output_tokens == 6
    assert events == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 6,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    # As-is, pings included, with an x-api-key client key (how most Anthropic apps authenticate).
    async with httpx.AsyncClient(base_url=sidecar.url) as raw:
        response = await raw.post(
            "/v1/messages",
            headers={"x-api-key": CLIENT_TOKEN, "anthropic-version": "2023-06-01"},
            json={"model": "claude", "max_tokens": 9, "messages": ASK, "stream": True},
        )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert 'event: ping\ndata: {"type":"ping"}\n\n' in response.text
    assert response.text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert fake.requests[-1].headers["anthropic-version"] == "2023-06-01"


async def test_failover_between_anthropic_keys_on_anthropic_errors(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    secrets = ("sk-ant-1", "sk-ant-2", "sk-ant-3", "sk-ant-4", "sk-ant-5", "sk-ant-6")
    _apply(sidecar, fake, secrets)
    fake.program("sk-ant-1", ANTHROPIC_OVERLOADED)
    fake.program("sk-ant-2", ANTHROPIC_RATE_LIMITED)
    fake.program("sk-ant-3", ANTHROPIC_INVALID_KEY)
    fake.program("sk-ant-4", ANTHROPIC_PERMISSION)
    fake.program("sk-ant-5", ANTHROPIC_CREDIT_TOO_LOW)
    async with _client(sidecar) as client:
        raw = await client.messages.with_raw_response.create(model="claude", max_tokens=64, messages=ASK)
        assert (await raw.parse()).content[0].text == TEXT  # type: ignore[union-attr]
        excluded = raw.headers["x-keyplane-excluded"]
        print("anthropic failover:", raw.headers["x-keyplane-attempts"], "attempts; excluded", excluded)
        assert raw.headers["x-keyplane-key"] == "ak6" and raw.headers["x-keyplane-attempts"] == "6"
        assert excluded.startswith("ak1:upstream_error,ak2:rate_limited,ak3:credential,ak4:credential,ak5:")
        assert fake.api_keys() == list(secrets)
        now = sidecar.state.wall_clock()
        health = sidecar.state.health(TENANT)
        assert health.key_block_reason("ak2", MODEL, now) == "cooldown"  # honours retry-after: 17
        assert health.key_block_reason("ak3", MODEL, now) == "unhealthy"
        assert health.key_block_reason("ak4", MODEL, now) == "unhealthy"
        assert health.key_block_reason("ak5", MODEL, now) is not None

        # The next request, streamed, skips the keys health excluded (ak1 may be tried again: one 529
        # does not cool a key down), and ak6 streams.
        before = len(fake.requests)
        async with client.messages.stream(model="claude", max_tokens=64, messages=ASK) as stream:
            text = "".join([t async for t in stream.text_stream])
        assert text == TEXT
        assert fake.api_keys(before) in (["sk-ant-6"], ["sk-ant-1", "sk-ant-6"])

        # When every key fails, the last answer (Anthropic's own 529) reaches the app.
        fake.program("sk-ant-6", ANTHROPIC_OVERLOADED)
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model="claude", max_tokens=64, messages=ASK)
    assert failed.value.status_code == 529
    assert failed.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}} | {
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"
    }


async def test_errors_in_streams(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    _apply(sidecar, fake)
    async with _client(sidecar) as client:
        # Anthropic's own mid-stream error event is relayed as it came.
        fake.stream_error_after = 2
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            async with client.messages.stream(model="claude", max_tokens=64, messages=ASK) as stream:
                async for _ in stream.text_stream:
                    pass
        assert isinstance(overloaded.value.body, dict) and overloaded.value.body["error"]["type"] == "overloaded_error"
        # ... and counts against the key like any stream broken after its first byte.
        assert _broken_streams(sidecar) == 1
        # A stream cut after its first bytes ends with an Anthropic-shaped error event from the sidecar.
        fake.stream_error_after = None
        fake.program("sk-ant-1", BROKEN_STREAM)
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with client.messages.stream(model="claude", max_tokens=64, messages=ASK) as stream:
                async for _ in stream.text_stream:
                    pass
    assert _broken_streams(sidecar) == 2
    assert broken.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The upstream stream broke off."},
    }


def _broken_streams(sidecar: Sidecar) -> float:
    metrics = sidecar.app.metrics.registry
    value = metrics.get_sample_value(
        "keyplane_sidecar_upstream_attempt_classes_total", {"provider": "anthropic", "error_class": "stream_broken"}
    )
    return value or 0.0


async def test_the_sidecars_own_errors_have_anthropics_shape(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    _apply(sidecar, fake)
    async with _client(sidecar, "kp-wrong") as wrong:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await wrong.messages.create(model="claude", max_tokens=9, messages=ASK)
    assert auth.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    async with _client(sidecar) as client:
        with pytest.raises(anthropic.NotFoundError) as unknown:
            await client.messages.create(model="nope", max_tokens=9, messages=ASK)
        with pytest.raises(anthropic.NotFoundError) as not_native:
            await client.messages.create(model="gpt", max_tokens=9, messages=ASK)
    assert isinstance(unknown.value.body, dict) and unknown.value.body["error"]["type"] == "not_found_error"
    assert isinstance(not_native.value.body, dict)
    assert not_native.value.body["error"]["type"] == "not_found_error"
    assert "no target of its route serves this endpoint" in not_native.value.body["error"]["message"]
    async with _client(sidecar) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="claude-chat", max_tokens=9, messages=ASK)
    async with httpx.AsyncClient(base_url=sidecar.url) as raw:
        missing = await raw.post("/v1/messages", json={"model": "claude"})
        no_model = await raw.post("/v1/messages", headers={"x-api-key": CLIENT_TOKEN}, json={"max_tokens": 1})
        method = await raw.get("/v1/messages", headers={"x-api-key": CLIENT_TOKEN})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert no_model.status_code == 400
    assert no_model.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "model: Field required"},
    }
    assert method.status_code == 405 and method.json()["type"] == "error"
    assert fake.requests == []  # none of these reached the provider


async def test_honest_answers_in_anthropics_shape_when_no_key_can_serve(sidecar: Sidecar, fake: FakeAnthropic) -> None:
    """The Messages API gets the same rescue as chat (``sidecar.rescue``): keys whose
    credentials failed give a 503 that says so, in Anthropic's error shape, never the
    provider's 401; keys that are all rate limited give a 429 at the earliest recovery."""
    _apply(sidecar, fake, ("sk-ant-1", "sk-ant-2"))
    fake.program("sk-ant-1", ANTHROPIC_INVALID_KEY)
    fake.program("sk-ant-2", ANTHROPIC_INVALID_KEY)
    async with _client(sidecar) as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model="claude", max_tokens=64, messages=ASK)
    assert failed.value.status_code == 503
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error" or body["error"]["type"] == "api_error"
    assert "invalid x-api-key" not in str(body) and "sk-ant" not in str(body)
    assert failed.value.response.headers.get("x-should-retry") == "false"

    sidecar.state.health(TENANT).reset_key("ak1")
    sidecar.state.health(TENANT).reset_key("ak2")
    fake.program("sk-ant-1", ANTHROPIC_RATE_LIMITED)
    fake.program("sk-ant-2", ANTHROPIC_RATE_LIMITED)
    async with _client(sidecar) as client:
        with pytest.raises(anthropic.APIStatusError) as limited:
            await client.messages.create(model="claude", max_tokens=64, messages=ASK)
    assert limited.value.status_code == 429
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1
