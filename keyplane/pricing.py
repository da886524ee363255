"""The cost of tokens: one pure formula, shared by the control plane (usage
rollups, ``control_plane.usage``) and the sidecar (spend budgets and its cost
counter, ``sidecar.pricing``) so that both cost usage alike.

A price is in micro-dollars (1e-6 USD) per million tokens, so a token costs
that many pico-dollars (1e-12 USD): costs are summed exactly in integer
pico-dollars and turned into micro-dollars only at the end, rounded down for
accounts (the control plane's rollups, the sidecar's counter: the remainder
is carried, never lost) or up for a budget charge (never under-charged).
Cached input tokens are part of the input tokens and cost the cached price;
the other input tokens (cache writes among them) cost the input price.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["PICOS_PER_MICRO", "Rates", "cost_picos", "micros_rounded_up"]

PICOS_PER_MICRO = 1_000_000


class Rates(Protocol):
    """Micro-dollars per million tokens (a ``control_plane.usage_records.Price``,
    a ``keyplane.v1.Price`` message, a ``sidecar.pricing.PriceRates``)."""

    @property
    def input_micros_per_million(self) -> int: ...

    @property
    def cached_input_micros_per_million(self) -> int: ...

    @property
    def output_micros_per_million(self) -> int: ...


def cost_picos(rates: Rates, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
    """Cost in pico-dollars: every token times its micro-dollars per million tokens."""
    uncached = max(0, input_tokens - cached_input_tokens)
    return (
        uncached * rates.input_micros_per_million
        + cached_input_tokens * rates.cached_input_micros_per_million
        + output_tokens * rates.output_micros_per_million
    )


def micros_rounded_up(picos: int) -> int:
    """Micro-dollars to charge a budget for ``picos`` (rounded up)."""
    return -(-picos // PICOS_PER_MICRO)
