"""The usage RPCs of the admin service: prices (SetPrice, ListPrices,
DeletePrice, audited like every write) and GetUsage (``AdminService`` mixes
this class in; the rollups are ``control_plane.usage``'s).

GetUsage flushes this replica's folded usage first (read your own reports),
then sums the stored per-minute rollups over the time range, grouped by the
dimensions asked for and bucketed, one page at a time (the page token is the
offset of the next row; an unchanged request pages consistently as long as
no new minute lands inside the range).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from control_plane import validation as v
from control_plane.admin_base import AdminBase, Context
from control_plane.audit import AuditDraft, audited
from control_plane.status import map_errors
from control_plane.usage import Price, UsageQuery, UsageRecorder, minute_of
from control_plane.usage_records import price_to_proto
from keyplane import convert
from keyplane.domain import Provider
from keyplane.errors import InvalidArgument
from keyplane.v1 import admin_service_pb2 as pb
from keyplane.v1 import usage_pb2

__all__ = ["UsageAdmin"]

log = logging.getLogger("control_plane.admin_service")

_DEFAULT_PAGE = 100
_MAX_PAGE = 1000
# A price above $1,000,000 per million tokens is a typo (in micro-dollars).
_MAX_PRICE = 10**12
_DIMENSIONS = {
    usage_pb2.USAGE_DIMENSION_TENANT: "tenant",
    usage_pb2.USAGE_DIMENSION_CLIENT_KEY: "client_key_id",
    usage_pb2.USAGE_DIMENSION_PUBLIC_MODEL: "public_model",
    usage_pb2.USAGE_DIMENSION_PROVIDER_KEY: "provider_key_id",
    usage_pb2.USAGE_DIMENSION_PROVIDER: "provider",
    usage_pb2.USAGE_DIMENSION_UPSTREAM_MODEL: "upstream_model",
}
_BUCKETS = {
    usage_pb2.USAGE_BUCKET_UNSPECIFIED: 0,
    usage_pb2.USAGE_BUCKET_MINUTE: 60,
    usage_pb2.USAGE_BUCKET_HOUR: 3600,
    usage_pb2.USAGE_BUCKET_DAY: 86400,
}


def _model(name: str, field: str) -> str:
    # Upstream model names follow the public-model rules (non-empty, bounded, no whitespace).
    return v.validate_public_model(name, field=field)


class UsageAdmin(AdminBase):
    """Prices and usage of ``AdminService``."""

    # Set by the control plane when it records usage: GetUsage flushes it, SetPrice refreshes its prices.
    usage_recorder: UsageRecorder | None = None

    async def _prices_changed(self) -> None:
        """The usage recorder re-reads its prices, the quota broker its price table
        (the sidecars get it with their next leases)."""
        if self.usage_recorder is not None:
            self.usage_recorder.prices_changed()
        if self._quota is not None:
            await self._quota.reload()

    @map_errors
    @audited("price")
    async def SetPrice(self, request: pb.SetPriceRequest, context: Context, audit: AuditDraft) -> pb.SetPriceResponse:
        p = request.price
        tenant = v.validate_tenant_name(p.tenant, field="price.tenant")
        provider = v.validate_provider(convert.provider_from_proto(p.provider), field="price.provider")
        model = _model(p.model, "price.model")
        for name in ("input_micros_per_million", "cached_input_micros_per_million", "output_micros_per_million"):
            if getattr(p, name) > _MAX_PRICE:
                raise InvalidArgument(f"price.{name} must be at most {_MAX_PRICE} (micro-dollars per million tokens)")
        audit.about(
            tenant,
            f"{provider.value}:{model}",
            ("input_micros_per_million", "cached_input_micros_per_million", "output_micros_per_million"),
        )
        new = Price(
            tenant,
            provider,
            model,
            p.input_micros_per_million,
            p.cached_input_micros_per_million,
            p.output_micros_per_million,
            self._clock(),
        )
        stored = await audit.write(lambda entry: self._store.put_price(new, audit=entry))
        await self._prices_changed()
        log.info("set the price of %s:%s in tenant %s", provider.value, model, tenant)
        return pb.SetPriceResponse(price=price_to_proto(stored))

    @map_errors
    async def ListPrices(self, request: pb.ListPricesRequest, context: Context) -> pb.ListPricesResponse:
        tenant = v.validate_tenant_name(request.tenant)
        await self._store.get_tenant(tenant)  # NotFound for an unknown tenant
        return pb.ListPricesResponse(prices=[price_to_proto(p) for p in await self._store.list_prices(tenant)])

    @map_errors
    @audited("price")
    async def DeletePrice(
        self, request: pb.DeletePriceRequest, context: Context, audit: AuditDraft
    ) -> pb.DeletePriceResponse:
        tenant = v.validate_tenant_name(request.tenant)
        provider = v.validate_provider(convert.provider_from_proto(request.provider))
        model = _model(request.model, "model")
        audit.about(tenant, f"{provider.value}:{model}")
        await audit.write(lambda entry: self._store.delete_price(tenant, provider, model, audit=entry))
        await self._prices_changed()
        log.info("deleted the price of %s:%s in tenant %s", provider.value, model, tenant)
        return pb.DeletePriceResponse()

    @map_errors
    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        query = _query(request, self._clock())
        recorder = self.usage_recorder
        if recorder is not None:
            try:
                await recorder.flush()
            except Exception as exc:  # the stored rollups are still worth answering with
                log.warning("GetUsage: could not flush this replica's usage first: %s", exc)
        rows = await self._store.query_usage(query)
        size = query.limit - 1  # one row more was asked for, to know whether another page follows
        more = len(rows) > size
        page = rows[:size]
        out = pb.GetUsageResponse(next_page_token=str(query.offset + len(page)) if more else "")
        for group, bucket, t in page:
            row = out.rows.add(
                tenant=group.get("tenant", ""),
                client_key_id=group.get("client_key_id", ""),
                public_model=group.get("public_model", ""),
                provider_key_id=group.get("provider_key_id", ""),
                upstream_model=group.get("upstream_model", ""),
                requests=t.requests,
                failed_requests=t.failed_requests,
                estimated_requests=t.estimated_requests,
                input_tokens=t.input_tokens,
                cached_input_tokens=t.cached_input_tokens,
                cache_write_input_tokens=t.cache_write_input_tokens,
                output_tokens=t.output_tokens,
                reasoning_tokens=t.reasoning_tokens,
                cost_micros=t.cost_micros,
                unpriced_requests=t.unpriced_requests,
                attempts=t.attempts,
            )
            if "provider" in group:
                row.provider = convert.provider_to_proto(Provider(group["provider"]))
            if bucket is not None:
                row.bucket_start.FromSeconds(bucket)
        return out


def _query(request: pb.GetUsageRequest, now: datetime) -> UsageQuery:
    end = convert.datetime_from_timestamp(request.end_time) if request.HasField("end_time") else now
    start = (
        convert.datetime_from_timestamp(request.start_time)
        if request.HasField("start_time")
        else end - timedelta(hours=1)
    )
    if start >= end:
        raise InvalidArgument("start_time must be before end_time")
    group: list[str] = []
    for value in request.group_by:
        name = _DIMENSIONS.get(value)
        if name is None:
            raise InvalidArgument(f"group_by: unknown dimension {value}")
        if name not in group:
            group.append(name)
    bucket = _BUCKETS.get(request.bucket)
    if bucket is None:
        raise InvalidArgument(f"bucket: unknown bucket {request.bucket}")
    filters: dict[str, str] = {}
    if request.tenant:
        filters["tenant"] = v.validate_tenant_name(request.tenant)
    if request.client_key_id:
        filters["client_key_id"] = v.validate_id(request.client_key_id, field="client_key_id")
    if request.provider_key_id:
        filters["provider_key_id"] = v.validate_id(request.provider_key_id, field="provider_key_id")
    if request.public_model:
        filters["public_model"] = v.validate_public_model(request.public_model)
    size = request.page_size or _DEFAULT_PAGE
    if size < 0:
        raise InvalidArgument("page_size must not be negative")
    size = min(size, _MAX_PAGE)
    offset = 0
    if request.page_token:
        if not request.page_token.isdigit() or len(request.page_token) > 12:
            raise InvalidArgument("page_token: not a token GetUsage returned")
        offset = int(request.page_token)
    end_minute = minute_of(end.astimezone(UTC))
    end_exclusive = end_minute + 60 if end.astimezone(UTC).timestamp() > end_minute else end_minute
    return UsageQuery(
        start=minute_of(start),
        end=end_exclusive,
        group_by=tuple(group),
        bucket=bucket,
        filters=filters,
        limit=size + 1,
        offset=offset,
    )
