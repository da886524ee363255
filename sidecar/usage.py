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

A non-streamed body is searched for its last ``"usage"`` member and only the
integer members of that object are read, by two compiled regular expressions
(the answer is never JSON-decoded: a few microseconds a request); a stream's
tail (the chunks kept by ``sidecar.usage_stream``) likewise. The names the
providers use inside the details objects are unique, so they are read flat. When nothing is found,
``estimate`` guesses from sizes (about four bytes a token), marked as such.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Usage", "estimate", "usage_in_body", "usage_in_events"]

# A usage object (one level of nested details), and the integer members in it.
# (An unrolled loop: linear even on a cut-off object, no nested quantifiers to backtrack.)
_USAGE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')
_COUNTS = re.compile(rb'"(\w+)": ?(\d+)')
# Bytes of text per token, for estimates (OpenAI's rule of thumb for English).
_BYTES_PER_TOKEN = 4


class Usage(NamedTuple):
    """What one attempt consumed. ``input_tokens`` counts every input token (the
    cached and cache-written ones are parts of it); ``output_tokens`` every output
    token (``reasoning_tokens`` is part of it). A named tuple: made on every request."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


Fields = dict[bytes, bytes]


def _fields_at(data: bytes, at: int) -> Fields | None:
    """The integer members of the usage object whose key starts at ``at`` (None: no object
    there, e.g. ``"usage": null``, or one cut off). Details are flattened: the names the
    providers use inside them (``cached_tokens``, ``reasoning_tokens``) are unique."""
    match = _USAGE.match(data, at)
    if match is None:
        return None
    return dict(_COUNTS.findall(match.group(1)))


def _last_fields(data: bytes) -> Fields | None:
    at = data.rfind(b'"usage"')
    return None if at < 0 else _fields_at(data, at)


def _openai(f: Fields) -> Usage:
    if b"prompt_tokens" in f:
        return Usage(
            int(f[b"prompt_tokens"]),
            int(f.get(b"cached_tokens", 0)),
            0,
            int(f.get(b"completion_tokens", 0)),
            int(f.get(b"reasoning_tokens", 0)),
        )
    return Usage(
        int(f.get(b"input_tokens", 0)),
        int(f.get(b"cached_tokens", 0)),
        0,
        int(f.get(b"output_tokens", 0)),
        int(f.get(b"reasoning_tokens", 0)),
    )


def _anthropic(f: Fields, start: Fields | None = None) -> Usage:
    if start:
        f = start | f  # the delta's figures win (newer API versions repeat the input there)
    read = int(f.get(b"cache_read_input_tokens", 0))
    written = int(f.get(b"cache_creation_input_tokens", 0))
    return Usage(
        input_tokens=int(f.get(b"input_tokens", 0)) + read + written,
        cached_input_tokens=read,
        cache_write_input_tokens=written,
        output_tokens=int(f.get(b"output_tokens", 0)),
    )


def usage_in_body(body: bytes, *, anthropic: bool = False) -> Usage | None:
    """The usage a whole JSON answer reports (its last ``usage`` object), or None."""
    fields = _last_fields(body)
    if not fields:
        return None
    return _anthropic(fields) if anthropic else _openai(fields)


def usage_in_events(head: bytes, tail: bytes, *, anthropic: bool = False) -> Usage | None:
    """The usage a server-sent event stream reported: its last ``usage`` object (the
    usage chunk of chat and completions, ``response.completed``'s usage), or for
    Anthropic the ``message_start``'s (in ``head``) merged with the last ``message_delta``'s."""
    last = _last_fields(tail)
    if not anthropic:
        return _openai(last) if last else None
    at = head.find(b'"usage"')
    start = _fields_at(head, at) if at >= 0 else None
    if not last and not start:
        return None
    # Without a message_delta in the tail, the last usage is message_start's own: same figures.
    return _anthropic(last or {}, start)


def estimate(input_bytes: int, output_bytes: int = 0, output_events: int = 0) -> Usage:
    """A guess when the provider reported nothing: about four bytes of input a token,
    and for output one token a streamed event (or four bytes a token of a body)."""
    output = output_events if output_events > 0 else output_bytes // _BYTES_PER_TOKEN
    return Usage(input_tokens=input_bytes // _BYTES_PER_TOKEN, output_tokens=output, estimated=True)
