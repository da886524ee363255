"""Usage at the control plane, through its real gRPC services: outcome reports with
usage are folded into rollups, costed from the price table (integer micro-dollars,
sub-micro-dollar remainders carried), served by GetUsage (grouped, bucketed, paged,
validated), and shown by the real ``keyplane usage show`` / ``keyplane prices``
commands (subprocess) as table, json and yaml."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc import aio

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from keyplane.v1 import usage_pb2 as upb
from keyplane_cli.admin_client import AdminClient
from keyplane_cli.apply import execute_action, read_current
from keyplane_cli.config_file import ConfigError, load_config
from keyplane_cli.config_plan import Action, plan
from tests.control_plane.conftest import ADMIN_MD, ADMIN_TOKEN, Harness
from tests.control_plane.test_etag_cli import keyplane
from tests.control_plane.test_health import report

MODEL = "gpt-4o-mini"


def used(key_id: str, client: str, tokens_in: int, tokens_out: int, *, cached: int = 0, **kw: object) -> spb.Outcome:
    message = spb.Outcome(
        tenant="acme",
        key_id=key_id,
        provider=rpb.PROVIDER_OPENAI,
        model=MODEL,
        outcome_class=kw.get("outcome_class", spb.OUTCOME_CLASS_SUCCESS),  # type: ignore[arg-type]
        status_code=200,
        client_key_id=client,
        public_model="gpt",
        usage=upb.Usage(input_tokens=tokens_in, cached_input_tokens=cached, output_tokens=tokens_out),
    )
    message.time.FromSeconds(int(time.time()))
    return message


async def set_price(harness: Harness) -> None:
    price = upb.Price(
        tenant="acme",
        provider=rpb.PROVIDER_OPENAI,
        model=MODEL,
        input_micros_per_million=150_000,
        cached_input_micros_per_million=75_000,
        output_micros_per_million=600_000,
    )
    stored = (await harness.admin.SetPrice(apb.SetPriceRequest(price=price), metadata=ADMIN_MD)).price
    assert stored.HasField("update_time") and stored.output_micros_per_million == 600_000


async def test_reports_are_folded_costed_and_paged(harness: Harness) -> None:
    await harness.tenant()
    key_id = (await harness.key()).id
    await set_price(harness)
    # 1000 tiny requests of 10 in / 1 out: 10 x 0.15 + 0.6 = 2.1 micro-dollars each.
    batch = [used(key_id, f"ck_{n % 3}", 10, 1) for n in range(1000)]
    batch.append(used(key_id, "ck_0", 1000, 0, cached=1000))  # cached at half price: 75 micro-dollars
    batch.append(used(key_id, "ck_0", 0, 0, outcome_class=spb.OUTCOME_CLASS_UPSTREAM_ERROR))
    assert await report(harness, batch[:500], batch[500:]) == 1002
    by_client = apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_CLIENT_KEY])
    rows = (await harness.admin.GetUsage(by_client, metadata=ADMIN_MD)).rows
    assert [(r.client_key_id, r.requests, r.failed_requests) for r in rows] == [
        ("ck_0", 336, 1),
        ("ck_1", 333, 0),
        ("ck_2", 333, 0),
    ]
    # Costs add up to the micro-dollar (the remainders are carried, never rounded per request).
    assert [r.cost_micros for r in rows] == [334 * 21 // 10 + 75, 333 * 21 // 10, 333 * 21 // 10]
    total = (await harness.admin.GetUsage(apb.GetUsageRequest(tenant="acme"), metadata=ADMIN_MD)).rows
    assert [(r.requests, r.input_tokens, r.cached_input_tokens, r.output_tokens) for r in total] == [
        (1002, 11000, 1000, 1000)
    ]
    page = await harness.admin.GetUsage(
        apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_CLIENT_KEY], page_size=2), metadata=ADMIN_MD
    )
    assert [r.client_key_id for r in page.rows] == ["ck_0", "ck_1"] and page.next_page_token
    rest = await harness.admin.GetUsage(
        apb.GetUsageRequest(
            tenant="acme", group_by=[upb.USAGE_DIMENSION_CLIENT_KEY], page_size=2, page_token=page.next_page_token
        ),
        metadata=ADMIN_MD,
    )
    assert [r.client_key_id for r in rest.rows] == ["ck_2"] and not rest.next_page_token
    # One upsert per rollup row per flush, not one per request.
    recorder = harness.plane._usage
    assert recorder is not None and recorder.rows_written <= 3 * recorder.flushes + 3


async def test_requests_count_last_attempts_and_attempts_count_all(harness: Harness) -> None:
    """A request failed over from key A to key B is one request (in B's row) and two attempts;
    a request whose every attempt failed is one failed request; outcomes of an old sidecar
    (no ``superseded``) are a request each."""
    await harness.tenant()
    a = (await harness.key(label="a", secret="sk-acme-secret-a-abcdefghijkl")).id
    b = (await harness.key(label="b", secret="sk-acme-secret-b-abcdefghijkl")).id
    limited = spb.OUTCOME_CLASS_RATE_LIMITED
    failover = [used(a, "ck_1", 0, 0, outcome_class=limited), used(b, "ck_1", 10, 2)]
    failover[0].superseded = True
    all_failed = [used(a, "ck_2", 0, 0, outcome_class=limited), used(b, "ck_2", 0, 0, outcome_class=limited)]
    all_failed[0].superseded = True
    old_sidecar = [used(a, "ck_3", 0, 0, outcome_class=limited), used(b, "ck_3", 10, 2)]
    assert await report(harness, failover, [*all_failed, *old_sidecar]) == 6
    by = [upb.USAGE_DIMENSION_CLIENT_KEY, upb.USAGE_DIMENSION_PROVIDER_KEY]
    rows = (await harness.admin.GetUsage(apb.GetUsageRequest(tenant="acme", group_by=by), metadata=ADMIN_MD)).rows
    got = {(r.client_key_id, r.provider_key_id): (r.requests, r.failed_requests, r.attempts) for r in rows}
    assert got == {
        ("ck_1", a): (0, 0, 1),
        ("ck_1", b): (1, 0, 1),
        ("ck_2", a): (0, 0, 1),
        ("ck_2", b): (1, 1, 1),
        ("ck_3", a): (1, 1, 1),
        ("ck_3", b): (1, 0, 1),
    }
    by_client = apb.GetUsageRequest(tenant="acme", group_by=[upb.USAGE_DIMENSION_CLIENT_KEY])
    rows = (await harness.admin.GetUsage(by_client, metadata=ADMIN_MD)).rows
    assert [(r.client_key_id, r.requests, r.failed_requests, r.attempts) for r in rows] == [
        ("ck_1", 1, 0, 2),
        ("ck_2", 1, 1, 2),
        ("ck_3", 2, 1, 2),
    ]


@pytest.mark.parametrize(
    "request_",
    [
        apb.GetUsageRequest(group_by=[99]),  # type: ignore[list-item]
        apb.GetUsageRequest(bucket=42),  # type: ignore[arg-type]
        apb.GetUsageRequest(page_token="not-a-token"),
        apb.GetUsageRequest(page_size=-1),
        apb.GetUsageRequest(tenant="Not A Tenant"),
    ],
)
async def test_bad_usage_requests_are_invalid_argument(harness: Harness, request_: apb.GetUsageRequest) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.GetUsage(request_, metadata=ADMIN_MD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_prices_are_refused_and_audited(harness: Harness) -> None:
    await harness.tenant()
    bad = upb.Price(tenant="acme", provider=rpb.PROVIDER_UNSPECIFIED, model=MODEL)
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.SetPrice(apb.SetPriceRequest(price=bad), metadata=ADMIN_MD)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = upb.Price(tenant="globex", provider=rpb.PROVIDER_OPENAI, model=MODEL)
    with pytest.raises(aio.AioRpcError) as caught:
        await harness.admin.SetPrice(apb.SetPriceRequest(price=missing), metadata=ADMIN_MD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await set_price(harness)
    events = (await harness.admin.ListAuditEvents(apb.ListAuditEventsRequest(tenant="acme"), metadata=ADMIN_MD)).events
    assert [(e.method, e.resource_kind, e.resource_id, e.result) for e in events][:1] == [
        ("SetPrice", "price", f"openai:{MODEL}", "ok")
    ]


async def test_cli_usage_show_and_prices(harness: Harness, tmp_path: Path) -> None:
    await harness.tenant()
    code, out, err = await keyplane(
        harness, tmp_path, "prices", "set", "-t", "acme", "-p", "openai", "-m", MODEL, "--input-usd", "0.15",
        "--cached-input-usd", "0.075", "--output-usd", "0.60",
    )  # fmt: skip
    assert code == 0, err
    assert "$0.150000" in out and "$0.600000" in out
    code, out, _ = await keyplane(harness, tmp_path, "prices", "list", "-t", "acme", "-o", "json")
    assert json.loads(out)["prices"][0]["input_micros_per_million"] == "150000"
    key_id = (await harness.key()).id
    assert await report(harness, [used(key_id, "ck_a", 1_000_000, 100_000), used(key_id, "ck_b", 10, 1)]) == 2
    code, out, err = await keyplane(harness, tmp_path, "usage", "show", "--since", "1h", "--by", "client-key")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "CLIENT-KEY", "REQUESTS", "FAILED", "ATTEMPTS", "INPUT", "CACHED", "OUTPUT", "REASONING", "COST",
    ]  # fmt: skip
    # 1M x $0.15/M + 100k x $0.60/M = $0.21
    assert lines[1].split() == ["ck_a", "1", "0", "1", "1000000", "0", "100000", "0", "$0.210000"]
    code, out, _ = await keyplane(harness, tmp_path, "usage", "show", "--by", "client-key,model", "-o", "yaml")
    rows = yaml.safe_load(out)["rows"]
    assert [(r["client_key_id"], r["public_model"]) for r in rows] == [("ck_a", "gpt"), ("ck_b", "gpt")]
    code, out, _ = await keyplane(harness, tmp_path, "usage", "show", "-t", "acme", "--bucket", "minute", "-o", "json")
    [row] = json.loads(out)["rows"]
    assert row["requests"] == "2" and row["attempts"] == "2" and "bucket_start" in row
    code, _, err = await keyplane(harness, tmp_path, "usage", "show", "--by", "colour")
    assert code == 2 and "unknown --by colour" in err


async def test_apply_sets_updates_and_prunes_prices(harness: Harness, tmp_path: Path) -> None:
    """A file's prices (dollars per million tokens) through ``keyplane apply``'s plan and its client."""
    await harness.tenant()
    config = tmp_path / "keyplane.yaml"
    client = AdminClient(harness.plane.address, ADMIN_TOKEN)

    def planned(text: str, prune: bool = False) -> list[Action]:
        config.write_text("tenants:\n  - name: acme\n    prices:\n" + text)
        wanted = load_config(config)
        return plan(wanted, read_current(client, wanted), prune=prune)

    def applied(actions: list[Action]) -> None:
        for action in actions:
            execute_action(client, action)

    both = (
        "      - {provider: openai, model: gpt-4o-mini, input: 0.15, cached_input: 0.075, output: 0.6}\n"
        "      - {provider: anthropic, model: claude-sonnet-4-5, input: 3, output: 15}\n"
    )
    try:
        actions = await asyncio.to_thread(planned, both)
        assert [(a.op, a.kind, a.name) for a in actions] == [
            ("create", "price", "openai:gpt-4o-mini"),
            ("create", "price", "anthropic:claude-sonnet-4-5"),
        ]
        await asyncio.to_thread(applied, actions)
        listed = (await harness.admin.ListPrices(apb.ListPricesRequest(tenant="acme"), metadata=ADMIN_MD)).prices
        assert [(p.model, p.input_micros_per_million, p.cached_input_micros_per_million) for p in listed] == [
            ("claude-sonnet-4-5", 3_000_000, 3_000_000),  # cached defaults to the input price
            ("gpt-4o-mini", 150_000, 75_000),
        ]
        assert await asyncio.to_thread(planned, both) == []  # applied: nothing left to do
        one = "      - {provider: openai, model: gpt-4o-mini, input: 0.3, output: 1.2}\n"
        actions = await asyncio.to_thread(planned, one, True)
        assert [(a.op, a.name) for a in actions] == [
            ("update", "openai:gpt-4o-mini"),
            ("delete", "anthropic:claude-sonnet-4-5"),
        ]
        await asyncio.to_thread(applied, actions)
        assert await asyncio.to_thread(planned, one, True) == []
        with pytest.raises(ConfigError, match="at most 6 decimals"):
            await asyncio.to_thread(planned, "      - {provider: openai, model: m, input: 0.0000001, output: 1}\n")
    finally:
        client.close()
