"""The prices the sidecar holds, and what an attempt's usage costs at them:
pure, no I/O.

The control plane sends the price table of the sidecar's tenants on the quota
stream (``StreamQuotaResponse.prices``, applied by ``sidecar.limits.Limiter``)
when it changes. ``PriceBook`` keeps it as (tenant, provider proto value,
upstream model) -> ``PriceRates``; the cost of one attempt is
``keyplane.pricing.cost_picos``, the formula the control plane's usage rollups
use, so the sidecar's cost counter and spend budgets agree with
``keyplane usage show``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from keyplane.pricing import cost_picos
from keyplane.v1 import usage_pb2 as upb

from .usage import Usage

__all__ = ["PriceBook", "PriceKey", "PriceRates"]

# (tenant, provider proto value, upstream model)
PriceKey = tuple[str, int, str]


class PriceRates(NamedTuple):
    """Micro-dollars per million tokens of one (tenant, provider, model)."""

    input_micros_per_million: int
    cached_input_micros_per_million: int
    output_micros_per_million: int


class PriceBook:
    """The price table in the sidecar's scope, replaced whole when a new one arrives."""

    __slots__ = ("_rates", "replaced")

    def __init__(self, prices: Iterable[upb.Price] = ()) -> None:
        self._rates: dict[PriceKey, PriceRates] = {}
        # How many tables were taken (the first one included).
        self.replaced = 0
        if prices:
            self.replace(prices)

    def replace(self, prices: Iterable[upb.Price]) -> None:
        """Take a whole price table (``Price`` messages); prices not in it are gone."""
        self._rates = {
            (p.tenant, int(p.provider), p.model): PriceRates(
                p.input_micros_per_million, p.cached_input_micros_per_million, p.output_micros_per_million
            )
            for p in prices
        }
        self.replaced += 1

    def __len__(self) -> int:
        return len(self._rates)

    def rates(self, tenant: str, provider: int, model: str) -> PriceRates | None:
        return self._rates.get((tenant, provider, model))

    def cost_picos(self, tenant: str, provider: int, model: str, usage: Usage) -> int | None:
        """What ``usage`` costs in pico-dollars (1e-12 USD) at the tenant's price
        of (provider, upstream model); None when that has no price."""
        rates = self._rates.get((tenant, provider, model))
        if rates is None:
            return None
        return cost_picos(rates, usage.input_tokens, usage.cached_input_tokens, usage.output_tokens)
