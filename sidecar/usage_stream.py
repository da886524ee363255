"""Reading a relayed stream's usage without ever holding a chunk back.

Kilo's lesson (their gateway split the response with ``tee()``, and a stalled
accounting reader froze client streams): the relay forwards every chunk itself,
and ``StreamTap.seen`` only keeps a reference to it (the first chunk and the
last ``_TAIL_CHUNKS``) and counts its events; the usage is parsed from those
(``sidecar.usage``) once the stream has ended, after the app has its last byte.

When the sidecar asked the provider for a usage chunk the app did not ask for
(``stream_options.include_usage``), the tap also strips it: complete events are
passed on as they come (a partial event waits for its end, which the app could
not use before either), minus the usage chunk (``"choices":[]`` with a usage
object) and minus the ``"usage":null`` member the provider then adds to every
other chunk; so the app receives exactly the bytes it would have without it.
"""

from __future__ import annotations

import re
from collections import deque

from .usage import Usage, estimate, usage_in_body, usage_in_events

__all__ = ["Metering", "StreamTap", "inject_usage_request"]

# Chunks kept for the usage at the end (a Responses ``response.completed`` event
# carries the whole response, so a few network chunks may make it up).
_TAIL_CHUNKS = 32
_TAIL_BYTES = 256 * 1024
# Anthropic's message_start (with the input usage) is in the first few KB.
_HEAD_BYTES = 8192
_NULL_USAGE = b',"usage":null'
_NULL_USAGE_SPACED = b', "usage": null'
_USAGE_CHUNK = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'
_ANTHROPIC_DELTA = b"event: content_block_delta"
_ANTHROPIC_FINAL = b"message_delta"


def inject_usage_request(raw: bytes) -> bytes | None:
    """``raw`` (a JSON object without ``stream_options``) asking for the stream's usage
    chunk, by appending the member before its closing brace; None if it does not end in one."""
    body = raw.rstrip()
    if not body.endswith(b"}"):
        return None
    inner = body[:-1].rstrip()
    if inner.endswith(b"{"):
        return inner + _INCLUDE_USAGE[1:] + b"}"
    return inner + _INCLUDE_USAGE + b"}"


def _without_null_usage(data: bytes) -> bytes:
    """``data`` without the ``"usage": null`` members asking for usage added to every chunk."""
    if _NULL_USAGE in data:
        return data.replace(_NULL_USAGE, b"")
    if _NULL_USAGE_SPACED in data:  # a provider that writes JSON with spaces
        return data.replace(_NULL_USAGE_SPACED, b"")
    return data


class StreamTap:
    """What a relayed stream consumed; ``seen`` every chunk (what it returns is what
    the app gets), ``finish`` at the end (the bytes still held), then ``usage``."""

    __slots__ = (
        "_anthropic",
        "_deltas",
        "_events",
        "_head",
        "_head_size",
        "_input_bytes",
        "_pending",
        "_strip",
        "_tail",
    )

    def __init__(self, *, input_bytes: int, anthropic: bool = False, strip: bool = False) -> None:
        self._input_bytes = input_bytes
        self._anthropic = anthropic
        self._strip = strip
        # The first chunks (Anthropic's message_start may span a few).
        self._head: list[bytes] = []
        self._head_size = 0
        self._tail: deque[bytes] = deque(maxlen=_TAIL_CHUNKS)
        self._events = 0
        self._deltas = 0  # Anthropic's content_block_delta events
        self._pending = b""

    def seen(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        if self._head_size < _HEAD_BYTES:
            self._head.append(chunk)
            self._head_size += len(chunk)
        self._tail.append(chunk)
        self._events += chunk.count(b"data:")
        if self._anthropic:
            self._deltas += chunk.count(_ANTHROPIC_DELTA)
        if not self._strip:
            return chunk
        return self._filter(chunk)

    def _filter(self, data: bytes) -> bytes:
        if self._pending:
            data, self._pending = self._pending + data, b""
        if not data.endswith(b"\n\n"):  # whole events are the rule; keep the partial one
            end = data.rfind(b"\n\n")
            if end < 0:
                self._pending = data
                return b""
            data, self._pending = data[: end + 2], data[end + 2 :]
        data = _without_null_usage(data)
        if b'"usage"' in data:  # with the nulls gone: the usage chunk
            data = b"\n\n".join(
                event
                for event in data.split(b"\n\n")
                if not (_USAGE_CHUNK.search(event) and _USAGE_OBJECT.search(event))
            )
        return data

    def finish(self) -> bytes:
        """The bytes held back (a partial last event), to send as they are."""
        pending, self._pending = self._pending, b""
        return _without_null_usage(pending) if self._strip else pending

    def usage(self) -> Usage:
        """What the stream reported, or an estimate (one token a streamed event)."""
        head = b"".join(self._head)
        # The usage is in the last events: the newest chunks up to _TAIL_BYTES are enough.
        kept: list[bytes] = []
        size = 0
        for chunk in reversed(self._tail):
            kept.append(chunk)
            size += len(chunk)
            if size >= _TAIL_BYTES:
                break
        kept.reverse()
        tail = b"".join(kept)
        found = usage_in_events(head, tail, anthropic=self._anthropic)
        if found is not None:
            if self._anthropic and _ANTHROPIC_FINAL not in tail:
                # Broken before its message_delta: the input is message_start's, the
                # output so far is only known as its deltas (one token each, a guess).
                return found._replace(output_tokens=max(found.output_tokens, self._deltas), estimated=True)
            return found
        return estimate(self._input_bytes, output_events=max(0, self._events - 1))


class Metering:
    """How one request's answer is metered: which usage shape, whether the usage
    chunk was asked for on the app's behalf (and is to be stripped), the input size
    (for estimates)."""

    __slots__ = ("anthropic", "input_bytes", "outputs", "strip")

    def __init__(self, *, input_bytes: int, anthropic: bool = False, strip: bool = False, outputs: bool = True) -> None:
        self.input_bytes = input_bytes
        self.anthropic = anthropic
        self.strip = strip
        # The answer is generated text (False: embeddings, whose body is no output tokens).
        self.outputs = outputs

    def tap(self) -> StreamTap:
        return StreamTap(input_bytes=self.input_bytes, anthropic=self.anthropic, strip=self.strip)

    def of_body(self, body: bytes) -> Usage:
        """The usage a whole (successful) answer reports, or an estimate from sizes."""
        found = usage_in_body(body, anthropic=self.anthropic)
        if found is not None:
            return found
        return estimate(self.input_bytes, output_bytes=len(body) if self.outputs else 0)


# The endpoints whose answers report tokens, and those whose streams take
# ``stream_options.include_usage`` (the others report usage in their last event unasked).
METERED = frozenset({"chat_completions", "completions", "embeddings", "responses", "messages"})
_ASKS_USAGE = frozenset({"chat_completions", "completions"})


def plan_metering(
    endpoint: str, payload: dict[str, object], raw: bytes, stream: bool
) -> tuple[Metering | None, bytes | None]:
    """How a JSON request's answer is metered, and the body to send for its own model:
    ``raw`` itself, the same asking for the stream's usage chunk, or None when ``payload``
    (changed here to ask for it) must be encoded anew."""
    if endpoint not in METERED:
        return None, raw
    if not (stream and endpoint in _ASKS_USAGE):
        metering = Metering(input_bytes=len(raw), anthropic=endpoint == "messages", outputs=endpoint != "embeddings")
        return metering, raw
    options = payload.get("stream_options")
    if (isinstance(options, dict) and options.get("include_usage") is True) or not (
        options is None or isinstance(options, dict)
    ):
        # The app asked (it gets the chunk), or sent something the upstream will judge.
        return Metering(input_bytes=len(raw)), raw
    metering = Metering(input_bytes=len(raw), strip=True)
    payload["stream_options"] = (
        {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    )
    if options is None and b"stream_options" not in raw:
        return metering, inject_usage_request(raw)
    return metering, None
