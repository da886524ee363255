"""A fast fake OpenAI-compatible upstream, run as its own process.

``POST .../chat/completions`` answers in OpenAI's JSON shape, or with OpenAI's
SSE framing when ``"stream": true``. The answer's content is ``max_tokens``
characters long (default 64), split over ``--chunks`` stream events. A model
name ending in ``-gap-<ms>`` spaces the stream events ``<ms>`` apart (to show
that a proxy forwards chunks as they arrive); ``--delay-ms`` delays every
answer. ``GET .../models`` lists one model. Answers are cached per
(request body), so the server spends its time on HTTP, not on JSON.

Two servers implement the same answers: raw ASGI on uvicorn (httptools,
uvloop) and aiohttp.web; ``--compare`` measures both with the same load and
prints which is faster (the benchmarks use the faster one, ``asgi``).

    python -m bench.fake_upstream --port 8900            # serve until killed
    python -m bench.fake_upstream --compare [--smoke]    # asgi vs aiohttp.web
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from bench._procs import Proc, cpu_seconds

__all__ = ["Answer", "Responder", "bind", "main"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_GAP = re.compile(r"-gap-(\d+)$")
_CREATED = 1_700_000_000
_MAX_CONTENT = 1 << 20
_CACHE_LIMIT = 4096
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    # One part for JSON; one per SSE event for streams.
    parts: tuple[bytes, ...]
    streaming: bool
    # Seconds between stream events.
    gap: float


def _error(status: int, message: str) -> Answer:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return Answer(status, _JSON_HEADERS, (body.encode(),), False, 0.0)


def _completion(model: str, content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(content), "total_tokens": 10 + len(content)},
        },
        separators=(",", ":"),
    ).encode()


def _event(model: str, delta: dict[str, str] | None, finish: str | None, usage: object = ...) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "system_fingerprint": "fp_bench",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not ...:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _stream(model: str, content: str, chunks: int, with_usage: bool = False) -> tuple[bytes, ...]:
    """OpenAI's events; with ``stream_options.include_usage``, a ``"usage":null`` on each
    and a usage chunk (no choices) before ``[DONE]``, as OpenAI sends them."""
    size = max(1, -(-len(content) // chunks)) if content else 1
    pieces = [content[i : i + size] for i in range(0, len(content), size)] or [""]
    null: object = None if with_usage else ...
    events = [_event(model, {"role": "assistant", "content": pieces[0]}, None, null)]
    events += [_event(model, {"content": piece}, None, null) for piece in pieces[1:]]
    events.append(_event(model, {}, "stop", null))
    if with_usage:
        usage = {"prompt_tokens": 10, "completion_tokens": len(content), "total_tokens": 10 + len(content)}
        events.append(_event(model, None, None, usage))
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


class Responder:
    """Request body -> ``Answer``; pure and cached, shared by both servers."""

    def __init__(self, *, chunks: int = 8) -> None:
        self.chunks = max(1, chunks)
        self._cache: dict[bytes, Answer] = {}

    def answer(self, body: bytes) -> Answer:
        found = self._cache.get(body)
        if found is not None:
            return found
        answer = self._build(body)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[body] = answer
        return answer

    def _build(self, body: bytes) -> Answer:
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
            return _error(400, "you must provide a model parameter")
        model: str = payload["model"]
        size = payload.get("max_tokens") or payload.get("max_completion_tokens") or 64
        size = min(int(size), _MAX_CONTENT) if isinstance(size, int) else 64
        content = ("lorem ipsum " * (size // 12 + 1))[:size]
        match = _GAP.search(model)
        gap = int(match.group(1)) / 1000 if match else 0.0
        if payload.get("stream") is True:
            options = payload.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return Answer(200, _SSE_HEADERS, _stream(model, content, self.chunks, with_usage), True, gap)
        return Answer(200, _JSON_HEADERS, (_completion(model, content),), False, 0.0)


_MODELS = json.dumps(
    {"object": "list", "data": [{"id": "bench-model", "object": "model", "created": _CREATED, "owned_by": "bench"}]}
).encode()


# --- raw ASGI on uvicorn -------------------------------------------------------------


class AsgiUpstream:
    def __init__(self, responder: Responder, delay: float) -> None:
        self.responder = responder
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await _asgi_send(send, 200, _JSON_HEADERS, _MODELS)
            return
        if not path.endswith("/chat/completions"):
            await _asgi_send(send, 404, _JSON_HEADERS, _error(404, "not found").parts[0])
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        answer = self.responder.answer(b"".join(chunks))
        if self.delay:
            await asyncio.sleep(self.delay)
        if not answer.streaming:
            await _asgi_send(send, answer.status, answer.headers, answer.parts[0])
            return
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
        for index, part in enumerate(answer.parts):
            if answer.gap and index:
                await asyncio.sleep(answer.gap)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _asgi_send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    head = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _serve_asgi(sock: socket.socket, responder: Responder, delay: float) -> None:
    import uvicorn

    config = uvicorn.Config(
        AsgiUpstream(responder, delay),
        http="httptools",
        loop="none",
        lifespan="off",
        log_level="warning",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        backlog=4096,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


# --- aiohttp.web ---------------------------------------------------------------------


async def _serve_aiohttp(sock: socket.socket, responder: Responder, delay: float) -> None:
    from aiohttp import web

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.path.endswith("/models"):
            return web.Response(body=_MODELS, content_type="application/json")
        if not request.path.endswith("/chat/completions"):
            return web.Response(status=404, body=_error(404, "not found").parts[0], content_type="application/json")
        answer = responder.answer(await request.read())
        if delay:
            await asyncio.sleep(delay)
        headers = {k.decode(): v.decode() for k, v in answer.headers}
        if not answer.streaming:
            return web.Response(status=answer.status, body=answer.parts[0], headers=headers)
        response = web.StreamResponse(status=answer.status, headers=headers)
        await response.prepare(request)
        for index, part in enumerate(answer.parts):
            if answer.gap and index:
                await asyncio.sleep(answer.gap)
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def serve(server: str, host: str, port: int, *, delay: float, chunks: int) -> None:
    import uvloop

    sock = bind(host, port)
    print(f"fake upstream ({server}) listening on http://{host}:{sock.getsockname()[1]}/v1", flush=True)
    responder = Responder(chunks=chunks)
    runner = _serve_asgi if server == "asgi" else _serve_aiohttp
    try:
        uvloop.run(runner(sock, responder, delay))
    except KeyboardInterrupt:
        pass


def start_process(*options: str, cpus: frozenset[int] | None) -> Proc:
    """The fake upstream in a process of its own on a free port (``options``: more
    command-line options); ``.match.group(1)`` is its base URL, without ``/v1``."""
    return Proc.start(
        [sys.executable, "-m", "bench.fake_upstream", "--port", "0", *options],
        ready=r"listening on (http://\S+)/v1",
        cpus=cpus,
    )


def compare(*, smoke: bool, duration: float) -> int:
    """Serve with each implementation in turn and load it the same way."""
    from bench import loadgen

    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64})
    results: dict[str, list[float]] = {"asgi": [], "aiohttp": []}
    rounds = 1 if smoke else 3
    for _ in range(rounds):
        for server in ("asgi", "aiohttp"):
            proc = start_process("--server", server, cpus=None)
            try:
                url = proc.match.group(1) + "/v1/chat/completions"
                before = cpu_seconds(proc.pid)
                stats = loadgen.run_load(
                    loadgen.LoadSpec(url=url, body=body.encode(), concurrency=32, duration=duration), smoke=smoke
                )
                used = cpu_seconds(proc.pid) - before
            finally:
                proc.stop()
            rps = stats.requests / stats.elapsed
            results[server].append(rps)
            cpu_ms = 1000 * used / max(stats.requests, 1)
            print(f"{server:8s} {rps:9.0f} req/s  {cpu_ms:.3f} ms CPU/request  ({stats.load_generator})", flush=True)
    best = {name: max(values) for name, values in results.items()}
    winner = max(best, key=lambda name: best[name])
    print(f"fake upstream peak req/s: asgi={best['asgi']:.0f} aiohttp={best['aiohttp']:.0f} -> faster: {winner}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=["asgi", "aiohttp"], default="asgi")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900, help="0 picks a free port (printed at startup)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--chunks", type=int, default=8, help="content events per stream")
    parser.add_argument("--compare", action="store_true", help="measure asgi vs aiohttp.web and exit")
    parser.add_argument("--smoke", action="store_true", help="with --compare: one short round")
    parser.add_argument("--duration", type=float, default=5.0, help="with --compare: seconds per server")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(smoke=args.smoke, duration=1.0 if args.smoke else args.duration)
    serve(args.server, args.host, args.port, delay=args.delay_ms / 1000, chunks=args.chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
