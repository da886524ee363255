"""The one cost formula (``keyplane.pricing``) the control plane and the sidecars share."""

from __future__ import annotations

from datetime import UTC, datetime

import control_plane.usage
from control_plane.usage_records import Price
from keyplane.domain import Provider
from keyplane.pricing import PICOS_PER_MICRO, cost_picos, micros_rounded_up
from sidecar.pricing import PriceRates

RATES = PriceRates(150_000, 75_000, 600_000)


def test_every_token_costs_its_micro_dollars_per_million_in_pico_dollars() -> None:
    # 6 uncached input, 3 cached, 6 output.
    assert cost_picos(RATES, 9, 3, 6) == 6 * 150_000 + 3 * 75_000 + 6 * 600_000 == 4_725_000
    assert cost_picos(RATES, 0, 0, 0) == 0
    assert cost_picos(RATES, 1_000_000, 0, 0) == 150_000 * PICOS_PER_MICRO  # a million input tokens: $0.15


def test_cached_tokens_past_the_input_never_cost_a_negative_input() -> None:
    assert cost_picos(RATES, 2, 5, 0) == 5 * 75_000


def test_budgets_round_up_accounts_round_down() -> None:
    assert micros_rounded_up(0) == 0
    assert micros_rounded_up(1) == 1
    assert micros_rounded_up(PICOS_PER_MICRO) == 1
    assert micros_rounded_up(PICOS_PER_MICRO + 1) == 2
    assert (3 * 4_725_000) // PICOS_PER_MICRO == 14  # the exact sum, rounded down once


def test_the_control_plane_costs_with_the_same_function() -> None:
    assert control_plane.usage.cost_picos is cost_picos
    price = Price("acme", Provider.OPENAI, "m", 150_000, 75_000, 600_000, datetime.now(UTC))
    assert cost_picos(price, 9, 3, 6) == cost_picos(RATES, 9, 3, 6)
