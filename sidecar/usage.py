"""Token usage read from upstream answers: pure parsing, no I/O.

Providers report usage in three shapes, normalised here to one ``Usage``:

- OpenAI chat/completions/embeddings: ``usage.prompt_tokens`` (cached ones
  included, ``prompt_tokens_details.cached_tokens``), ``completion_tokens``
  (reasoning included, ``completion_tokens_details.reasoning_tokens``);
- OpenAI Responses (and images): ``usage.input_tokens`` with
  ``input_tokens_details.cached_tokens``, ``output_tokens`` with
  ``output_tokens_details.reasoning_tokens``;
- Anthropic Messages: ``usage.input_tokens`` counts only the uncached input;
  ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` come on top
  (here they are added into ``input_tokens`` and kept apart as details).

A non-streamed body is searched for its last ``"usage"`` member and only
that object is decoded (the whole answer is never parsed); a stream's tail
(the chunks kept by ``sidecar.usage_stream``) likewise. When nothing is found,
``estimate`` guesses from sizes (about four bytes a token), marked as such.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage", "estimate", "from_anthropic", "from_openai", "usage_in_body", "usage_in_events"]

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DECODER = json.JSONDecoder()
# Bytes of text per token, for estimates (OpenAI's rule of thumb for English).
_BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Usage:
    """What one attempt consumed. ``input_tokens`` counts every input token (the
    cached and cache-written ones are parts of it); ``output_tokens`` every output
    token (``reasoning_tokens`` is part of it)."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(value: object) -> int:
    """A token count as the provider sent it; anything but a non-negative int is 0."""
    return value if type(value) is int and value >= 0 else 0


def _detail(obj: Mapping[str, Any], member: str, name: str) -> int:
    details = obj.get(member)
    return _count(details.get(name)) if isinstance(details, Mapping) else 0


def from_openai(obj: object) -> Usage | None:
    """An OpenAI-shaped ``usage`` object (chat, completions, embeddings, Responses); None if it is not one."""
    if not isinstance(obj, Mapping):
        return None
    if "prompt_tokens" in obj:
        return Usage(
            input_tokens=_count(obj.get("prompt_tokens")),
            cached_input_tokens=_detail(obj, "prompt_tokens_details", "cached_tokens"),
            output_tokens=_count(obj.get("completion_tokens")),
            reasoning_tokens=_detail(obj, "completion_tokens_details", "reasoning_tokens"),
        )
    if "input_tokens" in obj or "output_tokens" in obj:
        return Usage(
            input_tokens=_count(obj.get("input_tokens")),
            cached_input_tokens=_detail(obj, "input_tokens_details", "cached_tokens"),
            output_tokens=_count(obj.get("output_tokens")),
            reasoning_tokens=_detail(obj, "output_tokens_details", "reasoning_tokens"),
        )
    return None


def from_anthropic(obj: object, start: object = None) -> Usage | None:
    """An Anthropic ``usage`` object; for a stream, the ``message_delta``'s (``obj``,
    cumulative output) over the ``message_start``'s (``start``, the input)."""
    if not isinstance(obj, Mapping):
        obj = {}
    first = start if isinstance(start, Mapping) else {}
    if not obj and not first:
        return None

    def pick(name: str) -> int:
        # The delta's figure when it has one (newer API versions repeat the input there).
        value = obj.get(name)
        return _count(value if value is not None else first.get(name))

    read = pick("cache_read_input_tokens")
    written = pick("cache_creation_input_tokens")
    return Usage(
        input_tokens=pick("input_tokens") + read + written,
        cached_input_tokens=read,
        cache_write_input_tokens=written,
        output_tokens=pick("output_tokens"),
    )


def _decode_at(data: bytes, match: re.Match[bytes]) -> object:
    """The JSON object that starts at the end of ``match`` (None when it is cut or invalid)."""
    start = match.end() - 1
    text = data[start:].decode("utf-8", "replace")
    try:
        obj, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return obj


def _last_usage(data: bytes) -> object:
    found = None
    for found in _USAGE.finditer(data):  # noqa: B007 - the last one is wanted
        pass
    return None if found is None else _decode_at(data, found)


def usage_in_body(body: bytes, *, anthropic: bool = False) -> Usage | None:
    """The usage a whole JSON answer reports (its last ``usage`` object), or None."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    match = _USAGE.match(body, at)
    if match is None:
        return None  # "usage": null
    obj = _decode_at(body, match)
    return from_anthropic(obj) if anthropic else from_openai(obj)


def usage_in_events(head: bytes, tail: bytes, *, anthropic: bool = False) -> Usage | None:
    """The usage a server-sent event stream reported: its last ``usage`` object (the
    usage chunk of chat and completions, ``response.completed``'s usage), or for
    Anthropic the ``message_start``'s (in ``head``) merged with the last ``message_delta``'s."""
    if anthropic:
        first = _USAGE.search(head)
        start = _decode_at(head, first) if first is not None else None
        # Without a message_delta in the tail, the last usage is message_start's own: same figures.
        return from_anthropic(_last_usage(tail), start)
    return from_openai(_last_usage(tail))


def estimate(input_bytes: int, output_bytes: int = 0, output_events: int = 0) -> Usage:
    """A guess when the provider reported nothing: about four bytes of input a token,
    and for output one token a streamed event (or four bytes a token of a body)."""
    output = output_events if output_events > 0 else output_bytes // _BYTES_PER_TOKEN
    return Usage(input_tokens=input_bytes // _BYTES_PER_TOKEN, output_tokens=output, estimated=True)
