"""Usage parsing (``sidecar.usage``) and the stream tap (``sidecar.usage_stream``): pure, no servers.

The shapes are the providers' own: OpenAI's ``CompletionUsage`` (with
``prompt_tokens_details`` / ``completion_tokens_details``), the Responses API's
``ResponseUsage`` (``input_tokens_details`` / ``output_tokens_details``), embeddings'
``{prompt_tokens, total_tokens}``, Anthropic's ``usage`` with ``cache_read_input_tokens``
and ``cache_creation_input_tokens`` and its stream's ``message_start`` / ``message_delta``.
"""

from __future__ import annotations

import json
import random

import pytest

from sidecar.usage import Usage, estimate, usage_in_body, usage_in_events
from sidecar.usage_stream import StreamTap, inject_usage_request, plan_metering

CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 256,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def test_chat_completion_body() -> None:
    body = dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": 'say "usage": {"x": 1}'}}],
            "usage": CHAT_USAGE,
            "service_tier": "default",
            "system_fingerprint": "fp_1",
        }
    )
    assert usage_in_body(body) == Usage(
        input_tokens=1200, cached_input_tokens=1024, output_tokens=300, reasoning_tokens=256
    )


def test_responses_and_embeddings_bodies() -> None:
    responses = dumps(
        {
            "id": "resp_1",
            "object": "response",
            "output": [],
            "usage": {
                "input_tokens": 40,
                "input_tokens_details": {"cached_tokens": 8},
                "output_tokens": 70,
                "output_tokens_details": {"reasoning_tokens": 64},
                "total_tokens": 110,
            },
        }
    )
    assert usage_in_body(responses) == Usage(
        input_tokens=40, cached_input_tokens=8, output_tokens=70, reasoning_tokens=64
    )
    embeddings = dumps({"object": "list", "data": [], "usage": {"prompt_tokens": 5, "total_tokens": 5}})
    assert usage_in_body(embeddings) == Usage(input_tokens=5)
    assert usage_in_body(b'{"id":"x","usage":null}') is None
    assert usage_in_body(b'{"id":"x"}') is None
    assert usage_in_body(b'{"usage":{"prompt_tokens":') is None  # cut


def test_anthropic_body_counts_cache_reads_and_writes_as_input() -> None:
    body = dumps(
        {
            "type": "message",
            "usage": {
                "input_tokens": 12,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 2000,
                "output_tokens": 6,
                "service_tier": "standard",
            },
        }
    )
    assert usage_in_body(body, anthropic=True) == Usage(
        input_tokens=2112, cached_input_tokens=2000, cache_write_input_tokens=100, output_tokens=6
    )


def anthropic_stream(output: int) -> list[bytes]:
    def event(name: str, data: object) -> bytes:
        return f"event: {name}\ndata: ".encode() + dumps(data) + b"\n\n"

    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 500,
                "output_tokens": 1,
            },
        },
    }
    out = [event("message_start", start), event("ping", {"type": "ping"})]
    out += [
        event("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}})
    ] * 3
    out.append(event("message_delta", {"type": "message_delta", "usage": {"output_tokens": output}}))
    out.append(event("message_stop", {"type": "message_stop"}))
    return out


def test_anthropic_stream_merges_start_and_delta() -> None:
    chunks = anthropic_stream(15)
    tap = StreamTap(input_bytes=100, anthropic=True)
    for chunk in chunks:
        assert tap.seen(chunk) is chunk  # passed on untouched
    assert tap.usage() == Usage(input_tokens=525, cached_input_tokens=500, output_tokens=15)


def chat_stream(with_usage: bool, spaced: bool = False) -> bytes:
    null = b', "usage": null' if spaced else b',"usage":null'
    head = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]'
    events = [head % t.encode() + (null if with_usage else b"") + b"}\n\n" for t in ("Hel", "lo", "!")]
    if with_usage:
        events.append(
            b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":' + dumps(CHAT_USAGE) + b"}\n\n"
        )
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


@pytest.mark.parametrize("spaced", [False, True])
def test_strip_gives_the_app_exactly_the_stream_it_asked_for(spaced: bool) -> None:
    """Whatever the chunking, the app gets the bytes of the stream without include_usage."""
    upstream, wanted = chat_stream(True, spaced), chat_stream(False)
    rng = random.Random(3)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(upstream)), rng.randint(1, 12)))
        pieces = [upstream[a:b] for a, b in zip([0, *cuts], [*cuts, len(upstream)], strict=True)]
        tap = StreamTap(input_bytes=40, strip=True)
        got = b"".join(tap.seen(p) for p in pieces) + tap.finish()
        assert got == wanted
        assert tap.usage() == Usage(
            input_tokens=1200, cached_input_tokens=1024, output_tokens=300, reasoning_tokens=256
        )


def test_a_stream_without_usage_is_estimated() -> None:
    tap = StreamTap(input_bytes=400)
    for piece in (chat_stream(False)[:50], chat_stream(False)[50:]):
        tap.seen(piece)
    # Four data events (three chunks and [DONE]): three tokens out; 400 bytes in: 100 tokens.
    assert tap.usage() == Usage(input_tokens=100, output_tokens=3, estimated=True)
    assert estimate(8, output_bytes=20) == Usage(input_tokens=2, output_tokens=5, estimated=True)


def test_responses_stream_reads_response_completed() -> None:
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_1", "usage": {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33}},
    }
    tail = (
        b"event: response.output_text.delta\ndata: {}\n\nevent: response.completed\ndata: " + dumps(completed) + b"\n\n"
    )
    assert usage_in_events(b"", tail) == Usage(input_tokens=11, output_tokens=22)


def test_injecting_the_usage_request() -> None:
    assert inject_usage_request(b'{"model":"m","stream":true}\n') == (
        b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    )
    assert inject_usage_request(b"{}") == b'{"stream_options":{"include_usage":true}}'
    assert inject_usage_request(b"[1]") is None


def test_plan_metering() -> None:
    raw = b'{"model":"m","stream":true,"messages":[]}'
    payload: dict[str, object] = json.loads(raw)
    metering, body = plan_metering("chat_completions", payload, raw, True)
    assert metering is not None and metering.strip
    assert body is not None and json.loads(body)["stream_options"] == {"include_usage": True}
    # The app asked: nothing changes, nothing is stripped.
    asked = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
    metering, body = plan_metering("chat_completions", json.loads(asked), asked, True)
    assert metering is not None and not metering.strip and body == asked
    # Other stream options are kept (the body is encoded anew).
    other = b'{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}'
    payload = json.loads(other)
    metering, body = plan_metering("chat_completions", payload, other, True)
    assert metering is not None and metering.strip and body is None
    assert payload["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    # Not streamed, or an endpoint that reports usage unasked: the body is the app's.
    assert plan_metering("chat_completions", {"model": "m"}, b"{}", False)[1] == b"{}"
    assert plan_metering("responses", {"model": "m"}, b"{}", True)[1] == b"{}"
    assert plan_metering("moderations", {"model": "m"}, b"{}", False) == (None, b"{}")


def test_anthropic_start_split_over_chunks_and_empty_chunks() -> None:
    stream = b"".join(anthropic_stream(15))
    tap = StreamTap(input_bytes=100, anthropic=True)
    assert tap.seen(b"") == b""  # an empty head (nothing sent before the stream) is not the start
    for at in range(0, len(stream), 40):
        tap.seen(stream[at : at + 40])
    assert tap.usage() == Usage(input_tokens=525, cached_input_tokens=500, output_tokens=15)


def test_an_embeddings_answer_without_usage_has_no_output_estimate() -> None:
    metering, _ = plan_metering("embeddings", {"model": "m"}, b'{"model":"m","input":"hello world!"}', False)
    assert metering is not None
    assert metering.of_body(b'{"object":"list","data":[{"embedding":[0.1,0.2]}]}') == Usage(
        input_tokens=9, estimated=True
    )


def test_a_broken_anthropic_stream_keeps_its_input_and_estimates_its_output() -> None:
    chunks = [b"".join(anthropic_stream(15)[:5])]  # message_start, ping, three deltas: then the stream broke
    tap = StreamTap(input_bytes=100, anthropic=True)
    for chunk in chunks:
        tap.seen(chunk)
    # message_start's input (cache reads included) is exact; the output is the deltas seen, estimated.
    assert tap.usage() == Usage(input_tokens=525, cached_input_tokens=500, output_tokens=3, estimated=True)
