"""Streamed answers of the other OpenAI endpoints through the sidecar, with the official SDK:
text completions, the Responses API's typed events, transcription deltas and binary speech;
a stream fails over before its first byte and is cut with the endpoint's own error event."""

from __future__ import annotations

import io

import httpx

from tests.fakes.openai_endpoints import SPEECH_CHUNKS, TRANSCRIPT
from tests.fakes.upstream import SERVER_ERROR, rate_limited

from .conftest import CLIENT_TOKEN
from .endpoint_fleet import AUDIO, COMPAT_MODEL, MODEL, UP_MODEL, Fleet

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 5,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_completions_stream(fleet: Fleet) -> None:
    async with fleet.client() as client:
        stream = await client.completions.create(model=MODEL, prompt="Say hi", stream=True)
        parts = [chunk.choices[0].text async for chunk in stream]
    assert "".join(parts) == "Hello from the fake upstream!"
    assert len(parts) == 6


async def test_responses_stream_typed_events_and_failover(fleet: Fleet) -> None:
    fleet.first.program("sk-one", rate_limited(20), times=1)
    async with fleet.client() as client:
        stream = await client.responses.create(model=MODEL, input="Say hi", stream=True)
        events = [event async for event in stream]
    assert [e.type for e in events] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(RESPONSE_EVENTS)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello from the fake upstream!"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    assert completed.response.model == UP_MODEL
    assert [r.secret for r in fleet.first.requests_to("/responses")] == ["sk-one", "sk-two"]


async def test_responses_stream_with_the_sdk_helper(fleet: Fleet) -> None:
    async with fleet.client() as client:
        async with client.responses.stream(model=MODEL, input="Say hi") as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from the fake upstream!"


async def test_responses_stream_cut_midway_ends_with_a_typed_error_event(fleet: Fleet) -> None:
    # The fake's stream is cut by dropping the connection after the created event.
    fleet.first.endpoint_state.break_after_events = 2
    async with httpx.AsyncClient(base_url=fleet.sidecar.url, timeout=20) as client:
        r = await client.post(
            "/v1/responses",
            json={"model": MODEL, "input": "hi", "stream": True},
            headers={"authorization": f"Bearer {CLIENT_TOKEN}"},
        )
    assert r.status_code == 200
    assert r.text.startswith("event: response.created\n")
    assert r.text.endswith(
        'event: error\ndata: {"type":"error","code":"stream_broken",'
        '"message":"The upstream stream broke off.","param":null}\n\n'
    )


async def test_transcription_stream(fleet: Fleet) -> None:
    async with fleet.client() as client:
        stream = await client.audio.transcriptions.create(
            model=MODEL, file=("hello.wav", io.BytesIO(AUDIO)), stream=True
        )
        events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert "".join(deltas) == TRANSCRIPT
    assert events[-1].type == "transcript.text.done"
    [seen] = fleet.first.requests_to("/audio/transcriptions")
    assert (seen.json["stream"], seen.json["model"]) == ("true", UP_MODEL)


async def test_speech_is_relayed_as_it_arrives(fleet: Fleet) -> None:
    async with fleet.client() as client:
        async with client.audio.speech.with_streaming_response.create(
            model=MODEL, voice="alloy", input="hi"
        ) as response:
            assert response.headers["content-type"] == "audio/mpeg"
            assert "content-length" not in response.headers  # not buffered whole
            received = [chunk async for chunk in response.iter_bytes()]
    assert b"".join(received) == b"".join(SPEECH_CHUNKS)


async def test_images_stream(fleet: Fleet) -> None:
    async with fleet.client() as client:
        stream = await client.images.generate(model=MODEL, prompt="a cat", stream=True, partial_images=2)
        events = [event async for event in stream]
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    done = events[-1]
    assert done.type == "image_generation.completed"
    assert done.usage.total_tokens == 105
    [seen] = fleet.first.requests_to("/images/generations")
    assert (seen.json["model"], seen.json["stream"]) == (UP_MODEL, True)


async def test_streams_fail_over_to_the_second_provider(fleet: Fleet) -> None:
    """Before the first byte a stream fails over like any answer: both openai keys 5xx,
    the openai_compatible target streams (text completions, transcription deltas)."""
    fleet.first.program("sk-one", SERVER_ERROR)
    fleet.first.program("sk-two", SERVER_ERROR)
    async with fleet.client() as client:
        completion = await client.completions.with_raw_response.create(model=MODEL, prompt="hi", stream=True)
        assert completion.headers["x-keyplane-key"] == "c1"
        assert completion.headers["x-keyplane-attempts"] == "3"
        parts = [chunk.choices[0].text async for chunk in completion.parse()]
        transcription = await client.audio.transcriptions.create(
            model=MODEL, file=("hello.wav", io.BytesIO(AUDIO)), stream=True
        )
        deltas = [e.delta async for e in transcription if e.type == "transcript.text.delta"]
    assert "".join(parts) == "Hello from the fake upstream!"
    assert "".join(deltas) == TRANSCRIPT
    assert [r.json["model"] for r in fleet.second.requests] == [COMPAT_MODEL, COMPAT_MODEL]
