"""Prometheus counters of the tokens answers reported, and of what they cost,
on the sidecar's registry.

Labels are bounded: the provider name (and the token kind). No tenant, client
key, key id or model: those are unbounded (every tenant's and client key's
series would live for the process's life, and a scrape of a shared sidecar
would enumerate the client key ids and spend of every tenant it serves);
per-tenant, per-client-key and per-model figures are the control plane's usage
rollups (``keyplane usage show``), which are costed with the same formula.

Cost is counted at the prices the control plane sends with the quota leases
(``sidecar.pricing``: the whole price table of the sidecar's tenants, with or
without limits): each attempt with usage costs
``keyplane.pricing.cost_picos`` at its tenant's price of its (provider,
upstream model), summed exactly in pico-dollars; the counter shows whole
micro-dollars of the sum (rounded down, the rest kept for the next scrape),
as the control plane's rollups do. An attempt with tokens but no price adds
to ``keyplane_sidecar_unpriced_total`` instead (the rollups' unpriced requests).

The request path adds to plain integers (``count``: a few additions, no lock:
the sidecar's requests share one event loop); a collector turns them into
counters when /metrics is scraped. ``prometheus_client``'s own ``Counter.inc``
takes a lock and costs about a microsecond per call, five per request here.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from keyplane.pricing import PICOS_PER_MICRO

from .usage import Usage

__all__ = ["UsageCounters"]

_KINDS = ("input", "cached_input", "cache_write_input", "output", "reasoning")
# Indexes into a provider's totals after the token kinds.
_ESTIMATED, _PICOS, _UNPRICED = 5, 6, 7


class UsageCounters(Collector):
    """``keyplane_sidecar_tokens_total{provider, kind}``,
    ``keyplane_sidecar_usage_estimated_total{provider}``,
    ``keyplane_sidecar_cost_microdollars_total{provider}`` and
    ``keyplane_sidecar_unpriced_total{provider}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # provider -> [input, cached, cache write, output, reasoning, estimated attempts,
        #              cost in pico-dollars, unpriced attempts]
        self._totals: dict[str, list[int]] = {}
        registry.register(self)

    def count(self, provider: str, usage: Usage, cost_picos: int | None = None) -> None:
        """One attempt's usage, and its cost (None: its model has no price)."""
        totals = self._totals.get(provider)
        if totals is None:
            totals = self._totals[provider] = [0, 0, 0, 0, 0, 0, 0, 0]
        totals[0] += usage.input_tokens
        totals[1] += usage.cached_input_tokens
        totals[2] += usage.cache_write_input_tokens
        totals[3] += usage.output_tokens
        totals[4] += usage.reasoning_tokens
        if usage.estimated:
            totals[_ESTIMATED] += 1
        if cost_picos is not None:
            totals[_PICOS] += cost_picos
        elif usage.input_tokens or usage.output_tokens:
            totals[_UNPRICED] += 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily(
            "keyplane_sidecar_tokens",
            "Tokens upstream answers reported (or the sidecar estimated), by provider and kind "
            "(input counts every input token; cached_input and cache_write_input are parts of it; "
            "reasoning is part of output).",
            labels=["provider", "kind"],
        )
        estimated = CounterMetricFamily(
            "keyplane_sidecar_usage_estimated",
            "Upstream attempts whose usage the sidecar estimated (the provider reported none).",
            labels=["provider"],
        )
        cost = CounterMetricFamily(
            "keyplane_sidecar_cost_microdollars",
            "What upstream attempts cost at their tenants' prices, in micro-dollars (1e-6 USD), by provider "
            "(the control plane's formula; whole micro-dollars of the exact sum).",
            labels=["provider"],
        )
        unpriced = CounterMetricFamily(
            "keyplane_sidecar_unpriced",
            "Upstream attempts with tokens whose (tenant, provider, model) has no price (not in the cost).",
            labels=["provider"],
        )
        for provider, totals in sorted(self._totals.items()):
            for kind, value in zip(_KINDS, totals, strict=False):
                tokens.add_metric([provider, kind], value)
            estimated.add_metric([provider], totals[_ESTIMATED])
            cost.add_metric([provider], totals[_PICOS] // PICOS_PER_MICRO)
            unpriced.add_metric([provider], totals[_UNPRICED])
        yield tokens
        yield estimated
        yield cost
        yield unpriced

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())
