"""The OpenAI-shaped endpoints the sidecar serves: one table, read by the edge and the handler.

Every endpoint goes through the same handler (``sidecar.chat``): auth, routing,
key rotation, failover, health and outcome reporting are the same; what
differs is said here, per endpoint:

- ``path``: the sidecar's path, and ``upstream_path``: what is appended to the
  key's base URL (``.../v1`` + ``/embeddings``);
- ``body``: how the request body is read and where the model is in it (a JSON
  object's ``model``, or a multipart form's ``model`` field);
- ``stream``: whether the answer is streamed (``stream: true`` in the body
  asks for server-sent events; a binary answer is always relayed as it comes);
- ``sse_errors``: how a stream broken mid-way is told to the app (chat's
  ``data:`` error object, or the Responses API's typed ``event: error``);
- ``sticky``: the body may name earlier upstream state (``previous_response_id``)
  that only the key that made it can continue (``sidecar.affinity``);
- ``served_by``: the endpoint whose targets serve this one too (translations ride
  on transcriptions; a stored response's calls on the Responses API), for
  endpoints that have no value of their own in the API's ``Endpoint`` enum.

A stored response's calls (``STORED_RESPONSE``: retrieve, delete, cancel, input
items) name the response in their path, not a model: ``sidecar.stored_responses``
routes them (``{id}`` in ``path`` and ``upstream_path``), to the key that created it.

A route target says which endpoints it serves (``RouteTarget.endpoints``);
empty means its provider's default (``DEFAULT_ENDPOINTS``). Pure data, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keyplane.domain import Provider
from keyplane.v1 import resources_pb2

__all__ = [
    "ALL",
    "AUDIO_SPEECH",
    "AUDIO_TRANSCRIPTIONS",
    "AUDIO_TRANSLATIONS",
    "BY_PATH",
    "BY_PROTO",
    "CHAT_COMPLETIONS",
    "COMPLETIONS",
    "DEFAULT_ENDPOINTS",
    "EMBEDDINGS",
    "IMAGES_GENERATIONS",
    "MESSAGES",
    "MODERATIONS",
    "RESPONSES",
    "RESPONSES_CANCEL",
    "RESPONSES_DELETE",
    "RESPONSES_INPUT_ITEMS",
    "RESPONSES_RETRIEVE",
    "STORED_RESPONSE",
    "BodyKind",
    "Endpoint",
    "SseErrors",
    "StreamKind",
    "endpoints_from_proto",
    "with_served",
]


class BodyKind(enum.Enum):
    # A JSON object; the model is its "model" member.
    JSON = "json"
    # multipart/form-data; the model is the "model" field. Spooled, never held whole in memory.
    MULTIPART = "multipart"


class StreamKind(enum.Enum):
    # Streamed (server-sent events) when the body says "stream": true.
    FLAG = "flag"
    # Never streamed: the whole answer is read, then relayed.
    NEVER = "never"
    # Always relayed as it arrives (a binary answer: audio).
    ALWAYS = "always"


class SseErrors(enum.Enum):
    # Chat-style: "data: {"error": {...}}".
    DATA = "data"
    # The Responses API's typed events: "event: error" + "data: {"type": "error", ...}".
    TYPED = "typed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    # Metrics label and the name used in config ("chat_completions").
    name: str
    path: str
    upstream_path: str
    proto: int
    method: str = "POST"
    body: BodyKind = BodyKind.JSON
    stream: StreamKind = StreamKind.FLAG
    sse_errors: SseErrors = SseErrors.DATA
    sticky: bool = False
    served_by: str = ""


E = resources_pb2.Endpoint

CHAT_COMPLETIONS = Endpoint(
    "chat_completions", "/v1/chat/completions", "/chat/completions", E.ENDPOINT_CHAT_COMPLETIONS
)
COMPLETIONS = Endpoint("completions", "/v1/completions", "/completions", E.ENDPOINT_COMPLETIONS)
EMBEDDINGS = Endpoint("embeddings", "/v1/embeddings", "/embeddings", E.ENDPOINT_EMBEDDINGS, stream=StreamKind.NEVER)
RESPONSES = Endpoint(
    "responses", "/v1/responses", "/responses", E.ENDPOINT_RESPONSES, sse_errors=SseErrors.TYPED, sticky=True
)
MODERATIONS = Endpoint(
    "moderations", "/v1/moderations", "/moderations", E.ENDPOINT_MODERATIONS, stream=StreamKind.NEVER
)
# gpt-image-1 streams partial images as events when asked. Their event types (like the
# transcription deltas') have no error event: a cut is told chat's way, which the SDK raises.
IMAGES_GENERATIONS = Endpoint(
    "images_generations", "/v1/images/generations", "/images/generations", E.ENDPOINT_IMAGES_GENERATIONS
)
AUDIO_TRANSCRIPTIONS = Endpoint(
    "audio_transcriptions",
    "/v1/audio/transcriptions",
    "/audio/transcriptions",
    E.ENDPOINT_AUDIO_TRANSCRIPTIONS,
    body=BodyKind.MULTIPART,
)
AUDIO_SPEECH = Endpoint(
    "audio_speech", "/v1/audio/speech", "/audio/speech", E.ENDPOINT_AUDIO_SPEECH, stream=StreamKind.ALWAYS
)
# Whisper's translation into English: transcriptions' shape, served by the targets serving those.
AUDIO_TRANSLATIONS = Endpoint(
    "audio_translations",
    "/v1/audio/translations",
    "/audio/translations",
    E.ENDPOINT_AUDIO_TRANSCRIPTIONS,
    body=BodyKind.MULTIPART,
    stream=StreamKind.NEVER,
    served_by=AUDIO_TRANSCRIPTIONS.name,
)

ALL: tuple[Endpoint, ...] = (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    MODERATIONS,
    IMAGES_GENERATIONS,
    AUDIO_TRANSCRIPTIONS,
    AUDIO_SPEECH,
    AUDIO_TRANSLATIONS,
)


def _stored(name: str, method: str, tail: str, stream: StreamKind) -> Endpoint:
    return Endpoint(
        name,
        "/v1/responses/{id}" + tail,
        "/responses/{id}" + tail,
        E.ENDPOINT_RESPONSES,
        method=method,
        stream=stream,
        sse_errors=SseErrors.TYPED,
        sticky=True,
        served_by=RESPONSES.name,
    )


# GET may stream the response again (``?stream=true``); the others answer JSON.
RESPONSES_RETRIEVE = _stored("responses_retrieve", "GET", "", StreamKind.FLAG)
RESPONSES_DELETE = _stored("responses_delete", "DELETE", "", StreamKind.NEVER)
RESPONSES_CANCEL = _stored("responses_cancel", "POST", "/cancel", StreamKind.NEVER)
RESPONSES_INPUT_ITEMS = _stored("responses_input_items", "GET", "/input_items", StreamKind.NEVER)
STORED_RESPONSE: tuple[Endpoint, ...] = (RESPONSES_RETRIEVE, RESPONSES_DELETE, RESPONSES_CANCEL, RESPONSES_INPUT_ITEMS)
# Anthropic's own Messages API (and its count_tokens): not OpenAI-shaped, so served by
# its own handler (``sidecar.anthropic_messages``), not through BY_PATH; a target names
# it like the others.
MESSAGES = Endpoint("messages", "/v1/messages", "/messages", E.ENDPOINT_MESSAGES, sse_errors=SseErrors.TYPED)

BY_PATH: Mapping[str, Endpoint] = {e.path: e for e in ALL}
BY_PROTO: Mapping[int, Endpoint] = {e.proto: e for e in (*ALL, MESSAGES) if not e.served_by}
BY_NAME: Mapping[str, Endpoint] = {e.name: e for e in (*ALL, MESSAGES, *STORED_RESPONSE)}

# Endpoint name -> the names of the endpoints served along with it.
_RIDERS: Mapping[str, frozenset[str]] = {
    name: frozenset(e.name for e in (*ALL, *STORED_RESPONSE) if e.served_by == name)
    for name in {e.served_by for e in (*ALL, *STORED_RESPONSE) if e.served_by}
}

_EVERY = frozenset(e.name for e in ALL)
_COMMON = frozenset({CHAT_COMPLETIONS.name, COMPLETIONS.name, EMBEDDINGS.name})

# What a target serves when its route does not say (by endpoint name).
DEFAULT_ENDPOINTS: Mapping[Provider, frozenset[str]] = {
    Provider.OPENAI: _EVERY,
    Provider.AZURE_OPENAI: _EVERY,
    Provider.OPENAI_COMPATIBLE: _EVERY,
    Provider.GEMINI: _COMMON,
    Provider.OPENROUTER: _COMMON,
    Provider.VLLM: _COMMON,
    # Anthropic's OpenAI-compatibility layer has chat completions only; its own Messages API besides.
    Provider.ANTHROPIC: frozenset({CHAT_COMPLETIONS.name, MESSAGES.name}),
}


def endpoints_from_proto(values: Iterable[int], provider: Provider) -> frozenset[str]:
    """The endpoint names a target serves: those listed (values this build does not know
    are left out), or its provider's default when none are listed."""
    values = tuple(values)
    if values:
        return frozenset(BY_PROTO[v].name for v in values if v in BY_PROTO)
    return DEFAULT_ENDPOINTS.get(provider, _COMMON)


def with_served(names: frozenset[str]) -> frozenset[str]:
    """``names`` with the endpoints served along with them (``Endpoint.served_by``)."""
    riders = [_RIDERS[n] for n in names if n in _RIDERS]
    return names.union(*riders) if riders else names
