"""Node affinity, the sidecar's pure half: (tenant, client key, public model) -> node.

Self-hosted inference servers (vLLM and alike) keep a prefix/KV cache per
node, so the requests of one client for one model should land on one node.
The control plane owns the bindings (``SidecarService.GetOrCreateBinding``);
this module holds what the sidecar keeps of them and decides, per request,
what to do with what it holds. No I/O; the clock is passed in.

- ``BindingCache``: bindings this sidecar has used, each until its expiry
  (wall-clock epoch seconds, as the control plane says). A lookup is one dict
  get and one comparison: no lock, no allocation.
- ``decide``: a cached binding whose node is usable (active and healthy) is a
  HIT; no binding is a MISS; a binding whose node is unhealthy, draining or
  removed is an OVERRIDE: the request ignores it and the control plane is
  asked to move it. The cache then holds the new node, so the binding never
  flaps back when the old node recovers before the binding expires.
- ``SingleFlight``: concurrent local misses for the same triple share one
  call to the control plane.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "Binding",
    "BindingCache",
    "BindingKey",
    "Decision",
    "SingleFlight",
    "decide",
]

DEFAULT_MAX_ENTRIES = 100_000

# (tenant, client key id, public model)
BindingKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding as the control plane last told this sidecar: its node and until when."""

    node_id: str
    # Wall-clock epoch seconds.
    expires_at: float


class Decision(enum.Enum):
    HIT = "hit"  # go to the bound node, no RPC
    MISS = "miss"  # no binding held here: ask the control plane
    OVERRIDE = "override"  # the bound node cannot serve now: ignore it, ask for a move


def decide(binding: Binding | None, node_usable: Callable[[str], bool]) -> Decision:
    """What a request does with the binding it found (``BindingCache.get``)."""
    if binding is None:
        return Decision.MISS
    if node_usable(binding.node_id):
        return Decision.HIT
    return Decision.OVERRIDE


class BindingCache:
    """The bindings this sidecar has used, each until it expires; bounded.

    Mutated only on the event loop (one thread), so reads need no lock. When
    full, the oldest inserted entries go first (a binding refreshed or moved
    is re-inserted, so it counts as new).
    """

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[BindingKey, Binding] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: BindingKey, now: float) -> Binding | None:
        """The live binding of ``key``, or None (an expired one is forgotten)."""
        found = self._entries.get(key)
        if found is None:
            return None
        if found.expires_at <= now:
            del self._entries[key]
            return None
        return found

    def peek(self, key: BindingKey) -> Binding | None:
        """What is held for ``key``, expired or not."""
        return self._entries.get(key)

    def put(self, key: BindingKey, binding: Binding) -> None:
        entries = self._entries
        entries.pop(key, None)
        entries[key] = binding
        if len(entries) > self.max_entries:
            # dicts keep insertion order: the first keys are the oldest.
            for old in list(entries)[: len(entries) - self.max_entries]:
                del entries[old]

    def update(self, key: BindingKey, binding: Binding) -> bool:
        """Replace ``key``'s binding only if this sidecar holds it (a pushed change);
        whether it did."""
        if key not in self._entries:
            return False
        self._entries[key] = binding
        return True

    def extend(self, key: BindingKey, node_id: str, expires_at: float) -> None:
        """A refresh confirmed ``key`` -> ``node_id`` until ``expires_at`` (kept if later)."""
        found = self._entries.get(key)
        if found is not None and found.node_id == node_id and expires_at > found.expires_at:
            self._entries[key] = Binding(node_id, expires_at)

    def drop(self, key: BindingKey) -> None:
        self._entries.pop(key, None)

    def drop_tenant(self, tenant: str) -> None:
        for key in [k for k in self._entries if k[0] == tenant]:
            del self._entries[key]

    def drop_client(self, tenant: str, client_key_id: str) -> None:
        for key in [k for k in self._entries if k[0] == tenant and k[1] == client_key_id]:
            del self._entries[key]

    def evict_expired(self, now: float) -> int:
        """Forget every expired binding; how many (a periodic sweep, off the request path)."""
        gone = [k for k, b in self._entries.items() if b.expires_at <= now]
        for key in gone:
            del self._entries[key]
        return len(gone)


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Concurrent calls for one key share one in-flight call.

    The first caller starts ``call()`` as a task; callers arriving while it
    runs await the same task. Each caller waits at most its ``wait`` seconds (then
    gets ``TimeoutError``) without cancelling the shared call, which runs on
    (so ``call`` itself stores its result where the next request finds it).
    A finished or failed call is forgotten at once: the next caller starts afresh.
    """

    __slots__ = ("_inflight",)

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def inflight(self, key: K) -> bool:
        return key in self._inflight

    async def do(self, key: K, call: Callable[[], Awaitable[T]], wait: float) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(_run(call))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.wait_for(asyncio.shield(task), wait)

    def _forget(self, key: K, done: asyncio.Task[T]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    def cancel_all(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()


async def _run(call: Callable[[], Awaitable[T]]) -> T:
    return await call()
