"""The admin service's view of the fleet's convergence: ``GetProxyStatus``
(every sidecar on every replica, with its sync state) and ``WaitForVersion``
(block until every sidecar of a tenant applied a version, or a timeout).

Both read the shared record in the store (``control_plane.fleet``), so any
replica gives the same answer; the replica first catches up with the store's
change log, so that "newest change" means the store's newest. The states are
decided by ``control_plane.convergence``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from control_plane import convergence
from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.fleet import FleetTracker
from control_plane.status import map_errors
from control_plane.store.base import SidecarRecord
from keyplane import convert
from keyplane.errors import InvalidArgument, Unavailable
from keyplane.v1 import admin_service_pb2 as pb

__all__ = ["ProxyStatusAdmin"]

log = logging.getLogger("control_plane.admin_service")

DEFAULT_WAIT = 10.0
MAX_WAIT = 300.0
# How often a wait re-reads the shared record.
_POLL = 0.05

_STATES = {
    convergence.SyncState.SYNCED: pb.SYNC_STATE_SYNCED,
    convergence.SyncState.STALE: pb.SYNC_STATE_STALE,
    convergence.SyncState.NOT_ACKED: pb.SYNC_STATE_NOT_ACKED,
    convergence.SyncState.REJECTED: pb.SYNC_STATE_REJECTED,
}


class ProxyStatusAdmin(AdminBase):
    def _tracker(self) -> FleetTracker:
        if self._fleet is None:
            raise Unavailable("this control plane does not track sidecar acknowledgements")
        return self._fleet

    async def _caught_up(self) -> None:
        with contextlib.suppress(Exception):  # answer from memory if the store is away
            await self._hub.catch_up()

    def _status(self, fleet: FleetTracker, record: SidecarRecord) -> pb.ProxyStatus:
        latest = fleet.latest_for(record.tenants)
        message = pb.ProxyStatus(
            sidecar_id=record.sidecar_id,
            replica=record.replica,
            tenants=list(record.tenants or ()),
            all_tenants=record.tenants is None,
            peer=record.peer,
            sent_version=record.sent_version,
            applied_version=record.applied_version,
            rejected_version=record.rejected_version,
            error_detail=record.error_detail,
            state=_STATES[convergence.sync_state(record, latest)],
            latest_version=latest,
        )
        if record.connected_at is not None:
            message.connect_time.CopyFrom(convert.timestamp_from_datetime(record.connected_at))
        if record.acked_at is not None:
            message.ack_time.CopyFrom(convert.timestamp_from_datetime(record.acked_at))
        return message

    @map_errors
    async def GetProxyStatus(self, request: pb.GetProxyStatusRequest, context: Context) -> pb.GetProxyStatusResponse:
        tenant = v.validate_tenant_name(request.tenant) if request.tenant else ""
        fleet = self._tracker()
        await self._caught_up()
        records = await fleet.records()
        if tenant:
            records = [r for r in records if convergence.watches(r, tenant)]
        return pb.GetProxyStatusResponse(
            sidecars=[self._status(fleet, r) for r in records],
            replica=fleet.replica,
            version=self._hub.version,
        )

    @map_errors
    async def WaitForVersion(self, request: pb.WaitForVersionRequest, context: Context) -> pb.WaitForVersionResponse:
        tenant = v.validate_tenant_name(request.tenant)
        if request.version == 0:
            raise InvalidArgument("version: required (the version a write returned)")
        timeout = DEFAULT_WAIT
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            if not 0 <= timeout <= MAX_WAIT:
                raise InvalidArgument(f"timeout: must be between 0 and {MAX_WAIT:g} seconds")
        fleet = self._tracker()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._hub.version < request.version:
                await self._caught_up()
            records = await fleet.records()
            outcome = convergence.wait_outcome(records, tenant, request.version, self._clock(), fleet.expire_after)
            if outcome.converged or outcome.hopeless or loop.time() >= deadline:
                break
            await asyncio.sleep(min(_POLL, max(0.0, deadline - loop.time())))
        if not outcome.converged:
            log.info(
                "version %d of tenant %s: %d of %d sidecars applied it",
                request.version,
                tenant,
                outcome.applied,
                len(outcome.watching),
            )
        return pb.WaitForVersionResponse(
            converged=outcome.converged,
            sidecars=len(outcome.watching),
            applied=outcome.applied,
            pending=[self._status(fleet, r) for r in outcome.pending],
        )
