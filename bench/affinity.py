"""Node affinity: prefix-cache hit rate and latency with affinity vs round robin, and the
sidecar's CPU per request for an affinity hit vs a request without affinity.

- Processes: a fake vLLM node pool (``bench.fake_vllm``: ``--nodes`` nodes, each
  with an LRU prefix cache of ``--cache-size`` prefixes; a request whose prefix
  its node holds answers after ``--hit-ms``, else after ``--miss-ms``), one
  ``keyplane control-plane`` (SQLite) holding tenant ``bench`` with a route
  ``llama`` whose vllm target has the pool's nodes, ``--clients`` client keys,
  and four ``keyplane sidecar`` processes on it: two as shipped (affinity on)
  and two with ``--no-node-affinity`` (round robin over the healthy nodes).
- Cache phase, once per mode and round (the pool's caches emptied before
  each): every client runs a closed loop of ``--requests`` chat requests,
  each through one of the two sidecars at random (two app pods behind a load
  balancer), after a random think time of up to 50 ms. A client's
  prefix is its own system prompt and context (the last message varies), so a
  node hits when it served that client recently. More clients than a node can
  cache (``clients > cache_size``) is the regime where placement matters.
  Reported: the pool's hit rate, and mean/p99 latency seen by the clients.
- CPU phase: one client, warm binding, ``--cpu-requests`` requests at
  concurrency 8 through one sidecar of each mode, alternating over rounds,
  to a second route on a pool of 2 nodes that answer at once;
  CPU of the sidecar process (``/proc``, outcome reports and binding
  refreshes included) per request. The ratio is affinity hit / no affinity,
  measured in the same run.

    python -m bench.affinity                 # 4 nodes, 48 clients, 3 rounds
    python -m bench.affinity --smoke         # tiny and quick (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from bench._keyplane import TENANT, ControlPlaneProc, keyplane_env, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds, pin_note
from bench.loadgen import percentile
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import admin_service_pb2_grpc as admin_grpc
from keyplane.v1 import resources_pb2

MODEL = "llama"
# The CPU phase's route: the same kind of target on a pool that answers at once.
CPU_MODEL = "llama-cpu"
UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# A client's pause before each request, uniform in [0, THINK_MS] ms.
THINK_MS = 50.0


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    # Without each client's first request (the binding's creation, the first prefill).
    later: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    errors: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _post(url: str, body: bytes | None = None) -> dict[str, object]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        found: dict[str, object] = json.loads(response.read())
        return found


def setup(cp: ControlPlaneProc, node_urls: list[str], cpu_urls: list[str], clients: int) -> list[str]:
    """Tenant, the vllm routes over the pools, ``clients`` client keys; their tokens."""
    channel = grpc.insecure_channel(cp.address)
    stub = admin_grpc.AdminServiceStub(channel)
    md = (("authorization", f"Bearer {cp.admin_token}"),)
    try:
        stub.CreateTenant(admin_pb2.CreateTenantRequest(name=TENANT), metadata=md, timeout=30)
        for model, urls in ((MODEL, node_urls), (CPU_MODEL, cpu_urls)):
            target = resources_pb2.RouteTarget(
                provider=resources_pb2.PROVIDER_VLLM, upstream_model=UPSTREAM_MODEL, node_urls=urls
            )
            stub.CreateRoute(
                admin_pb2.CreateRouteRequest(tenant=TENANT, public_model=model, targets=[target]),
                metadata=md,
                timeout=30,
            )
        return [
            stub.CreateClientKey(
                admin_pb2.CreateClientKeyRequest(tenant=TENANT, label=f"client-{i}"), metadata=md, timeout=30
            ).token
            for i in range(clients)
        ]
    finally:
        channel.close()


def _body(client: int, turn: int, model: str = MODEL) -> bytes:
    messages = [
        {"role": "system", "content": f"You are assistant #{client}. " + "Context. " * 40},
        {"role": "user", "content": f"question {turn}"},
    ]
    return json.dumps({"model": model, "messages": messages, "max_tokens": 8}, separators=(",", ":")).encode()


async def _cache_phase(sidecars: list[str], tokens: list[str], requests: int, seed: int) -> Sample:
    import aiohttp

    sample = Sample()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(index: int, token: str) -> None:
            # Each request through a sidecar picked at random (a load balancer in front of two
            # app pods), after a random think time: no accidental lockstep between clients.
            rng = random.Random(seed * 100_003 + index)
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            for turn in range(requests):
                await asyncio.sleep(rng.uniform(0, THINK_MS) / 1000)
                url = rng.choice(sidecars) + "/v1/chat/completions"
                started = time.perf_counter()
                async with session.post(url, data=_body(index, turn), headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        sample.errors += 1
                        continue
                elapsed = (time.perf_counter() - started) * 1000
                sample.latencies.append(elapsed)
                if turn:
                    sample.later.append(elapsed)

        await asyncio.gather(*(client(i, t) for i, t in enumerate(tokens)))
    return sample


def cache_phase(pool: str, sidecars: list[str], tokens: list[str], requests: int, seed: int) -> Sample:
    _post(pool + "/reset", b"")
    sample = asyncio.run(_cache_phase(sidecars, tokens, requests, seed))
    stats = _post(pool + "/stats")
    hits, misses = stats["hits"], stats["misses"]
    assert isinstance(hits, int) and isinstance(misses, int)
    sample.hits, sample.misses = hits, misses
    return sample


async def _cpu_load(sidecar: str, token: str, requests: int, concurrency: int) -> int:
    import aiohttp

    ok = 0
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    body = _body(0, 0, CPU_MODEL)
    left = requests
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                async with session.post(sidecar + "/v1/chat/completions", data=body, headers=headers) as response:
                    await response.read()
                    ok += response.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def cpu_per_request(proc: Proc, url: str, token: str, requests: int) -> float:
    """Microseconds of the sidecar's CPU per request."""
    asyncio.run(_cpu_load(url, token, 20, 4))  # warm: the binding is cached
    time.sleep(0.3)
    before = cpu_seconds(proc.pid)
    ok = asyncio.run(_cpu_load(url, token, requests, 8))
    time.sleep(0.3)  # the batched reports and refreshes of these requests
    spent = cpu_seconds(proc.pid) - before
    return spent / max(ok, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick (CI)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--requests", type=int, default=12, help="requests per client per round")
    parser.add_argument("--cache-size", type=int, default=20, help="prefixes a node caches (LRU)")
    parser.add_argument("--hit-ms", type=float, default=20.0, help="a node's answer time with the prefix cached")
    parser.add_argument("--miss-ms", type=float, default=200.0, help="a node's answer time with a prefill")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-requests", type=int, default=3000)
    parser.add_argument("--no-pin", action="store_true", help="let the OS schedule every process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.nodes, args.clients, args.requests, args.cache_size = 2, 8, 5, 6
        args.rounds, args.cpu_requests = 1, 200
    proxy_cpus = None if args.no_pin else PROXY_CPUS or None
    driver_cpus = None if args.no_pin else DRIVER_CPUS or None
    print(
        f"# node affinity ({'smoke' if args.smoke else 'full'}): {args.nodes} nodes (cache {args.cache_size} "
        f"prefixes, hit {args.hit_ms:g} ms / miss {args.miss_ms:g} ms), {args.clients} clients x "
        f"{args.requests} requests over 2 sidecars, {args.rounds} round(s); {pin_note(not args.no_pin)}",
        flush=True,
    )
    procs: list[Proc] = []
    cleanups: list[Callable[[], None]] = []
    try:
        pool_argv = [sys.executable, "-m", "bench.fake_vllm", "--nodes", str(args.nodes)]
        pool_argv += [
            "--cache-size",
            str(args.cache_size),
            "--hit-ms",
            str(args.hit_ms),
            "--miss-ms",
            str(args.miss_ms),
        ]
        pool = Proc.start(pool_argv, ready=r"nodes (.+)", cpus=driver_cpus, env=keyplane_env())
        procs.append(pool)
        node_urls = pool.match.group(1).split()
        cpu_argv = [sys.executable, "-m", "bench.fake_vllm", "--nodes", "2", "--hit-ms", "0", "--miss-ms", "0"]
        cpu_pool = Proc.start(cpu_argv, ready=r"nodes (.+)", cpus=driver_cpus, env=keyplane_env())
        procs.append(cpu_pool)
        cpu_urls = cpu_pool.match.group(1).split()
        cp = start_control_plane(cpus=driver_cpus)
        cleanups.append(cp.stop)
        tokens = setup(cp, node_urls, cpu_urls, args.clients)
        affinity = [start_sidecar(cp, cpus=proxy_cpus) for _ in range(2)]
        plain = [start_sidecar(cp, cpus=proxy_cpus, extra_args=["--no-node-affinity"]) for _ in range(2)]
        procs += affinity + plain
        urls = {
            "affinity": [p.match.group(1) for p in affinity],
            "round robin": [p.match.group(1) for p in plain],
        }
        results: dict[str, list[Sample]] = {mode: [] for mode in urls}
        for r in range(args.rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for mode in order:
                results[mode].append(cache_phase(node_urls[0], urls[mode], tokens, args.requests, seed=r))
        print("\n| mode | requests | errors | prefix-cache hit rate | mean ms | p99 ms | p99 ms, first requests out |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        summary: dict[str, tuple[float, float, float]] = {}
        for mode, samples in results.items():
            latencies = [x for s in samples for x in s.latencies]
            hits = sum(s.hits for s in samples)
            total = hits + sum(s.misses for s in samples)
            rate = hits / total if total else 0.0
            mean = statistics.fmean(latencies) if latencies else float("nan")
            p99 = percentile(latencies, 99) if latencies else float("nan")
            later = [x for s in samples for x in s.later]
            p99_later = percentile(later, 99) if later else float("nan")
            summary[mode] = (rate, mean, p99)
            errors = sum(s.errors for s in samples)
            print(
                f"| {mode} | {len(latencies) + errors} | {errors} | {rate:.1%} | {mean:.1f} | {p99:.1f} "
                f"| {p99_later:.1f} |"
            )
        a, b = summary["affinity"], summary["round robin"]
        print(
            f"\naffinity vs round robin: hit rate {a[0]:.1%} vs {b[0]:.1%}; mean latency x{a[1] / b[1]:.2f}, "
            f"p99 x{a[2] / b[2]:.2f}",
            flush=True,
        )

        # CPU: one warm client, pool answering at once would be ideal; the delays do not
        # change the sidecar's CPU, only the wall time.
        cpu: dict[str, list[float]] = {"affinity hit": [], "no affinity": []}
        cases = [("affinity hit", affinity[0]), ("no affinity", plain[0])]
        for r in range(2 * args.rounds + 1):
            for name, proc in cases if r % 2 == 0 else reversed(cases):
                cpu[name].append(cpu_per_request(proc, proc.match.group(1), tokens[0], args.cpu_requests))
        print("\n| request | sidecar CPU µs/request (median) | rounds |")
        print("| --- | --- | --- |")
        medians = {name: statistics.median(values) for name, values in cpu.items()}
        for name, values in cpu.items():
            print(f"| {name} | {medians[name]:.0f} | {' '.join(f'{v:.0f}' for v in values)} |")
        print(
            f"\naffinity hit vs no affinity: CPU x{medians['affinity hit'] / medians['no affinity']:.2f} "
            f"({medians['affinity hit'] - medians['no affinity']:+.0f} µs/request)",
            flush=True,
        )
        return 0
    finally:
        for proc in procs:
            proc.stop()
        for cleanup in cleanups:
            cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
