"""The request path through a real sidecar against byte-scripted upstreams: a POST
the upstream dropped is tried again only by the attempt loop, on another key;
an answer over the body limit is refused; each upstream failure keeps its own
class in metrics and reports; request ids and trace headers go upstream."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from keyplane.v1 import sidecar_service_pb2
from sidecar.outcome_wire import batch_request
from sidecar.server import Sidecar
from tests.fakes.raw_http import RawRequest, RawServer, response
from tests.fakes.tls import make_pki
from tests.fakes.upstream import FakeUpstream

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT, auth, sidecar_config

CHAT = "/v1/chat/completions"
MODEL = "chat"
SECRETS = ("sk-first-0001", "sk-second-0002")
COMPLETION = json.dumps(
    {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant"}}]}
).encode()

Handler = Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def snapshot(base_url: str, *, keys: int = 2) -> sidecar_service_pb2.WatchResponse:
    return p.snapshot(
        10,
        p.tenant_state(
            TENANT,
            keys=[p.pkey(f"k{i + 1}", SECRETS[i], base_url=base_url) for i in range(keys)],
            routes=[p.route("r1", MODEL, p.target("gpt-4o-mini"))],
            client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
        ),
    )


async def chat(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return await client.post(CHAT, json=body, headers={**auth(), **headers})


def secret_of(request: RawRequest) -> str:
    return (request.header("authorization") or "").removeprefix("Bearer ")


def attempts_metric(metrics: str, outcome: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("keyplane_sidecar_upstream_attempts_total{") and f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def reported(sidecar: Sidecar) -> list[sidecar_service_pb2.Outcome]:
    """The outcomes queued for the control plane (this sidecar has none to send them to)."""
    reporter = sidecar.reporter
    assert reporter is not None
    request = sidecar_service_pb2.ReportOutcomesRequest()
    request.ParseFromString(batch_request([frame for _, frame in reporter._queue], "", 0))
    return list(request.outcomes)


async def test_a_post_the_upstream_dropped_is_sent_again_only_by_the_attempt_loop_on_another_key() -> None:
    async def close_on_second(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while await server.request(reader) is not None:
            if not first and server.accepted == 1:
                return  # the second request on the first connection: read, then hung up on
            writer.write(response(200, COMPLETION, "content-type: application/json"))
            await writer.drain()
            first = False

    async with RawServer(close_on_second) as server:
        config = sidecar_config(report_flush_timeout=0.05)
        async with Sidecar(config, watch=False, report=True) as sc, httpx.AsyncClient(base_url=sc.url) as client:
            sc.state.apply(snapshot(server.url + "/v1"))
            assert (await chat(client)).status_code == 200  # leaves a keep-alive connection
            r = await chat(client)
            assert r.status_code == 200, r.text
            assert r.headers["x-keyplane-attempts"] == "2"
            # The dropped request reached the upstream once; the retry is the next key's.
            second, retry = server.requests[1], server.requests[2]
            assert second.body == retry.body
            assert secret_of(second) != secret_of(retry)
            assert len(server.requests) == 3 and server.accepted == 2
            assert attempts_metric(sc.metrics.render().decode(), "cut") == 1
            outcomes = reported(sc)
            failed = [o for o in outcomes if o.outcome_class == sidecar_service_pb2.OUTCOME_CLASS_UPSTREAM_ERROR]
            assert [o.reason for o in failed] == ["answer cut off"]
            assert failed[0].recovered
            assert {o.request_id for o in outcomes[1:]} == {r.headers["x-keyplane-request-id"]}


async def test_an_answer_over_the_body_limit_is_refused_with_an_upstream_error() -> None:
    async def big(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.request(reader) is not None:
            writer.write(response(200, b"{" + b" " * 5000 + b"}", "content-type: application/json"))
            await writer.drain()

    async with RawServer(big) as server:
        config = sidecar_config(upstream_max_body_bytes=4096)
        async with Sidecar(config, watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
            sc.state.apply(snapshot(server.url + "/v1", keys=1))
            r = await chat(client)
            assert r.status_code == 502
            error = r.json()["error"]
            assert error["type"] == "upstream_error"
            assert "--upstream-max-body-bytes" in error["message"]
            assert attempts_metric(sc.metrics.render().decode(), "too_large") == 1


async def hang_up(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await server.request(reader)


async def garbage(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await server.request(reader)
    writer.write(b"SMTP ready\r\n\r\n")
    await writer.drain()
    await reader.read()


async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await server.request(reader)
    await reader.read()


async def too_many_headers(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await server.request(reader)
    writer.write(response(200, COMPLETION, *(f"x-h{i}: v" for i in range(500))))
    await writer.drain()
    await reader.read()


@pytest.mark.parametrize(
    ("kind", "handler", "label", "reason", "status"),
    [
        ("cut", hang_up, "cut", "answer cut off", 502),
        ("malformed", garbage, "malformed", "malformed answer", 502),
        ("head", too_many_headers, "malformed", "malformed answer", 502),
        ("timeout", silent, "timeout", "timeout", 504),
        ("tls", None, "tls_error", "tls error", 502),
        ("connect", None, "connect_error", "connect error", 502),
    ],
)
async def test_each_upstream_failure_keeps_its_class_in_metrics_and_reports(
    tmp_path: Path, kind: str, handler: Handler | None, label: str, reason: str, status: int
) -> None:
    tls: ssl.SSLContext | None = None
    if kind == "tls":  # a certificate nobody trusts
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*make_pki(tmp_path).server())
    async with RawServer(handler or silent, tls=tls) as server:
        url = server.url
    if kind != "connect":
        server = RawServer(handler or silent, tls=tls)
        await server.__aenter__()
        url = server.url
    try:
        config = sidecar_config(upstream_read_timeout=0.3, report_flush_timeout=0.05)
        async with Sidecar(config, watch=False, report=True) as sc, httpx.AsyncClient(base_url=sc.url) as client:
            sc.state.apply(snapshot(url + "/v1", keys=1))
            r = await chat(client)
            assert r.status_code == status, r.text
            assert r.json()["error"]["type"] == "upstream_error"
            metrics = sc.metrics.render().decode()
            assert attempts_metric(metrics, label) == 1, metrics
            [outcome] = reported(sc)
            assert outcome.outcome_class == sidecar_service_pb2.OUTCOME_CLASS_UPSTREAM_ERROR
            assert outcome.reason == reason
    finally:
        if kind != "connect":
            await server.__aexit__(None, None, None)


async def test_request_id_and_trace_headers_go_upstream(upstream: FakeUpstream) -> None:
    config = sidecar_config(report_flush_timeout=0.05)
    async with Sidecar(config, watch=False, report=True) as sc, httpx.AsyncClient(base_url=sc.url) as client:
        sc.state.apply(snapshot(upstream.base_url, keys=1))
        trace = {
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "vendor=abc",
            "openai-beta": "assistants=v2",
        }
        r = await chat(client, **{"x-request-id": "app-req-42"}, **trace)
        assert r.status_code == 200, r.text
        assert r.headers["x-keyplane-request-id"] == "app-req-42"
        sent = upstream.chat_requests()[-1].headers
        assert sent["x-request-id"] == "app-req-42"
        for name, value in trace.items():
            assert sent[name] == value
        assert "cookie" not in sent and "accept-encoding" not in sent
        # None from the app (or an unusable one): one is made up, the same everywhere.
        for given in ({}, {"x-request-id": "x" * 300}, {"x-request-id": "has space"}):
            r = await chat(client, **given)
            made = r.headers["x-keyplane-request-id"]
            assert len(made) == 32 and made != given.get("x-request-id")
            assert upstream.chat_requests()[-1].headers["x-request-id"] == made
            assert "traceparent" not in upstream.chat_requests()[-1].headers
        ids = [o.request_id for o in reported(sc)]
        assert ids[0] == "app-req-42" and len(ids) == 4 and len(set(ids)) == 4


async def test_an_upstream_that_switches_protocols_is_an_upstream_error() -> None:
    async def switching(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxx")
        await writer.drain()
        await reader.read()

    async with RawServer(switching) as server:
        async with Sidecar(sidecar_config(), watch=False) as sc, httpx.AsyncClient(base_url=sc.url) as client:
            sc.state.apply(snapshot(server.url + "/v1", keys=1))
            r = await chat(client)
            assert r.status_code == 502, r.text
            assert r.json()["error"]["type"] == "upstream_error"
