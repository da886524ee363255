"""Usage end to end, over real sockets: apps call a sidecar, fake providers answer with
their real usage fields (plain and streamed), the sidecar reports usage with the
outcomes to a real control plane, which folds, costs and serves it (GetUsage).

- plain, streamed-and-asked, streamed-not-asked (the injected usage chunk never
  reaches the app: byte-level check against the provider's own stream without it),
  Anthropic's Messages stream, a provider that ignores ``include_usage`` (estimated),
  a failed request and a broken stream are all recorded;
- a stalled control plane (it accepts connections and never answers) does not slow
  a stream's chunks.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from sidecar.server import Sidecar
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.upstream import BROKEN_STREAM, SERVER_ERROR, FakeUpstream

from .conftest import CLIENT_TOKEN, PUBLIC_MODEL, sidecar_config, standard_snapshot
from .plane import ADMIN_MD, Plane, eventually
from .test_reporter import reporter_config

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello"}]
_CREATED = re.compile(rb'"created":\d+')


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, **extra}


async def setup(plane: Plane, up: FakeUpstream, claude: FakeAnthropic) -> tuple[str, str, dict[str, str]]:
    admin = await plane.start()
    await admin.CreateTenant(apb.CreateTenantRequest(name="acme"), metadata=ADMIN_MD)
    for provider, label, base_url in (
        (rpb.PROVIDER_OPENAI, "main", up.base_url),
        (rpb.PROVIDER_ANTHROPIC, "claude", claude.base_url),
    ):
        await admin.CreateProviderKey(
            apb.CreateProviderKeyRequest(
                tenant="acme", provider=provider, label=label, secret=f"sk-{label}-0001", base_url=base_url
            ),
            metadata=ADMIN_MD,
        )
    for public, provider, upstream in (
        ("gpt", rpb.PROVIDER_OPENAI, "gpt-4o-mini"),
        ("flaky", rpb.PROVIDER_OPENAI, "gpt-flaky"),
        ("broken", rpb.PROVIDER_OPENAI, "gpt-broken"),
        ("claude", rpb.PROVIDER_ANTHROPIC, "claude-sonnet-4-5"),
    ):
        target = rpb.RouteTarget(provider=provider, upstream_model=upstream)
        await admin.CreateRoute(
            apb.CreateRouteRequest(tenant="acme", public_model=public, targets=[target]), metadata=ADMIN_MD
        )
    up.program("sk-main-0001", SERVER_ERROR, model="gpt-flaky")
    up.program("sk-main-0001", BROKEN_STREAM, model="gpt-broken")
    tokens: dict[str, str] = {}
    ids: dict[str, str] = {}
    for label in ("app1", "app2"):
        created = await admin.CreateClientKey(apb.CreateClientKeyRequest(tenant="acme", label=label), metadata=ADMIN_MD)
        tokens[label], ids[label] = created.token, created.client_key.id
    price = upb.Price(
        tenant="acme",
        provider=rpb.PROVIDER_OPENAI,
        model="gpt-4o-mini",
        input_micros_per_million=150_000,  # $0.15 / M
        cached_input_micros_per_million=75_000,
        output_micros_per_million=600_000,  # $0.60 / M
    )
    await admin.SetPrice(apb.SetPriceRequest(price=price), metadata=ADMIN_MD)
    return tokens["app1"], tokens["app2"], ids


async def raw_post(client: httpx.AsyncClient, path: str, token: str, body: object) -> tuple[int, bytes]:
    async with client.stream("POST", path, json=body, headers={"authorization": f"Bearer {token}"}) as r:
        return r.status_code, await r.aread()


async def test_usage_is_recorded_for_every_kind_of_request(plane: Plane) -> None:
    async with FakeUpstream() as up, FakeAnthropic() as claude:
        app1, app2, ids = await setup(plane, up, claude)
        async with (
            Sidecar(reporter_config(plane.address, sidecar_id="sc-usage")) as sc,
            httpx.AsyncClient(base_url=sc.url, timeout=20) as client,
        ):
            assert await sc.wait_ready(10)
            # Plain: the provider's usage object passes through to the app, and is read.
            status, plain = await raw_post(client, CHAT, app1, chat_body("gpt"))
            assert status == 200 and json.loads(plain)["usage"]["prompt_tokens"] == 9
            # Streamed, not asked: the sidecar asks, and the app sees the stream it asked for.
            status, unasked = await raw_post(client, CHAT, app1, chat_body("gpt", stream=True))
            assert status == 200
            assert up.chat_requests()[-1].json["stream_options"] == {"include_usage": True}
            async with httpx.AsyncClient(timeout=20) as direct:
                r = await direct.post(
                    f"{up.base_url}/chat/completions",
                    json=chat_body("gpt-4o-mini", stream=True),
                    headers={"authorization": "Bearer sk-main-0001"},
                )
            assert b'"usage"' not in unasked and b'"choices":[]' not in unasked
            assert _CREATED.sub(b"", unasked) == _CREATED.sub(b"", r.content)  # byte for byte
            # Streamed and asked: the app gets the usage chunk (and the null usage members).
            asked = chat_body("gpt", stream=True, stream_options={"include_usage": True})
            status, with_usage = await raw_post(client, CHAT, app2, asked)
            assert status == 200 and b'"choices":[],"usage":{"prompt_tokens":9' in with_usage
            assert with_usage.count(b'"usage":null') == len(up.chunks) + 2
            # A provider that ignores include_usage: estimated.
            up.stream_usage = False
            status, _ = await raw_post(client, CHAT, app2, chat_body("gpt", stream=True))
            assert status == 200
            up.stream_usage = True
            # Anthropic's Messages stream (message_start + message_delta usage).
            async with client.stream(
                "POST",
                "/v1/messages",
                json={"model": "claude", "max_tokens": 16, "messages": MESSAGES, "stream": True},
                headers={"x-api-key": app1, "anthropic-version": "2023-06-01"},
            ) as r:
                assert r.status_code == 200 and b"message_delta" in await r.aread()
            # Failed, and broken mid-stream.
            status, _ = await raw_post(client, CHAT, app2, chat_body("flaky"))
            assert status >= 500
            status, broken = await raw_post(client, CHAT, app1, chat_body("broken", stream=True))
            assert status == 200 and b"stream_broken" in broken

            metrics = sc.metrics.render().decode()
            assert 'keyplane_sidecar_tokens_total{kind="input",provider="openai"}' in metrics
            assert 'keyplane_sidecar_usage_estimated_total{provider="openai"} 2.0' in metrics  # ignored + broken

            admin = plane.admin
            assert admin is not None
            request = apb.GetUsageRequest(
                tenant="acme",
                group_by=[upb.USAGE_DIMENSION_CLIENT_KEY, upb.USAGE_DIMENSION_PUBLIC_MODEL],
            )
            rows: dict[tuple[str, str], upb.UsageRow] = {}

            async def all_reported() -> bool:
                answer = await admin.GetUsage(request, metadata=ADMIN_MD)
                rows.clear()
                rows.update({(row.client_key_id, row.public_model): row for row in answer.rows})
                return sum(row.requests for row in answer.rows) >= 7

            await eventually(all_reported, within=10)
    first, second = ids["app1"], ids["app2"]
    gpt1, gpt2 = rows[(first, "gpt")], rows[(second, "gpt")]
    # app1: plain + streamed-not-asked, both reported by the provider (9 in, 6 out each).
    assert (gpt1.requests, gpt1.input_tokens, gpt1.output_tokens, gpt1.estimated_requests) == (2, 18, 12, 0)
    assert gpt1.failed_requests == 0
    # 2 x (9 x 0.15 + 6 x 0.60) = 9.9 micro-dollars: 9 whole ones (the rest carried).
    assert gpt1.cost_micros == 9 and gpt1.unpriced_requests == 0
    # app2: asked (exact) + a provider that sent nothing (estimated: one token a streamed event).
    assert (gpt2.requests, gpt2.estimated_requests) == (2, 1)
    assert gpt2.output_tokens == 6 + (len(up.chunks) + 2)
    claude_row = rows[(first, "claude")]
    assert (claude_row.input_tokens, claude_row.output_tokens, claude_row.unpriced_requests) == (12, 6, 1)
    assert rows[(second, "flaky")].failed_requests >= 1
    broken_row = rows[(first, "broken")]
    assert (broken_row.requests, broken_row.failed_requests, broken_row.estimated_requests) == (1, 1, 1)
    print(
        f"\nusage rows: {len(rows)}; app1 gpt: {gpt1.input_tokens} in / {gpt1.output_tokens} out, "
        f"{gpt1.cost_micros} micro-dollars"
    )


async def test_a_stalled_control_plane_does_not_slow_a_stream() -> None:
    """The control plane accepts connections and never answers: reports pile up, chunks do not wait."""
    stalled: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # never read, never answered

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    delay, chunks = 0.05, 12
    try:
        async with FakeUpstream(chunks=[f"t{n} " for n in range(chunks)], chunk_delay=delay) as up:
            config = sidecar_config(control_plane_target=f"127.0.0.1:{port}", report_queue_size=100)
            async with (
                Sidecar(config, watch=False, report=True) as sc,
                httpx.AsyncClient(base_url=sc.url, timeout=20) as client,
            ):
                sc.state.apply(standard_snapshot(up))
                headers = {"authorization": f"Bearer {CLIENT_TOKEN}"}
                body = chat_body(PUBLIC_MODEL, stream=True)
                up.chunk_delay = 0.0
                for _ in range(150):  # more than the queue holds: the reporter is full and stuck
                    assert (await client.post(CHAT, json=body, headers=headers)).status_code == 200
                up.chunk_delay = delay
                gaps: list[float] = []
                start = last = time.monotonic()
                async with client.stream("POST", CHAT, json=body, headers=headers) as r:
                    async for _ in r.aiter_raw():
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now
                total = time.monotonic() - start
                assert sc.reporter is not None and sc.reporter.stats.enqueued >= 151
    finally:
        for writer in stalled:
            writer.close()
        server.close()
    worst = max(gaps[1:])
    print(f"\nstalled control plane: {len(gaps)} reads, worst gap {worst * 1000:.0f} ms, total {total:.2f} s")
    assert worst < delay + 0.15, gaps
    assert total < chunks * delay + 1.0
