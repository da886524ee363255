"""Which HTTP stack a pass-through proxy can afford: the next step for the p50 target.

The ideal proxy (``bench.ideal_proxy``) is uvicorn + one aiohttp
ClientSession, like the sidecar. This benchmark takes the ideal proxy apart
and swaps each half for the leanest thing that does its job over asyncio and
httptools (the C HTTP parser uvicorn already uses), to measure where its CPU
per request goes:

- server: ``uvicorn`` (raw ASGI, httptools) or ``raw`` (an asyncio.Protocol
  on httptools' request parser, one task per request);
- upstream client: ``aiohttp`` (one ClientSession) or ``raw`` (a keep-alive
  pool of asyncio.Protocol connections on httptools' response parser).

The ``raw`` halves are measurement instruments, ~100 lines with no TLS,
timeouts, streaming or error handling; they bound what a purpose-built
client or server could save, not what one would cost to build. Each stack
runs in its own process pinned to the proxy core; fake upstream and load
generator (wrk, else ``bench.loadgen``) on the driver core; json-small
requests at concurrency 1 and 32, targets alternating within each round.

    python -m bench.client_stack [--duration 4] [--rounds 2]
    python -m bench.client_stack --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import httptools

STACKS = ("uvicorn-aiohttp", "uvicorn-raw", "raw-aiohttp", "raw-raw")
BASELINE = "uvicorn-aiohttp"  # = the ideal proxy

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


# --- upstream clients --------------------------------------------------------------


class UpstreamClient(Protocol):
    async def post(self, path: bytes, body: bytes) -> tuple[int, bytes]: ...


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, idle: list[_UpstreamConnection]) -> None:
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is no subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body, self.body = b"".join(self.body), []
        self.idle.append(self)
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed the connection"))


class RawClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_UpstreamConnection] = []
        self.head = b"Host: %s:%d\r\nContent-Type: application/json\r\n" % (host.encode(), port)

    async def post(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await loop.create_connection(lambda: _UpstreamConnection(self.idle), self.host, self.port)
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        conn.waiter = waiter
        assert conn.transport is not None
        conn.transport.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path, self.head, len(body), body))
        return await waiter


class AiohttpClient:
    def __init__(self, host: str, port: int) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.base = f"http://{host}:{port}"

    async def post(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"}
        async with self.session.post(self.base + path.decode(), data=body, headers=headers) as response:
            return response.status, await response.read()


def _client(kind: str, host: str, port: int) -> UpstreamClient:
    return RawClient(host, port) if kind == "raw" else AiohttpClient(host, port)


# --- servers -----------------------------------------------------------------------


class AsgiProxy:
    """What ``bench.ideal_proxy`` does, over either client."""

    def __init__(self, make_client: Callable[[], UpstreamClient]) -> None:
        self.make_client = make_client
        self.client: UpstreamClient | None = None

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return
        if self.client is None:
            self.client = self.make_client()  # on the server's loop
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        status, data = await self.client.post(scope["path"].encode(), b"".join(chunks))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


class _RawServerConnection(asyncio.Protocol):
    client: UpstreamClient

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self._answer(self.url, body))

    async def _answer(self, url: bytes, body: bytes) -> None:
        status, data = await self.client.post(url, body)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(data), data)
        )


async def _serve_raw(sock: socket.socket, make_client: Callable[[], UpstreamClient]) -> None:
    _RawServerConnection.client = make_client()
    server = await asyncio.get_running_loop().create_server(_RawServerConnection, sock=sock)
    async with server:
        await server.serve_forever()


def serve_main(argv: list[str]) -> int:
    import uvloop

    from bench import ideal_proxy
    from bench.fake_upstream import bind

    parser = argparse.ArgumentParser(prog="bench.client_stack serve")
    parser.add_argument("--stack", choices=STACKS, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    server_kind, _, client_kind = args.stack.partition("-")

    def make_client() -> UpstreamClient:
        return _client(client_kind, host, int(port))

    sock = bind("127.0.0.1", 0)
    print(f"{args.stack} listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    if server_kind == "uvicorn":
        ideal_proxy.serve(AsgiProxy(make_client), sock)  # exactly the ideal proxy's server
    else:
        uvloop.run(_serve_raw(sock, make_client))
    return 0


# --- orchestrator -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    from bench import _wrk, fake_upstream
    from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds
    from bench.proxy_overhead import MIXES, Target, _load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 s per case, one round")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.rounds = 1.0, 1
    use_wrk = _wrk.available()
    mix = next(m for m in MIXES if m.name == "json-small")
    body = mix.body("bench-model")
    proxy_cpus, driver_cpus = PROXY_CPUS or None, DRIVER_CPUS or None
    print(
        f"# client stack: json-small, {args.duration:.0f} s per case, {args.rounds} round(s), "
        f"{'wrk -t1' if use_wrk else 'bench.loadgen'}; stacks on core(s) {sorted(PROXY_CPUS)}",
        flush=True,
    )
    procs: list[Proc] = []
    rows: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    try:
        upstream = fake_upstream.start_process(cpus=driver_cpus)
        procs.append(upstream)
        up_hostport = upstream.match.group(1).removeprefix("http://")
        targets: list[Target] = []
        for stack in STACKS:
            proc = Proc.start(
                [sys.executable, "-m", "bench.client_stack", "serve", "--stack", stack, "--upstream", up_hostport],
                ready=r"listening on (http://\S+)",
                cpus=proxy_cpus,
            )
            procs.append(proc)
            targets.append(Target(stack, proc.match.group(1) + "/v1/chat/completions", (), proc))
        for round_no in range(args.rounds):
            for concurrency in args.concurrency:
                shift = (round_no + concurrency) % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    _load(target, body, concurrency, 0.5, use_wrk, driver_cpus)  # warm
                    assert target.proc is not None
                    before = cpu_seconds(target.proc.pid)
                    started = time.monotonic()
                    requests, errors, elapsed, p50, p99, _, _ = _load(
                        target, body, concurrency, args.duration, use_wrk, driver_cpus
                    )
                    cpu = cpu_seconds(target.proc.pid) - before
                    if errors or not requests:
                        raise RuntimeError(f"{target.name}: {errors} errors, {requests} requests")
                    rate = requests / (elapsed or time.monotonic() - started)
                    rows.setdefault((target.name, concurrency), []).append((rate, p50, p99, cpu / requests * 1e3))
                    print(
                        f"[r{round_no}] c={concurrency:<3d} {target.name:16s} {rate:8.0f} req/s p50 {p50:.3f} "
                        f"p99 {p99:.3f} ms CPU {cpu / requests * 1e3:.3f} ms/req",
                        flush=True,
                    )
    finally:
        for proc in reversed(procs):
            proc.stop()
    print()
    print("| conc | stack (server-client) | req/s | p50 ms | p99 ms | CPU ms/req | CPU vs ideal | req/s vs ideal |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for concurrency in args.concurrency:
        base = rows[(BASELINE, concurrency)]
        for stack in STACKS:
            mine = rows[(stack, concurrency)]
            cpu_ratio = statistics.median(m[3] / b[3] for m, b in zip(mine, base, strict=True))
            rate_ratio = statistics.median(m[0] / b[0] for m, b in zip(mine, base, strict=True))

            def med(i: int, mine: list[tuple[float, float, float, float]] = mine) -> float:
                return float(statistics.median(m[i] for m in mine))

            print(
                f"| {concurrency} | {stack} | {med(0):.0f} | {med(1):.3f} | {med(2):.3f} | {med(3):.3f} | "
                f"{cpu_ratio:.2f} | {rate_ratio:.2f} |"
            )
    print(f"(median over rounds; ratios per round against {BASELINE}, the ideal proxy's stack)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
