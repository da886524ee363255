"""Cost on the sidecar, over real sockets: a real control plane (gRPC) sends the
price table with the quota leases, a sidecar serves apps (HTTP) from a fake
OpenAI provider that answers with its real usage objects (plain and streamed),
and its /metrics (scraped over HTTP) counts what the answers cost at the
tenant's price, exactly as the control plane's usage rollups cost them.

The tenant has no limits: prices flow with the quota stream all the same.
The price table is sent when it changes, not with every lease set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import httpx
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2_grpc
from keyplane.v1 import usage_pb2 as upb
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from .plane import ADMIN_MD, SIDECAR_TOKEN, Plane, eventually
from .test_reporter import reporter_config

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
REBALANCE = 0.1
# $0.15 / M input, $0.075 / M cached input, $0.60 / M output (micro-dollars per million tokens).
RATES = (150_000, 75_000, 600_000)


def price(model: str, rates: tuple[int, int, int] = RATES, tenant: str = "acme") -> upb.Price:
    return upb.Price(
        tenant=tenant,
        provider=rpb.PROVIDER_OPENAI,
        model=model,
        input_micros_per_million=rates[0],
        cached_input_micros_per_million=rates[1],
        output_micros_per_million=rates[2],
    )


async def setup(plane: Plane, up: FakeUpstream) -> str:
    """Tenant acme with one OpenAI key, routes "gpt" (priced) and "free" (no price),
    no limits; returns a client key token."""
    plane.config = dataclasses.replace(plane.config, quota_rebalance_interval=REBALANCE)
    admin = await plane.start()
    for tenant in ("acme", "other"):
        await admin.CreateTenant(apb.CreateTenantRequest(name=tenant), metadata=ADMIN_MD)
    await admin.CreateProviderKey(
        apb.CreateProviderKeyRequest(
            tenant="acme", provider=rpb.PROVIDER_OPENAI, label="main", secret="sk-main-0001", base_url=up.base_url
        ),
        metadata=ADMIN_MD,
    )
    for public, upstream in (("gpt", "gpt-4o-mini"), ("free", "gpt-unpriced")):
        target = rpb.RouteTarget(provider=rpb.PROVIDER_OPENAI, upstream_model=upstream)
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model=public, targets=[target]), metadata=ADMIN_MD
        )
    created = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label="app"), metadata=ADMIN_MD)
    await admin.SetPrice(apb.SetPriceRequest(price=price("gpt-4o-mini")), metadata=ADMIN_MD)
    return created.token


def metric(text: str, name: str, provider: str = "openai") -> float | None:
    found = re.search(rf'^{name}\{{provider="{provider}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


async def test_the_cost_counter_is_the_exact_cost_at_the_tenants_price(plane: Plane) -> None:
    async with FakeUpstream() as up:
        up.prompt_tokens, up.cached_tokens = 9, 3
        token = await setup(plane, up)
        config = reporter_config(plane.address, sidecar_id="sc-cost")
        assert config.quota  # the default: the quota stream (and its prices) runs with no limit set
        async with Sidecar(config) as sc, httpx.AsyncClient(base_url=sc.url, timeout=20) as client:
            assert await sc.wait_ready(10)

            async def priced() -> bool:
                return sc.app.prices.rates("acme", rpb.PROVIDER_OPENAI, "gpt-4o-mini") is not None

            await eventually(priced)
            assert sc.app.limiter is not None and not sc.app.limiter.limited
            headers = {"authorization": f"Bearer {token}"}
            bodies = (
                {"model": "gpt", "messages": MESSAGES},
                {"model": "gpt", "messages": MESSAGES, "stream": True},  # the sidecar asks for the usage
                {"model": "gpt", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
            )
            for body in bodies:
                async with client.stream("POST", CHAT, json=body, headers=headers) as r:
                    assert r.status_code == 200
                    await r.aread()
            scraped = (await client.get("/metrics")).text
            # Each: 6 uncached input x 0.15 + 3 cached x 0.075 + 6 output x 0.60 = 4.725 micro-dollars.
            output = len(up.chunks)
            each = 6 * RATES[0] + 3 * RATES[1] + output * RATES[2]
            assert each == 4_725_000  # pico-dollars
            expected = 3 * each // 1_000_000  # 14.175: whole micro-dollars of the exact sum
            assert metric(scraped, "keyplane_sidecar_cost_microdollars_total") == expected == 14
            assert metric(scraped, "keyplane_sidecar_unpriced_total") == 0
            assert 'keyplane_sidecar_tokens_total{kind="input",provider="openai"} 27.0' in scraped

            # A model without a price: unpriced, and no cost.
            r2 = await client.post(CHAT, json={"model": "free", "messages": MESSAGES}, headers=headers)
            assert r2.status_code == 200
            scraped = (await client.get("/metrics")).text
            assert metric(scraped, "keyplane_sidecar_cost_microdollars_total") == 14
            assert metric(scraped, "keyplane_sidecar_unpriced_total") == 1
            # No tenant, client key or model in the cost series.
            cost_lines = [line for line in scraped.splitlines() if line.startswith("keyplane_sidecar_cost")]
            assert cost_lines and all("acme" not in line and "gpt" not in line for line in cost_lines)

        # The control plane's rollups cost the same requests alike (one row, remainder carried).
        admin = plane.admin
        assert admin is not None
        request = apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_UPSTREAM_MODEL])
        rows: dict[str, upb.UsageRow] = {}

        async def reported() -> bool:
            answer = await admin.GetUsage(request, metadata=ADMIN_MD)
            rows.update({row.upstream_model: row for row in answer.rows})
            return sum(row.requests for row in answer.rows) >= 4

        await eventually(reported, within=10)
        assert rows["gpt-4o-mini"].input_tokens == 27 and rows["gpt-4o-mini"].output_tokens == 3 * output
        assert rows["gpt-unpriced"].unpriced_requests == 1
        # Equal when the three requests fell in one minute (one rollup row); a minute
        # boundary between them splits the row and its remainders.
        assert rows["gpt-4o-mini"].cost_micros in (expected, expected - 1)


async def test_prices_are_sent_when_they_change_not_with_every_lease_set(plane: Plane) -> None:
    async with FakeUpstream() as up:
        await setup(plane, up)
        async with Sidecar(reporter_config(plane.address, sidecar_id="sc-prices")) as sc:
            assert await sc.wait_ready(10)
            quota = sc.quota
            assert quota is not None
            book = sc.app.prices

            async def took(tables: int) -> bool:
                return book.replaced >= tables

            await eventually(lambda: took(1))
            assert book.replaced == 1 and len(book) == 1
            received = quota.leases_received
            await asyncio.sleep(10 * REBALANCE)
            assert quota.leases_received >= received + 5  # lease sets keep coming...
            assert book.replaced == 1  # ...without the unchanged price table

            # A price out of the sidecar's scope (another tenant) changes nothing it sees.
            admin = plane.admin
            assert admin is not None
            await admin.SetPrice(apb.SetPriceRequest(price=price("gpt-4o", tenant="other")), metadata=ADMIN_MD)
            await asyncio.sleep(5 * REBALANCE)
            assert book.replaced == 1

            # A changed price is sent at once, and once.
            await admin.SetPrice(apb.SetPriceRequest(price=price("gpt-4o-mini", (1, 1, 1))), metadata=ADMIN_MD)
            await eventually(lambda: took(2))
            assert book.rates("acme", rpb.PROVIDER_OPENAI, "gpt-4o-mini") == (1, 1, 1)
            await asyncio.sleep(5 * REBALANCE)
            assert book.replaced == 2

            # A deleted price: the table sent is empty, and replaces the one held.
            await admin.DeletePrice(
                apb.DeletePriceRequest(tenant="acme", provider=rpb.PROVIDER_OPENAI, model="gpt-4o-mini"),
                metadata=ADMIN_MD,
            )
            await eventually(lambda: took(3))
            assert len(book) == 0


async def open_stream(first: lpb.StreamQuotaRequest) -> AsyncIterator[lpb.StreamQuotaRequest]:
    """A stream that sends its first message and stays open (no further reports)."""
    yield first
    await asyncio.Event().wait()


async def test_a_sidecar_that_does_not_keep_prices_gets_the_budgeted_ones_every_time(plane: Plane) -> None:
    """Mixed versions: a sidecar from before ``prices_on_change`` replaces its
    prices with every lease message, so it still gets its budgeted tenants' prices
    in each; one that keeps them gets the whole table once."""
    async with FakeUpstream() as up:
        await setup(plane, up)
        admin = plane.admin
        assert admin is not None
        limits = lpb.Limits(tenant="acme", daily_budget_micros=1_000_000)
        await admin.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=ADMIN_MD)
        await admin.SetPrice(apb.SetPriceRequest(price=price("gpt-4o")), metadata=ADMIN_MD)
        md = (("authorization", f"Bearer {SIDECAR_TOKEN}"),)
        async with aio.insecure_channel(plane.address) as channel:
            stub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
            for keeps in (False, True):
                first = lpb.StreamQuotaRequest(sidecar_id=f"raw-{keeps}", tenants=["acme"], prices_on_change=keeps)
                call = stub.StreamQuota(open_stream(first), metadata=md)
                responses = []
                async for response in call:
                    responses.append(response)
                    if len(responses) == 4:
                        break
                call.cancel()
                models = [sorted(p.model for p in r.prices) for r in responses]
                if keeps:
                    assert [r.prices_included for r in responses] == [True, False, False, False]
                    assert models == [["gpt-4o", "gpt-4o-mini"], [], [], []]
                else:
                    assert not any(r.prices_included for r in responses)
                    assert models == [["gpt-4o", "gpt-4o-mini"]] * 4
                assert all(r.complete and len(r.leases) == 1 for r in responses)
