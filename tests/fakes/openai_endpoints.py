"""The fake upstream's answers for OpenAI's other endpoints, in their real shapes.

Shapes follow openai-python's types (``CreateEmbeddingResponse``, ``Completion``,
``ModerationCreateResponse``, ``Response`` and its typed stream events,
``ImagesResponse``, ``Transcription`` and its stream events) and the API's
behaviour: the SDK asks embeddings as base64 float32 by default; the Responses
API streams ``event: <type>`` + ``data:`` events from ``response.created`` to
``response.completed`` (no ``[DONE]``); a ``previous_response_id`` the account
does not hold is a 400 ``previous_response_not_found``; speech is binary audio,
sent in chunks; a translation is ``{"text": ...}``.

A stored response's calls (``stored_response``): GET ``/responses/{id}`` answers
the response object (its events again with ``?stream=true``), DELETE
``{"id", "object": "response", "deleted": true}``, POST ``.../cancel`` the object
``cancelled``, GET ``.../input_items`` a list of the input messages; an id the
account does not hold is OpenAI's 404 ``Response with id '...' not found.``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = [
    "EMBEDDING",
    "ENDPOINTS",
    "SPEECH_CHUNKS",
    "TRANSCRIPT",
    "TRANSLATION",
    "EndpointState",
    "stored_call",
    "stored_response",
]

EMBEDDING = [0.25, -0.5, 0.125]
TRANSCRIPT = "Hello from the fake transcriber."
TRANSLATION = "Hello from the fake translator."
SPEECH_CHUNKS = tuple(bytes([n]) * 4096 for n in range(1, 6))
_ids = itertools.count(1)


class EndpointState:
    """What the endpoints remember: stored responses, by the secret (account) that made them."""

    def __init__(self) -> None:
        self.responses: dict[str, str] = {}
        # Response id -> (the request's body, the answer's text): what GET gives back.
        self.stored: dict[str, tuple[dict[str, Any], str]] = {}
        # When set, a Responses API stream drops the connection after this many events.
        self.break_after_events: int | None = None


class _Cut(Exception):
    """The stream was cut on purpose."""


Handler = Callable[[web.Request, Any, str, EndpointState], Awaitable[web.StreamResponse]]


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


async def embeddings(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    data = []
    for index in range(count):
        vector: Any = EMBEDDING
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return _json(
        200,
        {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 5, "total_tokens": 5}},
    )


async def completions(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    def completion(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": "cmpl-fake0001",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_fake",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if body.get("stream") is not True:
        return _json(200, {**completion("Hello from the fake upstream!", "stop"), "usage": _usage()})
    response = await _sse(request)
    for text in ("Hello", " from", " the", " fake", " upstream!"):
        await response.write(b"data: " + json.dumps(completion(text, None)).encode() + b"\n\n")
    await response.write(b"data: " + json.dumps(completion("", "stop")).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def moderations(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    categories = ("harassment", "hate", "self-harm", "sexual", "violence")
    return _json(
        200,
        {
            "id": "modr-fake0001",
            "model": body["model"],
            "results": [
                {
                    "flagged": False,
                    "categories": {c: False for c in categories},
                    "category_scores": {c: 0.0001 for c in categories},
                    "category_applied_input_types": {c: ["text"] for c in categories},
                }
            ],
        },
    )


def _response_object(response_id: str, body: Any, status: str, text: str | None) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if text is not None:
        output.append(
            {
                "type": "message",
                "id": f"msg_{response_id[5:]}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        )
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "model": body["model"],
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        }
        if status == "completed"
        else None,
        "metadata": {},
    }


async def responses(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    previous = body.get("previous_response_id")
    if previous is not None and state.responses.get(previous) != secret:
        return _json(
            400,
            {
                "error": {
                    "message": f"Previous response with id '{previous}' not found.",
                    "type": "invalid_request_error",
                    "param": "previous_response_id",
                    "code": "previous_response_not_found",
                }
            },
        )
    response_id = f"resp_fake{next(_ids):06d}"
    state.responses[response_id] = secret
    text = "Hello from the fake upstream!" if previous is None else "Continued from the fake upstream!"
    state.stored[response_id] = (body, text)
    if body.get("stream") is not True:
        return _json(200, _response_object(response_id, body, "completed", text))
    response = await _sse(request)
    sequence = itertools.count()
    message_id = f"msg_{response_id[5:]}"

    async def event(kind: str, **fields: Any) -> None:
        number = next(sequence)
        payload = {"type": kind, "sequence_number": number, **fields}
        await response.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
        if state.break_after_events is not None and number + 1 >= state.break_after_events:
            assert request.transport is not None
            request.transport.abort()
            raise _Cut

    try:
        await _stream_response(event, response_id, body, text, message_id)
    except _Cut:
        return response
    await response.write_eof()
    return response


async def _stream_response(
    event: Callable[..., Awaitable[None]], response_id: str, body: Any, text: str, message_id: str
) -> None:

    await event("response.created", response=_response_object(response_id, body, "in_progress", None))
    await event("response.in_progress", response=_response_object(response_id, body, "in_progress", None))
    item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
    await event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    await event("response.content_part.added", item_id=message_id, output_index=0, content_index=0, part=part)
    for delta in text.split(" "):
        piece = delta if delta == text.split(" ")[0] else " " + delta
        await event(
            "response.output_text.delta",
            item_id=message_id,
            output_index=0,
            content_index=0,
            delta=piece,
            logprobs=[],
        )
    await event(
        "response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text, logprobs=[]
    )
    done = _response_object(response_id, body, "completed", text)
    await event(
        "response.content_part.done",
        item_id=message_id,
        output_index=0,
        content_index=0,
        part=done["output"][0]["content"][0],
    )
    await event("response.output_item.done", output_index=0, item=done["output"][0])
    await event("response.completed", response=done)


async def images(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake-image").decode()
    if body.get("stream") is True:
        return await _image_stream(request, body, png)
    return _json(
        200,
        {
            "created": int(time.time()),
            "data": [{"b64_json": png, "revised_prompt": None}],
            "usage": {
                "input_tokens": 5,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 5},
                "output_tokens": 100,
                "total_tokens": 105,
            },
        },
    )


async def _image_stream(request: web.Request, body: Any, png: str) -> web.StreamResponse:
    """gpt-image-1's stream: ``partial_images`` partial images, then the completed one."""
    response = await _sse(request)
    common = {
        "b64_json": png,
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": "png",
        "quality": "medium",
        "size": "1024x1024",
    }
    for index in range(int(body.get("partial_images") or 0)):
        event = {**common, "type": "image_generation.partial_image", "partial_image_index": index}
        await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    usage = {
        "input_tokens": 5,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 5},
        "output_tokens": 100,
        "total_tokens": 105,
    }
    done = {**common, "type": "image_generation.completed", "usage": usage}
    await response.write(f"event: {done['type']}\ndata: {json.dumps(done)}\n\n".encode())
    await response.write_eof()
    return response


async def transcriptions(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    if not isinstance(body, dict) or "file" not in body:
        return _json(400, {"error": {"message": "No file", "type": "invalid_request_error", "param": "file"}})
    if body.get("stream") != "true":
        return _json(200, {"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": 2}})
    response = await _sse(request)
    words = TRANSCRIPT.split(" ")
    for index, word in enumerate(words):
        delta = word if index == 0 else " " + word
        await response.write(
            b"data: " + json.dumps({"type": "transcript.text.delta", "delta": delta}).encode() + b"\n\n"
        )
    done = {
        "type": "transcript.text.done",
        "text": TRANSCRIPT,
        "usage": {"type": "tokens", "input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
    }
    await response.write(b"data: " + json.dumps(done).encode() + b"\n\n")
    await response.write_eof()
    return response


async def translations(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    if not isinstance(body, dict) or "file" not in body:
        return _json(400, {"error": {"message": "No file", "type": "invalid_request_error", "param": "file"}})
    return _json(200, {"text": TRANSLATION})


_STORED = re.compile(r".*/responses/(?P<id>[^/]+)(?:/(?P<tail>cancel|input_items))?")


def stored_call(path: str) -> tuple[str, str] | None:
    """(response id, "" | "cancel" | "input_items") of a stored response's call."""
    found = _STORED.fullmatch(path)
    return None if found is None else (found["id"], found["tail"] or "")


async def stored_response(
    request: web.Request, call: tuple[str, str], secret: str, state: EndpointState
) -> web.StreamResponse:
    response_id, tail = call
    allowed = {"": ("GET", "DELETE"), "cancel": ("POST",), "input_items": ("GET",)}[tail]
    if request.method not in allowed:
        return _json(
            404, {"error": {"message": "Not found", "type": "invalid_request_error", "param": None, "code": None}}
        )
    if state.responses.get(response_id) != secret or response_id not in state.stored:
        message = f"Response with id '{response_id}' not found."
        return _json(404, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    body, text = state.stored[response_id]
    if request.method == "DELETE":
        del state.stored[response_id]
        return _json(200, {"id": response_id, "object": "response", "deleted": True})
    if tail == "cancel":
        return _json(200, _response_object(response_id, body, "cancelled", None))
    if tail == "input_items":
        given = body.get("input")
        content = [{"type": "input_text", "text": given if isinstance(given, str) else json.dumps(given)}]
        item = {"id": f"msg_in{response_id[5:]}", "type": "message", "role": "user", "status": "completed"}
        data = [{**item, "content": content}]
        return _json(
            200, {"object": "list", "data": data, "first_id": item["id"], "last_id": item["id"], "has_more": False}
        )
    if request.query.get("stream") != "true":
        return _json(200, _response_object(response_id, body, "completed", text))
    response = await _sse(request)
    sequence = itertools.count()

    async def event(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        await response.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())

    await _stream_response(event, response_id, body, text, f"msg_{response_id[5:]}")
    await response.write_eof()
    return response


async def speech(request: web.Request, body: Any, secret: str, state: EndpointState) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"content-type": "audio/mpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for chunk in SPEECH_CHUNKS:
        await response.write(chunk)
        await asyncio.sleep(0.001)
    await response.write_eof()
    return response


async def _sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    )
    await response.prepare(request)
    return response


# Path suffix (under /v1) -> handler.
ENDPOINTS: dict[str, Handler] = {
    "/embeddings": embeddings,
    "/completions": completions,
    "/moderations": moderations,
    "/responses": responses,
    "/images/generations": images,
    "/audio/transcriptions": transcriptions,
    "/audio/translations": translations,
    "/audio/speech": speech,
}
