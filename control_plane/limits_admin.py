"""The admin service's limits RPCs: set, get, list and clear the limits of a
client key or of a whole tenant, with what the fleet has left of each in its
current window (``control_plane.quota_broker``). Every write is audited and
then reloaded into the broker, so the next rebalance (about a second) leases
the new limits to the sidecars."""

from __future__ import annotations

import dataclasses
import logging

from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from keyplane.errors import InvalidArgument
from keyplane.limit_set import MAX_LIMIT, LimitSet
from keyplane.v1 import limits_pb2 as lpb

__all__ = ["LimitsAdmin", "limit_set_from_proto", "limits_to_proto"]

log = logging.getLogger("control_plane.admin_service")

_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "daily_budget_micros", "monthly_budget_micros")


def limit_set_from_proto(message: lpb.Limits, updated_at: object = None) -> LimitSet:
    tenant = v.validate_tenant_name(message.tenant, field="limits.tenant")
    client_key_id = v.validate_id(message.client_key_id, field="limits.client_key_id") if message.client_key_id else ""
    for name in _LIMIT_FIELDS:
        if getattr(message, name) > MAX_LIMIT:
            raise InvalidArgument(f"limits.{name} must be at most {MAX_LIMIT}")
    return LimitSet(
        tenant=tenant,
        client_key_id=client_key_id,
        requests_per_minute=message.requests_per_minute,
        tokens_per_minute=message.tokens_per_minute,
        daily_budget_micros=message.daily_budget_micros,
        monthly_budget_micros=message.monthly_budget_micros,
    )


def limits_to_proto(limits: LimitSet) -> lpb.Limits:
    message = lpb.Limits(
        tenant=limits.tenant,
        client_key_id=limits.client_key_id,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        daily_budget_micros=limits.daily_budget_micros,
        monthly_budget_micros=limits.monthly_budget_micros,
    )
    if limits.updated_at is not None:
        message.update_time.FromDatetime(limits.updated_at)
    return message


class LimitsAdmin(AdminBase):
    async def _limits_status(self, limits: LimitSet) -> lpb.LimitsStatus:
        usage = await self._quota.usage(limits) if self._quota is not None else []
        return lpb.LimitsStatus(limits=limits_to_proto(limits), usage=usage)

    async def _reload_quota(self) -> None:
        if self._quota is not None:
            await self._quota.reload()

    @map_errors
    @audited("limits")
    async def SetLimits(
        self, request: lpb.SetLimitsRequest, context: Context, audit: AuditDraft
    ) -> lpb.SetLimitsResponse:
        limits = limit_set_from_proto(request.limits)
        audit.about(limits.tenant, limits.client_key_id or limits.tenant, _LIMIT_FIELDS)
        stored = dataclasses.replace(limits, updated_at=self._clock())
        if stored.empty:
            await audit.write(lambda entry: self._store.delete_limits(stored.tenant, stored.client_key_id, audit=entry))
        else:
            await audit.write(lambda entry: self._store.put_limits(stored, audit=entry))
        await self._reload_quota()
        log.info("set limits of %s/%s", stored.tenant, stored.client_key_id or "*")
        return lpb.SetLimitsResponse(limits=limits_to_proto(stored))

    @map_errors
    async def GetLimits(self, request: lpb.GetLimitsRequest, context: Context) -> lpb.GetLimitsResponse:
        tenant = v.validate_tenant_name(request.tenant)
        client_key_id = v.validate_id(request.client_key_id, field="client_key_id") if request.client_key_id else ""
        limits = await self._store.get_limits(tenant, client_key_id)
        if limits is None:
            limits = LimitSet(tenant, client_key_id)
        return lpb.GetLimitsResponse(status=await self._limits_status(limits))

    @map_errors
    async def ListLimits(self, request: lpb.ListLimitsRequest, context: Context) -> lpb.ListLimitsResponse:
        tenant = v.validate_tenant_name(request.tenant)
        return lpb.ListLimitsResponse(
            statuses=[await self._limits_status(x) for x in await self._store.list_limits(tenant)]
        )

    @map_errors
    @audited("limits")
    async def ClearLimits(
        self, request: lpb.ClearLimitsRequest, context: Context, audit: AuditDraft
    ) -> lpb.ClearLimitsResponse:
        tenant = v.validate_tenant_name(request.tenant)
        client_key_id = v.validate_id(request.client_key_id, field="client_key_id") if request.client_key_id else ""
        audit.about(tenant, client_key_id or tenant)
        await audit.write(lambda entry: self._store.delete_limits(tenant, client_key_id, audit=entry))
        await self._reload_quota()
        log.info("cleared limits of %s/%s", tenant, client_key_id or "*")
        return lpb.ClearLimitsResponse()
