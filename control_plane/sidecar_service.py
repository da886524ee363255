"""The sidecar gRPC service: one long-lived Watch stream per sidecar.

The stream handler only checks the request against the token's scope and
forwards what the hub's subscription yields; the queueing, coalescing and
snapshot-or-delta decisions live in ``control_plane.hub``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from control_plane import validation as v
from control_plane.auth import current_sidecar_scope
from control_plane.hub import SnapshotHub
from control_plane.status import status_for
from keyplane.errors import KeyplaneError, NotFound
from keyplane.v1 import sidecar_service_pb2 as pb
from keyplane.v1 import sidecar_service_pb2_grpc

__all__ = ["SidecarService"]

log = logging.getLogger(__name__)

_MAX_SIDECAR_ID = 256


class SidecarService(sidecar_service_pb2_grpc.SidecarServiceServicer):
    def __init__(self, hub: SnapshotHub) -> None:
        self._hub = hub

    def _watch_set(self, request: pb.WatchRequest) -> frozenset[str] | None:
        scope = current_sidecar_scope()
        if scope is None:  # only when served without the AuthInterceptor
            raise PermissionError
        requested = [v.validate_tenant_name(t, field="tenants") for t in request.tenants]
        tenants = scope.resolve(requested)
        unknown = sorted(t for t in set(requested) if not self._hub.has_tenant(t))
        if unknown:
            raise NotFound(f"unknown tenant(s): {', '.join(unknown)}")
        return tenants

    async def Watch(
        self, request: pb.WatchRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchResponse]:
        try:
            tenants = self._watch_set(request)
        except PermissionError:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")
        except KeyplaneError as exc:
            mapped = status_for(exc)
            assert mapped is not None
            await context.abort(*mapped)
        sidecar_id = request.sidecar_id[:_MAX_SIDECAR_ID]
        subscription = self._hub.subscribe(tenants, request.resume_version, sidecar_id=sidecar_id, peer=context.peer())
        log.info(
            "sidecar %r (%s) watching %s from version %d",
            sidecar_id,
            context.peer(),
            "all tenants" if tenants is None else ",".join(sorted(tenants)),
            request.resume_version,
        )
        try:
            async for response in subscription:
                yield response
        finally:
            subscription.close()
            log.info("sidecar %r (%s) stream ended", sidecar_id, context.peer())
