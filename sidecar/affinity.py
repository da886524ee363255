"""Responses API continuations: a ``previous_response_id`` sticks to the key that made it.

A stored response lives in the upstream account of the key that created it;
another key (another project, another provider) does not know it. So a
request naming ``previous_response_id`` cannot fail over:

- the id was created through this sidecar (remembered here, per tenant): the
  request goes to that key (and its provider) only, one attempt, whatever it
  answers is passed through. When that key is not usable now (cooldown,
  unhealthy, removed, or no target of the route serves its provider) the
  request fails at once with an OpenAI-shaped 409 ``previous_response_unavailable``;
- the id is unknown here (made elsewhere, or forgotten): stateless
  pass-through on the normal plan; an upstream that does not know it answers
  its own 4xx, which reaches the app unchanged (a client error is never retried).

A stored response's own calls (retrieve, delete, cancel, input items:
``sidecar.stored_responses``) go the same way, through the route the response
was made through (remembered with its key); an id unknown here is a 404, as
OpenAI answers an id its account does not hold. A deleted response is forgotten.

The memory is local to the sidecar process and bounded: at most
``max_entries`` ids (oldest forgotten first), each for ``ttl`` seconds
(OpenAI keeps stored responses 30 days). Pure but for the clock.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from . import errors
from .model import Key, Route, Target
from .proxy import AttemptsFailed, UpstreamReply
from .router import Attempt

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_TTL", "ResponseAffinity", "Sticky", "previous_response", "response_id_in"]

DEFAULT_MAX_ENTRIES = 65536
DEFAULT_TTL = 30 * 24 * 3600.0


class ResponseAffinity:
    """(tenant, response id) -> the key that created it (and the model asked); bounded, with a TTL."""

    __slots__ = ("_clock", "_entries", "max_entries", "ttl")

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        # Insertion order is age order: the oldest first.
        self._entries: OrderedDict[tuple[str, str], tuple[str, str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, tenant: str, response_id: str, key_id: str, model: str = "") -> None:
        """``model``: the app's model (the route) the response was made through."""
        entries = self._entries
        entries[(tenant, response_id)] = (key_id, model, self._clock() + self.ttl)
        entries.move_to_end((tenant, response_id))
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def lookup(self, tenant: str, response_id: str) -> str | None:
        found = self.find(tenant, response_id)
        return None if found is None else found[0]

    def find(self, tenant: str, response_id: str) -> tuple[str, str] | None:
        """(key id, model) of a response made here, or None."""
        found = self._entries.get((tenant, response_id))
        if found is None:
            return None
        key_id, model, expires = found
        if expires <= self._clock():
            del self._entries[(tenant, response_id)]
            return None
        return key_id, model

    def forget(self, tenant: str, response_id: str) -> None:
        self._entries.pop((tenant, response_id), None)


def previous_response(payload: dict[str, object]) -> str | None:
    """The ``previous_response_id`` a Responses API body continues, if any."""
    found = payload.get("previous_response_id")
    return found if isinstance(found, str) and found else None


def response_id_in(head: bytes, *, streaming: bool) -> str | None:
    """The id of the response an answer carries: the JSON body's ``id``, or, for a
    stream, the first event's (``response.created``) ``response.id``."""
    found = _answer_of(head, streaming=streaming)
    return found[0] if found is not None else None


def _answer_of(head: bytes, *, streaming: bool) -> tuple[str, bool] | None:
    """(response id, whether the answer says it was deleted) of an answer."""
    deleted = False
    try:
        if not streaming:
            payload = json.loads(head)
            found = payload.get("id") if isinstance(payload, dict) else None
            deleted = isinstance(payload, dict) and payload.get("deleted") is True
        else:
            found = None
            for line in head.splitlines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    response = event.get("response") if isinstance(event, dict) else None
                    found = response.get("id") if isinstance(response, dict) else None
                    break
    except ValueError:
        return None
    return (found, deleted) if isinstance(found, str) and found else None


class Sticky:
    """One Responses API request's side of the affinity: pin it, remember what it creates."""

    __slots__ = ("affinity", "model", "stored", "tenant")

    def __init__(self, affinity: ResponseAffinity, tenant: str, model: str = "", *, stored: bool = False) -> None:
        self.affinity = affinity
        self.tenant = tenant
        self.model = model
        # A stored response's own call (retrieve, delete...), not a continuation.
        self.stored = stored

    def pin(
        self,
        previous: str,
        route: Route,
        keys_for: Callable[[Target], Sequence[Key]],
        block_reason: Callable[[Target, Key], str | None],
    ) -> list[Attempt] | errors.ErrorResponse | None:
        """The one attempt a continuation of ``previous`` may make; the 409 to answer when
        its key cannot be used; None when ``previous`` is unknown here (normal plan)."""
        key_id = self.affinity.lookup(self.tenant, previous)
        if key_id is None:
            return None
        why = "its key is no longer configured for this model"
        for target in route.targets:
            for key in keys_for(target):
                if key.id != key_id:
                    continue
                blocked = block_reason(target, key)
                if blocked is None:
                    node = target.node_urls[0] if target.node_urls else None
                    return [Attempt(target=target, key=key, node_url=node)]
                why = f"its key is not usable now ({blocked})"
        if self.stored:
            return errors.response_unavailable(previous, why)
        return errors.previous_response_unavailable(previous, why)

    def created(self, reply: UpstreamReply | AttemptsFailed) -> None:
        """Remember which key created the response a successful answer carries."""
        if isinstance(reply, AttemptsFailed):
            return
        key = reply.attempt.key
        if key is None or not 200 <= reply.response.status < 300:
            return
        found = _answer_of(reply.head, streaming=reply.streaming)
        if found is None:
            return
        response_id, deleted = found
        if deleted:
            self.affinity.forget(self.tenant, response_id)
        else:
            self.affinity.remember(self.tenant, response_id, key.id, self.model)
