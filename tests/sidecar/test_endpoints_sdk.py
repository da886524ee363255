"""Every OpenAI endpoint through the sidecar, with the official openai SDK, against fake
providers speaking the real shapes: the answer, the model rewritten for the target, and
failover to a second key (401, 429) and to a second provider (5xx), all through the same
attempt loop as chat."""

from __future__ import annotations

import io
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

from tests.fakes.openai_endpoints import EMBEDDING, SPEECH_CHUNKS, TRANSCRIPT, TRANSLATION
from tests.fakes.upstream import INVALID_API_KEY, SERVER_ERROR, Reply, rate_limited

from .endpoint_fleet import AUDIO, COMPAT_MODEL, MODEL, UP_MODEL, Fleet

Raw = Any  # openai's LegacyAPIResponse: .headers, .parse()
Call = Callable[[openai.AsyncOpenAI, str], Awaitable[Raw]]


def _transcription(c: openai.AsyncOpenAI, model: str) -> Awaitable[Raw]:
    return c.audio.transcriptions.with_raw_response.create(model=model, file=("hello.wav", io.BytesIO(AUDIO)))


async def _translation(c: openai.AsyncOpenAI, model: str) -> Raw:
    # The SDK marks translations deprecated (the API still serves them).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return await c.audio.translations.with_raw_response.create(model=model, file=("hallo.wav", io.BytesIO(AUDIO)))


# endpoint -> (upstream path suffix, the SDK call, a check of the parsed answer)
CALLS: dict[str, tuple[str, Call, Callable[[Any], None]]] = {
    "embeddings": (
        "/embeddings",
        lambda c, m: c.embeddings.with_raw_response.create(model=m, input="hi"),
        lambda r: _eq(r.data[0].embedding, EMBEDDING),
    ),
    "completions": (
        "/completions",
        lambda c, m: c.completions.with_raw_response.create(model=m, prompt="Say hi"),
        lambda r: _eq(r.choices[0].text, "Hello from the fake upstream!"),
    ),
    "moderations": (
        "/moderations",
        lambda c, m: c.moderations.with_raw_response.create(model=m, input="hi"),
        lambda r: _eq(r.results[0].flagged, False),
    ),
    "responses": (
        "/responses",
        lambda c, m: c.responses.with_raw_response.create(model=m, input="Say hi"),
        lambda r: _eq(r.output_text, "Hello from the fake upstream!"),
    ),
    "images": (
        "/images/generations",
        lambda c, m: c.images.with_raw_response.generate(model=m, prompt="a cat"),
        lambda r: _eq(r.data[0].b64_json is not None, True),
    ),
    "transcriptions": ("/audio/transcriptions", _transcription, lambda r: _eq(r.text, TRANSCRIPT)),
    "translations": ("/audio/translations", _translation, lambda r: _eq(r.text, TRANSLATION)),
    "speech": (
        "/audio/speech",
        lambda c, m: c.audio.speech.with_raw_response.create(model=m, voice="alloy", input="hi"),
        lambda r: _eq(r.content, b"".join(SPEECH_CHUNKS)),
    ),
}


def _eq(got: object, want: object) -> None:
    assert got == want


def _model_seen(request: Any) -> object:
    return request.json["model"]


@pytest.mark.parametrize("name", list(CALLS))
async def test_endpoint_plain(fleet: Fleet, name: str) -> None:
    suffix, call, check = CALLS[name]
    async with fleet.client() as client:
        raw = await call(client, MODEL)
    check(raw.parse())
    assert raw.headers["x-keyplane-key"] == "o1"
    assert raw.headers["x-keyplane-attempts"] == "1"
    [seen] = fleet.first.requests_to(suffix)
    assert seen.path == "/v1" + suffix
    assert seen.secret == "sk-one"
    assert _model_seen(seen) == UP_MODEL  # the public model rewritten for the target (a multipart field too)
    if name in ("transcriptions", "translations"):
        assert seen.json["file"] == AUDIO  # the upload arrived whole, byte for byte


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize(
    ("failure", "excluded"), [(INVALID_API_KEY, "o1:credential"), (rate_limited(20), "o1:rate_limited")]
)
async def test_endpoint_fails_over_to_the_second_key(fleet: Fleet, name: str, failure: Reply, excluded: str) -> None:
    suffix, call, check = CALLS[name]
    fleet.first.program("sk-one", failure)
    async with fleet.client() as client:
        raw = await call(client, MODEL)
    check(raw.parse())
    assert raw.headers["x-keyplane-key"] == "o2"
    assert raw.headers["x-keyplane-attempts"] == "2"
    assert raw.headers["x-keyplane-excluded"] == excluded
    assert [r.secret for r in fleet.first.requests_to(suffix)] == ["sk-one", "sk-two"]
    if name in ("transcriptions", "translations"):
        assert [r.json["file"] for r in fleet.first.requests_to(suffix)] == [AUDIO, AUDIO]  # resent whole


@pytest.mark.parametrize("name", list(CALLS))
async def test_endpoint_fails_over_to_the_second_provider(fleet: Fleet, name: str) -> None:
    suffix, call, check = CALLS[name]
    fleet.first.program("sk-one", SERVER_ERROR)
    fleet.first.program("sk-two", SERVER_ERROR)
    async with fleet.client() as client:
        raw = await call(client, MODEL)
    check(raw.parse())
    assert raw.headers["x-keyplane-provider"] == "openai_compatible"
    assert raw.headers["x-keyplane-key"] == "c1"
    assert raw.headers["x-keyplane-attempts"] == "3"
    [seen] = fleet.second.requests_to(suffix)
    assert seen.secret == "sk-compat"
    assert _model_seen(seen) == COMPAT_MODEL


async def test_an_endpoint_the_route_does_not_serve_is_a_clear_404(fleet: Fleet) -> None:
    async with fleet.client() as client:
        for model in ("chat-only", "claude"):  # listed on the target; anthropic's default
            with pytest.raises(openai.NotFoundError) as exc:
                await client.embeddings.create(model=model, input="hi")
            assert exc.value.code == "endpoint_not_supported"
            assert "/v1/embeddings" in exc.value.message
        chat = await client.chat.completions.create(model="chat-only", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "Hello from the fake upstream!"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.embeddings.create(model="nope", input="hi")
        assert missing.value.code == "model_not_found"
    assert fleet.first.requests_to("/embeddings") == []


async def test_models_retrieve(fleet: Fleet) -> None:
    async with fleet.client() as client:
        model = await client.models.retrieve(MODEL)
        assert (model.id, model.object) == (MODEL, "model")
        with pytest.raises(openai.NotFoundError) as exc:
            await client.models.retrieve("nope")
    assert exc.value.code == "model_not_found"


async def test_large_upload_fails_over_whole(fleet: Fleet) -> None:
    """3 MiB: past the in-memory spool, sent again whole to the second key."""
    audio = bytes(range(256)) * (3 * 4096)
    fleet.first.program("sk-one", rate_limited(20))
    async with fleet.client() as client:
        raw = await client.audio.transcriptions.with_raw_response.create(
            model=MODEL, file=("long.wav", io.BytesIO(audio))
        )
    assert raw.parse().text == TRANSCRIPT
    assert raw.headers["x-keyplane-key"] == "o2"
    seen = fleet.first.requests_to("/audio/transcriptions")
    assert [(r.secret, r.json["model"], r.json["file"] == audio) for r in seen] == [
        ("sk-one", UP_MODEL, True),
        ("sk-two", UP_MODEL, True),
    ]
