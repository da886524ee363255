"""A fake vLLM node pool whose nodes keep a prefix cache (aiohttp.web, one port per node).

Each node answers ``POST /v1/chat/completions`` in OpenAI's JSON shape, as
vLLM's OpenAI-compatible server does, after a delay that depends on its
prefix cache: the prefix is everything but the last message (the system
prompt and the conversation so far). A node that has seen the prefix (an LRU
of ``cache_size`` prefixes per node) answers after ``hit_ms``; one that has
not pays the prefill, ``miss_ms``, then remembers it. ``usage`` carries
``prompt_tokens_details.cached_tokens`` as vLLM reports it (the cached part of
the prompt, here: the prefix's characters or 0).

``GET /v1/stats`` on any node returns every node's hits and misses;
``POST /v1/reset`` empties every cache and counter.

    python -m bench.fake_vllm --nodes 4 --port 8950   # nodes on 8950..8953
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["NodePool", "PrefixNode"]


@dataclass(slots=True)
class PrefixNode:
    """One node's prefix cache and counters."""

    index: int
    cache_size: int
    hits: int = 0
    misses: int = 0
    _seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def touch(self, prefix: bytes) -> bool:
        """Whether ``prefix`` was cached here; it is afterwards (LRU)."""
        if not prefix:
            self.misses += 1
            return False
        digest = hashlib.blake2b(prefix, digest_size=16).digest()
        seen = self._seen
        if digest in seen:
            seen.move_to_end(digest)
            self.hits += 1
            return True
        seen[digest] = None
        if len(seen) > self.cache_size:
            seen.popitem(last=False)
        self.misses += 1
        return False

    def reset(self) -> None:
        self._seen.clear()
        self.hits = self.misses = 0


class NodePool:
    """``nodes`` fake vLLM nodes sharing one event loop."""

    def __init__(self, nodes: int, *, hit_ms: float, miss_ms: float, cache_size: int = 1024) -> None:
        self.nodes = [PrefixNode(i, cache_size) for i in range(nodes)]
        self.hit = hit_ms / 1000
        self.miss = miss_ms / 1000
        self._runners: list[web.AppRunner] = []
        self.ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        """The nodes' base URLs as a vllm target's ``node_urls`` takes them (``.../v1``)."""
        return [f"http://127.0.0.1:{port}/v1" for port in self.ports]

    def stats(self) -> dict[str, object]:
        hits = sum(n.hits for n in self.nodes)
        misses = sum(n.misses for n in self.nodes)
        return {
            "hits": hits,
            "misses": misses,
            "per_node": [{"hits": n.hits, "misses": n.misses} for n in self.nodes],
        }

    def reset(self) -> None:
        for node in self.nodes:
            node.reset()

    async def start(self, first_port: int = 0) -> None:
        for node in self.nodes:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._completions(node))
            app.router.add_get("/v1/stats", self._stats)
            app.router.add_post("/v1/reset", self._reset)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", first_port + node.index if first_port else 0)
            await site.start()
            self._runners.append(runner)
            server = site._server
            assert server is not None and isinstance(server, asyncio.base_events.Server)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    def _completions(self, node: PrefixNode) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            messages = body.get("messages") or []
            prefix = json.dumps(messages[:-1], separators=(",", ":")).encode() if len(messages) > 1 else b""
            cached = node.touch(prefix)
            await asyncio.sleep(self.hit if cached else self.miss)
            prompt = sum(len(str(m.get("content", ""))) for m in messages)
            answer = {
                "id": f"cmpl-{node.index}-{time.monotonic_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "logprobs": None,
                        "finish_reason": "stop",
                        "stop_reason": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": 1,
                    "total_tokens": prompt + 1,
                    "prompt_tokens_details": {"cached_tokens": len(prefix) if cached else 0},
                },
            }
            return web.json_response(answer, headers={"x-fake-node": str(node.index)})

        return handle

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


async def _serve(args: argparse.Namespace) -> None:
    pool = NodePool(args.nodes, hit_ms=args.hit_ms, miss_ms=args.miss_ms, cache_size=args.cache_size)
    await pool.start(args.port)
    print("nodes " + " ".join(pool.urls), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await pool.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4, help="how many nodes (default 4)")
    parser.add_argument("--port", type=int, default=0, help="first node's port (0: any free ports)")
    parser.add_argument("--hit-ms", type=float, default=5.0, help="answer delay when the prefix is cached (ms)")
    parser.add_argument("--miss-ms", type=float, default=40.0, help="answer delay with a prefill (ms)")
    parser.add_argument("--cache-size", type=int, default=1024, help="prefixes remembered per node (LRU)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
