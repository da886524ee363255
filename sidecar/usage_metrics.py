"""Prometheus counters of the tokens answers reported, on the sidecar's registry.

Labels are bounded: the provider name and the token kind. No tenant, client
key, key id or model (unbounded, and a client key id in a label would let a
scrape enumerate them); per-client-key and per-model figures are the control
plane's usage rollups (``keyplane usage show``). Cost is computed there, from
its price table (the sidecar holds no prices).

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

from .usage import Usage

__all__ = ["UsageCounters"]

_KINDS = ("input", "cached_input", "cache_write_input", "output", "reasoning")


class UsageCounters(Collector):
    """``keyplane_sidecar_tokens_total{provider, kind}`` and
    ``keyplane_sidecar_usage_estimated_total{provider}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # provider -> [input, cached, cache write, output, reasoning, estimated attempts]
        self._totals: dict[str, list[int]] = {}
        registry.register(self)

    def count(self, provider: str, usage: Usage) -> None:
        totals = self._totals.get(provider)
        if totals is None:
            totals = self._totals[provider] = [0, 0, 0, 0, 0, 0]
        totals[0] += usage.input_tokens
        totals[1] += usage.cached_input_tokens
        totals[2] += usage.cache_write_input_tokens
        totals[3] += usage.output_tokens
        totals[4] += usage.reasoning_tokens
        if usage.estimated:
            totals[5] += 1

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
        for provider, totals in sorted(self._totals.items()):
            for kind, value in zip(_KINDS, totals, strict=False):
                tokens.add_metric([provider, kind], value)
            estimated.add_metric([provider], totals[5])
        yield tokens
        yield estimated

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())
