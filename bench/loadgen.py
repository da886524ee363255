"""A lean HTTP/1.1 load generator: uvloop + raw asyncio protocols + httptools'
C response parser, keep-alive connections, one request in flight per
connection (closed loop), spread over ``procs`` worker processes.

It records, per request: latency to the last byte, time to the first body
byte (TTFB) and, optionally, the arrival time of every body read (to show
that a proxy forwards stream chunks as they come). Used as the load generator
where ``wrk`` is missing, and as the TTFB / inter-chunk probe everywhere.

    python -m bench.loadgen --url http://127.0.0.1:8900/v1/chat/completions -c 32 -d 5 --procs 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = ["LoadSpec", "LoadStats", "percentile", "run_load"]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    body: bytes
    concurrency: int = 1
    # Seconds; ignored when ``requests`` is set.
    duration: float = 5.0
    # Stop after exactly this many requests (over all connections) instead.
    requests: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # Record the arrival time of each body read (for the chunk-timing probe).
    chunk_times: bool = False
    procs: int = 1
    cpus: frozenset[int] | None = None


@dataclass(slots=True)
class LoadStats:
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    # Milliseconds, one per successful request.
    latency_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    # Per request: milliseconds from the first body byte to each later body read.
    chunk_ms: list[list[float]] = field(default_factory=list)
    load_generator: str = ""
    cpu_seconds: float = 0.0

    def merge(self, other: LoadStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.elapsed = max(self.elapsed, other.elapsed)
        self.latency_ms += other.latency_ms
        self.ttfb_ms += other.ttfb_ms
        self.chunk_ms += other.chunk_ms
        self.cpu_seconds += other.cpu_seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends the prepared bytes and waits."""

    def __init__(self, chunk_times: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.chunk_times = chunk_times
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.first_body = 0
        self.arrivals: list[int] = []
        self.complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        now = time.perf_counter_ns()
        if not self.first_body:
            self.first_body = now
        elif self.chunk_times:
            self.arrivals.append(now)

    def on_message_complete(self) -> None:
        self.complete = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def request(self, raw: bytes) -> tuple[int, int, int, list[int], bool]:
        """(status, sent_ns, first_body_ns, later arrivals, keep_alive)."""
        assert self.transport is not None
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        sent = time.perf_counter_ns()
        self.transport.write(raw)
        await self.done
        status = self.parser.get_status_code()
        keep = self.parser.should_keep_alive()
        return status, sent, self.first_body, self.arrivals, keep


def _raw_request(spec: LoadSpec) -> tuple[str, int, bytes]:
    parts = urlsplit(spec.url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(spec.body)}",
        "User-Agent: keyplane-bench",
        *(f"{name}: {value}" for name, value in spec.headers),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + spec.body


async def _run_one(spec: LoadSpec) -> LoadStats:
    host, port, raw = _raw_request(spec)
    loop = asyncio.get_running_loop()
    stats = LoadStats(load_generator="bench.loadgen")
    remaining = [spec.requests] if spec.requests is not None else None
    start = time.perf_counter()
    deadline = start + spec.duration

    async def connect() -> _Conn:
        _, conn = await loop.create_connection(lambda: _Conn(spec.chunk_times), host, port)
        return conn

    async def worker() -> None:
        conn: _Conn | None = None
        try:
            while True:
                if remaining is not None:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                elif time.perf_counter() >= deadline:
                    return
                if conn is None or conn.lost:
                    conn = await connect()
                try:
                    status, sent, first, arrivals, keep = await conn.request(raw)
                except (ConnectionError, httptools.HttpParserError, OSError):
                    stats.errors += 1
                    stats.requests += 1
                    if conn.transport is not None:
                        conn.transport.close()
                    conn = None
                    continue
                end = time.perf_counter_ns()
                stats.requests += 1
                key = str(status)
                stats.statuses[key] = stats.statuses.get(key, 0) + 1
                if 200 <= status < 300:
                    stats.latency_ms.append((end - sent) / 1e6)
                    stats.ttfb_ms.append(((first or end) - sent) / 1e6)
                    if spec.chunk_times and first:
                        stats.chunk_ms.append([(t - first) / 1e6 for t in arrivals])
                else:
                    stats.errors += 1
                if not keep:
                    assert conn.transport is not None
                    conn.transport.close()
                    conn = None
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    stats.elapsed = time.perf_counter() - start
    return stats


def _run_in_process(spec: LoadSpec) -> LoadStats:
    import uvloop

    before = os.times()
    stats = uvloop.run(_run_one(spec))
    after = os.times()
    stats.cpu_seconds = (after.user - before.user) + (after.system - before.system)
    return stats


def run_load(spec: LoadSpec, *, smoke: bool = False) -> LoadStats:
    """Run ``spec`` in ``spec.procs`` worker processes (never in this one) and merge."""
    procs = max(1, min(spec.procs, spec.concurrency))
    per = [spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0) for i in range(procs)]
    counts: list[int | None] = [None] * procs
    if spec.requests is not None:
        counts = [spec.requests * p // spec.concurrency for p in per]
        counts[0] = (counts[0] or 0) + spec.requests - sum(c or 0 for c in counts)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        children: list[tuple[subprocess.Popen[bytes], Path]] = []
        for index, concurrency in enumerate(per):
            spec_file = Path(tmp) / f"spec-{index}.json"
            out_file = Path(tmp) / f"out-{index}.json"
            spec_file.write_text(
                json.dumps(
                    {
                        "url": spec.url,
                        "body": spec.body.decode(),
                        "concurrency": concurrency,
                        "duration": spec.duration,
                        "requests": counts[index],
                        "headers": [list(h) for h in spec.headers],
                        "chunk_times": spec.chunk_times,
                    }
                )
            )
            cpus = spec.cpus

            def pin(cpus: frozenset[int] | None = cpus) -> None:
                if cpus:
                    os.sched_setaffinity(0, cpus)

            argv = [sys.executable, "-m", "bench.loadgen", "--worker", str(spec_file), str(out_file)]
            children.append((subprocess.Popen(argv, preexec_fn=pin), out_file))
        total = LoadStats(load_generator=f"bench.loadgen x{procs} process(es)")
        for popen, out_file in children:
            code = popen.wait()
            if code != 0:
                raise RuntimeError(f"load generator worker exited with {code}")
            data = json.loads(out_file.read_text())
            total.merge(LoadStats(**data))
    return total


def _worker(spec_path: Path, out_path: Path) -> int:
    raw = json.loads(spec_path.read_text())
    spec = LoadSpec(
        url=raw["url"],
        body=raw["body"].encode(),
        concurrency=raw["concurrency"],
        duration=raw["duration"],
        requests=raw["requests"],
        headers=tuple((h[0], h[1]) for h in raw["headers"]),
        chunk_times=raw["chunk_times"],
    )
    stats = _run_in_process(spec)
    out_path.write_text(json.dumps(asdict(stats)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "--worker":
        return _worker(Path(args_list[1]), Path(args_list[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", default='{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}')
    parser.add_argument("--header", action="append", default=[], help="Name: value (repeatable)")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("-n", "--requests", type=int)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(args_list)
    headers = tuple((h.split(":", 1)[0].strip(), h.split(":", 1)[1].strip()) for h in args.header)
    stats = run_load(
        LoadSpec(
            url=args.url,
            body=args.body.encode(),
            concurrency=args.concurrency,
            duration=args.duration,
            requests=args.requests,
            headers=headers,
            procs=args.procs,
        )
    )
    print(
        f"{stats.requests} requests, {stats.errors} errors, {stats.requests / stats.elapsed:.0f} req/s, "
        f"p50 {percentile(stats.latency_ms, 50):.3f} ms, p99 {percentile(stats.latency_ms, 99):.3f} ms, "
        f"ttfb p50 {percentile(stats.ttfb_ms, 50):.3f} ms, statuses {stats.statuses}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
