"""Prometheus counters of the tokens answers reported, on the sidecar's registry.

Labels are bounded: the provider name and the token kind. No tenant, client
key, key id or model (unbounded, and a client key id in a label would let a
scrape enumerate them); per-client-key and per-model figures are the control
plane's usage rollups (``keyplane usage show``). Cost is computed there too,
from its price table, and exported by the control plane.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from .usage import Usage

__all__ = ["UsageCounters"]

_KINDS = ("input", "cached_input", "cache_write_input", "output", "reasoning")


class UsageCounters:
    """``keyplane_sidecar_tokens_total{provider, kind}`` and
    ``keyplane_sidecar_usage_estimated_total{provider}``."""

    __slots__ = ("_children", "_estimated", "_estimated_children", "_tokens")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._tokens = Counter(
            "keyplane_sidecar_tokens",
            "Tokens upstream answers reported (or the sidecar estimated), by provider and kind "
            "(input counts every input token; cached_input and cache_write_input are parts of it; "
            "reasoning is part of output).",
            ["provider", "kind"],
            registry=registry,
        )
        self._estimated = Counter(
            "keyplane_sidecar_usage_estimated",
            "Upstream attempts whose usage the sidecar estimated (the provider reported none).",
            ["provider"],
            registry=registry,
        )
        self._children: dict[str, tuple[Counter, ...]] = {}
        self._estimated_children: dict[str, Counter] = {}

    def count(self, provider: str, usage: Usage) -> None:
        children = self._children.get(provider)
        if children is None:
            children = self._children[provider] = tuple(self._tokens.labels(provider, k) for k in _KINDS)
        values = (
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.cache_write_input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
        )
        for child, value in zip(children, values, strict=True):
            if value:
                child.inc(value)
        if usage.estimated:
            est = self._estimated_children.get(provider)
            if est is None:
                est = self._estimated_children[provider] = self._estimated.labels(provider)
            est.inc()
