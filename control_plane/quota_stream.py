"""The StreamQuota handler (Envoy RLQS's shape): the sidecar's usage reports
come up, its leases go down after every rebalance (``QuotaBroker``). Reports
are read by a task of their own so that a slow sender never delays leases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from control_plane import validation as v
from control_plane.auth import PermissionDenied, current_sidecar_scope
from control_plane.quota_broker import QuotaBroker, QuotaSubscriber
from keyplane.errors import InvalidArgument
from keyplane.v1 import limits_pb2 as lpb

__all__ = ["stream_quota"]

log = logging.getLogger(__name__)

_MAX_SIDECAR_ID = 256


async def stream_quota(
    broker: QuotaBroker | None,
    request_iterator: AsyncIterator[lpb.StreamQuotaRequest],
    context: aio.ServicerContext[Any, Any],
) -> AsyncIterator[lpb.StreamQuotaResponse]:
    peer = context.peer()  # read before any await (see SidecarService.Watch)
    scope = current_sidecar_scope()
    if scope is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid sidecar token")
    if broker is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this control plane does not lease quotas")
    assert scope is not None and broker is not None
    first = await anext(aiter(request_iterator), None)
    if first is None:
        return
    try:
        if not first.sidecar_id:
            raise InvalidArgument("sidecar_id is required on the first StreamQuota message")
        requested = [v.validate_tenant_name(t, field="tenants") for t in first.tenants]
        tenants = scope.resolve(requested)
    except InvalidArgument as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except PermissionDenied as exc:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    subscriber = broker.subscribe(first.sidecar_id[:_MAX_SIDECAR_ID], tenants, prices_on_change=first.prices_on_change)
    log.info("sidecar %r (%s) streaming quota", subscriber.sidecar_id, peer)
    broker.report(subscriber, first.usage)
    reader = asyncio.create_task(_read_reports(broker, subscriber, request_iterator))
    try:
        while not reader.done():
            waiter = asyncio.ensure_future(subscriber.next())
            await asyncio.wait((waiter, reader), return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                break
            yield waiter.result()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        broker.unsubscribe(subscriber)
        log.info("sidecar %r (%s) quota stream ended", subscriber.sidecar_id, peer)


async def _read_reports(
    broker: QuotaBroker, subscriber: QuotaSubscriber, request_iterator: AsyncIterator[lpb.StreamQuotaRequest]
) -> None:
    async for request in request_iterator:
        refused = broker.report(subscriber, request.usage)
        if refused:
            log.debug("sidecar %r reported %d unknown or out-of-scope buckets", subscriber.sidecar_id, refused)
