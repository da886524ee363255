"""The sidecar's price table (``sidecar.pricing``), how lease messages replace it
(``Limiter.apply``), the cost and unpriced counters (``UsageCounters``), and the
control plane's coalescing of lease messages, which never drops a price table."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from control_plane.quota_broker import QuotaSubscriber
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from sidecar.limits import Limiter
from sidecar.pricing import PriceBook, PriceRates
from sidecar.usage import Usage
from sidecar.usage_metrics import UsageCounters

OPENAI = rpb.PROVIDER_OPENAI


def price(model: str, rates: tuple[int, int, int] = (150_000, 75_000, 600_000), tenant: str = "acme") -> upb.Price:
    return upb.Price(
        tenant=tenant,
        provider=OPENAI,
        model=model,
        input_micros_per_million=rates[0],
        cached_input_micros_per_million=rates[1],
        output_micros_per_million=rates[2],
    )


def test_a_price_book_costs_by_tenant_provider_and_model() -> None:
    book = PriceBook([price("gpt"), price("gpt", (1, 1, 1), tenant="other")])
    usage = Usage(input_tokens=9, cached_input_tokens=3, output_tokens=6)
    assert book.rates("acme", OPENAI, "gpt") == PriceRates(150_000, 75_000, 600_000)
    assert book.cost_picos("acme", OPENAI, "gpt", usage) == 4_725_000
    assert book.cost_picos("other", OPENAI, "gpt", usage) == 15
    assert book.cost_picos("acme", OPENAI, "gpt-unpriced", usage) is None
    assert book.cost_picos("acme", rpb.PROVIDER_ANTHROPIC, "gpt", usage) is None
    book.replace([price("other-model")])
    assert len(book) == 1 and book.rates("acme", OPENAI, "gpt") is None and book.replaced == 2


def test_lease_messages_replace_the_prices_only_when_they_carry_a_table() -> None:
    limiter = Limiter()
    limiter.apply(lpb.StreamQuotaResponse(complete=True, prices_included=True, prices=[price("gpt")]))
    assert len(limiter.prices) == 1
    limiter.apply(lpb.StreamQuotaResponse(complete=True))  # leases only: the prices held stand
    assert len(limiter.prices) == 1
    limiter.apply(lpb.StreamQuotaResponse(complete=True, prices=[price("a"), price("b")]))  # an older control plane
    assert len(limiter.prices) == 2
    limiter.apply(lpb.StreamQuotaResponse(complete=True, prices_included=True))  # an empty table: no prices
    assert len(limiter.prices) == 0


def test_the_limiter_charges_budgets_from_the_shared_book_rounded_up() -> None:
    book = PriceBook()
    limiter = Limiter(prices=book)
    lease = lpb.QuotaLease(
        bucket=lpb.QuotaBucket(tenant="acme", kind=lpb.QUOTA_KIND_SPEND_DAY),
        limit=100,
        window_ms=86_400_000,
        window_start_ms=0,
        granted=100,
    )
    limiter.apply(lpb.StreamQuotaResponse(leases=[lease], complete=True, prices_included=True, prices=[price("gpt")]))
    assert book.rates("acme", OPENAI, "gpt") is not None  # the app's book is the limiter's
    limiter.charge_spend("acme", "ck", OPENAI, "gpt", Usage(input_tokens=9, cached_input_tokens=3, output_tokens=6))
    [reported] = limiter.report()
    assert reported.used == 5  # 4.725 micro-dollars, never under-charged


def test_cost_is_counted_in_whole_micro_dollars_of_the_exact_sum() -> None:
    registry = CollectorRegistry()
    counters = UsageCounters(registry)
    usage = Usage(input_tokens=9, cached_input_tokens=3, output_tokens=6)
    for _ in range(3):
        counters.count("openai", usage, 4_725_000)
    counters.count("openai", usage, None)  # no price
    counters.count("openai", Usage(), None)  # no tokens: nothing to price
    counters.count("anthropic", usage, 0)  # a free model
    text = generate_latest(registry).decode()
    assert 'keyplane_sidecar_cost_microdollars_total{provider="openai"} 14.0' in text
    assert 'keyplane_sidecar_unpriced_total{provider="openai"} 1.0' in text
    assert 'keyplane_sidecar_cost_microdollars_total{provider="anthropic"} 0.0' in text
    assert 'keyplane_sidecar_unpriced_total{provider="anthropic"} 0.0' in text


async def test_a_coalesced_lease_message_keeps_the_price_table_it_replaced() -> None:
    subscriber = QuotaSubscriber("sc", None, prices_on_change=True)
    subscriber.offer(lpb.StreamQuotaResponse(complete=True, prices_included=True, prices=[price("gpt")]))
    subscriber.offer(lpb.StreamQuotaResponse(complete=True))  # the stream was slow: it skips to this one
    newest = await subscriber.next()
    assert newest.prices_included and [p.model for p in newest.prices] == ["gpt"]
    subscriber.offer(lpb.StreamQuotaResponse(complete=True, prices_included=True, prices=[price("a")]))
    subscriber.offer(lpb.StreamQuotaResponse(complete=True, prices_included=True))  # a newer (empty) table wins
    newest = await subscriber.next()
    assert newest.prices_included and not newest.prices
