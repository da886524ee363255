"""The records of usage accounting: prices, rollup rows and their counters, and
what a usage query asks. Plain values with no I/O, shared by the folding and
recording (``control_plane.usage``) and the stores (``control_plane.store``);
and a price as the API sends it (``price_to_proto``: admin answers, leases).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from keyplane import convert
from keyplane.domain import Provider
from keyplane.v1 import usage_pb2

__all__ = ["DIMENSIONS", "Price", "UsageQuery", "UsageRow", "UsageTotals", "price_to_proto"]


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per million tokens of one (tenant, provider, upstream model)."""

    tenant: str
    provider: Provider
    model: str
    input_micros_per_million: int
    cached_input_micros_per_million: int
    output_micros_per_million: int
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Counters of a rollup row (or of a group of rows).

    ``requests`` are app requests, each counted in the row of its last upstream
    attempt, and ``failed_requests`` those whose last attempt failed;
    ``attempts`` counts every upstream attempt (rows written before migration 11
    have 0). ``estimated_requests`` and ``unpriced_requests`` count attempts."""

    requests: int = 0
    failed_requests: int = 0
    estimated_requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    unpriced_requests: int = 0
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One rollup row to add to the store (``Store.put_usage`` adds its counters)."""

    minute: int
    tenant: str
    client_key_id: str
    public_model: str
    provider_key_id: str
    provider: Provider
    upstream_model: str
    totals: UsageTotals


# Dimensions a usage query groups by (the column names).
DIMENSIONS = ("tenant", "client_key_id", "public_model", "provider_key_id", "provider", "upstream_model")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What ``Store.query_usage`` sums: minutes in [start, end), filters, grouping."""

    start: int
    end: int
    group_by: tuple[str, ...] = ()
    # Seconds per bucket (60, 3600, 86400), or 0: one bucket over the whole range.
    bucket: int = 0
    filters: Mapping[str, str] = field(default_factory=dict)
    limit: int = 100
    offset: int = 0


def price_to_proto(price: Price) -> usage_pb2.Price:
    message = usage_pb2.Price(
        tenant=price.tenant,
        provider=convert.provider_to_proto(price.provider),
        model=price.model,
        input_micros_per_million=price.input_micros_per_million,
        cached_input_micros_per_million=price.cached_input_micros_per_million,
        output_micros_per_million=price.output_micros_per_million,
    )
    if price.updated_at is not None:
        message.update_time.CopyFrom(convert.timestamp_from_datetime(price.updated_at))
    return message
