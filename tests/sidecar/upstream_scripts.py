"""Helpers for the upstream client's tests: a client started with short
timeouts, a keep-alive echo server script, and one-call request helpers."""

from __future__ import annotations

import asyncio

from sidecar.upstream import UpstreamClient, UpstreamRequest, UpstreamResponse
from tests.fakes.raw_http import RawServer, response

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


async def answer_each(server: RawServer, reader: Reader, writer: Writer) -> None:
    """Keep-alive: answer every request with its own body echoed back."""
    while (request := await server.request(reader)) is not None:
        writer.write(response(200, b"echo:" + request.body, "content-type: application/json"))
        await writer.drain()


async def started(**kw: object) -> UpstreamClient:
    values: dict[str, object] = {"connect_timeout": 2.0, "read_timeout": 5.0, "total_timeout": 10.0}
    values.update(kw)
    client = UpstreamClient(**values)  # type: ignore[arg-type]
    await client.start()
    return client


def request(url: str, **headers: str) -> UpstreamRequest:
    return UpstreamRequest(url + "/v1/chat/completions", {"content-type": "application/json", **headers})


async def post(c: UpstreamClient, url: str, body: bytes = b"{}", time_left: float | None = None) -> UpstreamResponse:
    return await c.send(request(url), body, time_left=time_left)


async def fetch(c: UpstreamClient, url: str, body: bytes = b"{}", limit: int = 1 << 20) -> bytes:
    """The whole answer's body; the connection goes back to the pool if it is clean."""
    reply = await post(c, url, body)
    try:
        return await reply.read(limit)
    finally:
        reply.release()
