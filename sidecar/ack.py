"""The sidecar's side of acknowledged convergence (xDS ACK/NACK).

Every watch message goes through ``VersionGate.offer`` before it reaches
``SidecarState``: the gate checks what the state would become and either
applies it (ACK: the sidecar now serves that version) or rejects it with an
error detail and keeps serving what it held (NACK). What the sidecar rejects:

| the message would make the sidecar hold                          | verdict |
| ---------------------------------------------------------------- | ------- |
| a snapshot older than the version it holds (not a version reset) | reject, and resume from the held version |
| a route whose target names a provider this build does not know   | reject  |
| a route whose target names a provider outside ``--provider``     | reject  |
| anything else                                                    | apply   |

A rejected message is kept as pending: every later message on the stream is
checked together with the pending ones (their net effect), so a fix (the
route corrected or deleted) applies everything received since, in order,
and a sidecar never skips a version it rejected. Too many pending changes,
and the gate asks for a resync from the held version instead.

``AckSender`` tells the control plane (``SidecarService.Ack``) the latest
verdict, latest wins, off the watch loop. ``check_messages`` is pure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from keyplane.convert import provider_from_proto
from keyplane.domain import Provider
from keyplane.v1 import resources_pb2, sidecar_service_pb2, sidecar_service_pb2_grpc

from .state import SidecarState

__all__ = ["AckSender", "Decision", "VersionGate", "check_messages"]

_log = logging.getLogger(__name__)

# Changes held back after a rejection before the gate asks for a resync instead.
MAX_PENDING_CHANGES = 1000
_RETRY = 1.0
_ACK_TIMEOUT = 5.0


def _route_errors(tenant: str, route: resources_pb2.Route, served: frozenset[Provider] | None) -> Iterable[str]:
    for target in route.targets:
        provider = provider_from_proto(target.provider)
        if provider is None:
            yield (
                f"route {route.public_model!r} ({route.id}) of tenant {tenant} names provider #{target.provider}, "
                "unknown to this sidecar build (upgrade the sidecar)"
            )
        elif served is not None and provider not in served:
            yield (
                f"route {route.public_model!r} ({route.id}) of tenant {tenant} targets provider {provider.value}, "
                "which this sidecar does not serve (--provider)"
            )


def check_messages(
    messages: Sequence[sidecar_service_pb2.WatchResponse], held_version: int, served: frozenset[Provider] | None
) -> str | None:
    """Why the routes that ``messages`` (in order, on top of a valid state at
    ``held_version``) would leave the sidecar with cannot be served, or None."""
    final: dict[tuple[str, str], resources_pb2.Route | None] = {}
    for message in messages:
        kind = message.WhichOneof("payload")
        if kind == "snapshot":
            final = {(t.tenant, r.id): r for t in message.snapshot.tenants for r in t.routes}
        elif kind == "delta":
            for change in message.delta.changes:
                if change.version and change.version <= held_version:
                    continue  # already held (resume overlap); the state skips it too
                which = change.WhichOneof("change")
                if which == "route_put":
                    final[(change.tenant, change.route_put.id)] = change.route_put
                elif which == "route_deleted":
                    final[(change.tenant, change.route_deleted)] = None
                elif which == "tenant_deleted":
                    for key in [k for k in final if k[0] == change.tenant]:
                        final[key] = None
    errors = [
        e
        for (tenant, _), route in sorted(final.items())
        if route is not None
        for e in _route_errors(tenant, route, served)
    ]
    if not errors:
        return None
    return errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


@dataclass(frozen=True, slots=True)
class Decision:
    applied: bool
    # The stream cannot go on: reconnect, resuming from the held version.
    resync: bool = False
    # What was applied, in order (held-back messages first): the snapshot
    # keeper folds each of them into the persisted snapshot.
    messages: tuple[sidecar_service_pb2.WatchResponse, ...] = ()


def _changes(message: sidecar_service_pb2.WatchResponse) -> int:
    if message.WhichOneof("payload") == "delta":
        return len(message.delta.changes)
    return 1


class VersionGate:
    """Applies what is valid to ``state``, holds back what is not."""

    def __init__(self, state: SidecarState, served: Iterable[Provider] = ()) -> None:
        self._state = state
        served = frozenset(served)
        self._served = served or None  # None: every provider this build knows
        self._pending: list[sidecar_service_pb2.WatchResponse] = []
        self._pending_changes = 0
        self.rejected_version = 0
        self.error_detail = ""

    def reset_stream(self) -> None:
        """A new stream starts from the held version: forget what was pending."""
        self._pending = []
        self._pending_changes = 0

    def offer(self, message: sidecar_service_pb2.WatchResponse) -> Decision:
        state = self._state
        if message.WhichOneof("payload") == "snapshot":
            if message.version < state.version and not message.version_reset:
                self._reject(
                    message.version,
                    f"snapshot at version {message.version} is older than the held version {state.version}",
                )
                self.reset_stream()
                return Decision(applied=False, resync=True)
            candidate = [message]
        else:
            candidate = [*self._pending, message]
        error = check_messages(candidate, state.version, self._served)
        if error is not None:
            self._reject(message.version, error)
            if message.WhichOneof("payload") == "snapshot":
                self._pending_changes = 0
            self._pending = candidate
            self._pending_changes += _changes(message)
            if self._pending_changes > MAX_PENDING_CHANGES:
                self.reset_stream()
                return Decision(applied=False, resync=True)
            return Decision(applied=False)
        if message.version_reset and message.version < state.version:
            _log.warning(
                "the control plane's store is behind this sidecar (version %d < %d): taking its snapshot",
                message.version,
                state.version,
            )
        for held_back in candidate:
            state.apply(held_back)
        if self.rejected_version:
            _log.info("applied version %d; the rejection of version %d is over", state.version, self.rejected_version)
        self.reset_stream()
        self.rejected_version = 0
        self.error_detail = ""
        return Decision(applied=True, messages=tuple(candidate))

    def _reject(self, version: int, error: str) -> None:
        if error != self.error_detail:
            _log.error(
                "rejected watch message at version %d, keeping version %d: %s", version, self._state.version, error
            )
        self.rejected_version = version
        self.error_detail = error


class AckSender:
    """Sends the latest (applied, rejected, error) to the control plane, one
    call at a time, latest wins; stops for good on UNIMPLEMENTED (a control
    plane without acknowledgements)."""

    def __init__(self, sidecar_id: str, token: str) -> None:
        self._sidecar_id = sidecar_id
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub | None = None
        self._latest: tuple[int, int, str] | None = None
        self._sent: tuple[int, int, str] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._disabled = False
        self.acks_sent = 0

    def use(self, stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub) -> None:
        """Send on ``stub`` from now on (the watch's current connection)."""
        self._stub = stub
        self._sent = None  # a new stream: tell its replica's fleet record again

    def note(self, applied: int, rejected: int, error_detail: str) -> None:
        if self._disabled:
            return
        self._latest = (applied, rejected if rejected > applied else 0, error_detail if rejected > applied else "")
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keyplane-sidecar-ack")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            latest, stub = self._latest, self._stub
            if latest is None or latest == self._sent or stub is None:
                continue
            applied, rejected, error = latest
            request = sidecar_service_pb2.AckRequest(
                sidecar_id=self._sidecar_id, applied_version=applied, rejected_version=rejected, error_detail=error
            )
            try:
                await stub.Ack(request, metadata=self._metadata, timeout=_ACK_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    _log.info("the control plane does not take acknowledgements; not sending them")
                    self._disabled = True
                    return
                _log.debug("ack of version %d failed: %s; retrying", applied, exc.code().name)
                await asyncio.sleep(_RETRY)
                self._wake.set()
                continue
            self._sent = latest
            self.acks_sent += 1
