"""Added latency where the wire sees it: timestamps taken by tcpdump at each target's socket.

A load generator's latency figure holds its own time around each exchange
too (its process waking, parsing, timing). At concurrency 1 on this two-core
machine that share is what separates wrk's tail from the proxy's: with
outcome reports on, wrk's p99 for the sidecar is 2-3x what the sidecar's
socket shows (docs/benchmarks.md). This benchmark takes the load generator
out of the measurement: for each target it runs the same load as
``bench.proxy_overhead`` (json-small, concurrency 1, wrk when installed)
while ``tcpdump -i lo`` records the target's port (headers only, segments
that carry data), and times each request from its request segment arriving
at the target's port to the last segment of the answer leaving it. Added
wire latency = target - direct (the fake upstream's own port), per round.
Alongside: the load generator's own p50/p99, and its turnaround (the last
answer segment leaving -> its next request arriving), which bounds what the
load generator itself adds to a round trip as the wire sees it; and, right
after each captured run, the same requests for the same time from a minimal
closed-loop C client (``bench/c/closed_loop.c``: blocking sockets, one
request at a time, CLOCK_MONOTONIC per request; built with the machine's C
compiler, left out without one), a second opinion on wrk's figures.

Targets: direct, sidecar (outcome reports on, the default), sidecar-noreports,
ideal (``bench.ideal_proxy``); the order rotates each round. Needs tcpdump and
the right to capture on lo (root or CAP_NET_RAW); without them it says so and
exits 0 (Debian: ``apt-get install tcpdump``).

    python -m bench.wire_latency [--duration 5] [--rounds 3]
    python -m bench.wire_latency --smoke
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import _closed_loop, fake_upstream
from bench._keyplane import Admin, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, pin_note

TARGETS = ("direct", "sidecar", "sidecar-noreports", "ideal")
MODEL = "bench-model"
_SEGMENT = re.compile(r"^(\d+\.\d+) IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+):")


def wire_latencies(tcpdump_text: str, port: int) -> list[float]:
    """Per request, ms from its request segment reaching ``port`` to the last answer
    segment leaving it before the next request (``tcpdump -n -tt`` lines)."""
    return _exchanges(tcpdump_text, port)[0]


def turnarounds(tcpdump_text: str, port: int) -> list[float]:
    """Per answer, ms from its last segment leaving ``port`` to the load generator's
    next request arriving: the load generator's own share of a round trip."""
    return _exchanges(tcpdump_text, port)[1]


def _exchanges(tcpdump_text: str, port: int) -> tuple[list[float], list[float]]:
    # Segments in time order: a capture interleaves what the two cores sent, and its
    # file order can put a request before the end of the answer it followed.
    segments: list[tuple[float, bool]] = []  # (time, is a request to ``port``)
    for line in tcpdump_text.splitlines():
        m = _SEGMENT.match(line)
        if m is not None:
            segments.append((float(m.group(1)), int(m.group(3)) == port))
    segments.sort(key=lambda seg: seg[0])
    latencies: list[float] = []
    turns: list[float] = []
    request_at: float | None = None
    answered_at: float | None = None
    for at, is_request in segments:
        if is_request:
            if request_at is not None and answered_at is not None:
                latencies.append((answered_at - request_at) * 1000)
                turns.append((at - answered_at) * 1000)
            request_at, answered_at = at, None
        elif request_at is not None:
            answered_at = at
    if request_at is not None and answered_at is not None:
        latencies.append((answered_at - request_at) * 1000)
    return latencies, turns


def capture_available() -> str | None:
    """None when tcpdump can capture on lo here, else why not."""
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (Debian: apt-get install tcpdump)"
    # A capture that sees nothing never ends by itself: start one and see whether it stays up.
    with tempfile.NamedTemporaryFile(suffix=".pcap") as f:
        proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-w", f.name, "tcp port 9"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(0.5)
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            return f"tcpdump cannot capture on lo: {err[-200:]}"
        proc.terminate()
        proc.wait()
    return None


def _port(url: str) -> int:
    """The port of an ``http://127.0.0.1:PORT/...`` URL."""
    return int(url.split(":")[2].split("/")[0])


def _request_bytes(port: int, headers: tuple[tuple[str, str], ...]) -> bytes:
    """The json-small request as the closed-loop C client sends it."""
    from bench.proxy_overhead import MIXES

    body = next(m for m in MIXES if m.name == "json-small").body(MODEL)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass(frozen=True)
class Run:
    wire_ms: list[float]
    turnaround_ms: list[float]
    # What the load generator saw.
    requests: int
    p50_ms: float
    p99_ms: float
    # Segments tcpdump reported it could not keep (its buffer overflowed).
    dropped: int

    @property
    def complete(self) -> bool:
        """Every request was timed: a capture that lost segments would lose the slow ones first."""
        return self.dropped == 0 and len(self.wire_ms) >= self.requests - 2


def measure(url: str, port: int, headers: tuple[tuple[str, str], ...], duration: float) -> Run:
    """One run of the load against ``url`` with ``port`` captured."""
    from bench import _wrk
    from bench.proxy_overhead import MIXES, Target, _load

    body = next(m for m in MIXES if m.name == "json-small").body(MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        pcap = Path(tmp) / "cap.pcap"
        capture = subprocess.Popen(
            [
                "tcpdump",
                "-i",
                "lo",
                "-n",
                "-s",
                "128",
                "-B",
                "65536",  # KiB: 5 s of segments fit, nothing is dropped while tcpdump sleeps
                "-w",
                str(pcap),
                # Segments that carry data (no bare ACKs).
                f"tcp port {port} and (((ip[2:2] - ((ip[0] & 0xf) << 2)) - ((tcp[12] & 0xf0) >> 2)) != 0)",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # capturing before the first request
        try:
            requests, errors, _, p50, p99, _, _ = _load(
                Target("t", url, headers, None), body, 1, duration, _wrk.available(), DRIVER_CPUS or None
            )
        finally:
            time.sleep(1.5)  # tcpdump reads its buffer about once a second: let it read the last segments
            capture.terminate()
            _, err = capture.communicate()
        drops = re.search(r"(\d+) packets? dropped by kernel", err or "")
        if errors:
            raise RuntimeError(f"{errors} errors against {url}")
        text = subprocess.run(
            ["tcpdump", "-r", str(pcap), "-n", "-tt"], capture_output=True, text=True, check=True
        ).stdout
    latencies, turns = _exchanges(text, port)
    return Run(latencies, turns, requests, p50, p99, int(drops.group(1)) if drops else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 s per target, one round")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.duration, args.rounds = 1.0, 1
    why_not = capture_available()
    if why_not is not None:
        print(f"# wire latency: not measured: {why_not}")
        return 0
    driver, proxy = DRIVER_CPUS or None, PROXY_CPUS or None
    print(f"# wire latency: json-small, concurrency 1, {args.duration:g} s x {args.rounds} round(s); {pin_note(True)}")
    procs: list[Proc] = []
    stops = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-wire-"))
    try:
        upstream = fake_upstream.start_process(cpus=driver)
        procs.append(upstream)
        base = upstream.match.group(1)
        urls: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {"direct": (base + "/v1/chat/completions", ())}
        cp = start_control_plane(cpus=driver)
        stops.append(cp.stop)
        admin = Admin(cp.address, cp.admin_token)
        try:
            _, token = admin.setup(base, [MODEL])
        finally:
            admin.close()
        for name in ("sidecar", "sidecar-noreports"):
            extra = ("--no-outcome-reports",) if name == "sidecar-noreports" else ()
            sidecar = start_sidecar(cp, cpus=proxy, extra_args=extra)
            procs.append(sidecar)
            urls[name] = (sidecar.match.group(1) + "/v1/chat/completions", (("Authorization", f"Bearer {token}"),))
        ideal = Proc.start(
            [sys.executable, "-m", "bench.ideal_proxy", "--upstream", base, "--port", "0"],
            ready=r"listening on (http://\S+)/v1",
            cpus=proxy,
        )
        procs.append(ideal)
        urls["ideal"] = (ideal.match.group(1) + "/v1/chat/completions", ())
        for url, headers in urls.values():  # warm up: connections, pools
            measure(url, _port(url), headers, 1.0)
        closed_loop = _closed_loop.build(workdir)
        if closed_loop is None:
            print("# no C compiler: the closed-loop C client's columns are left out")
        rows: dict[str, list[tuple[float, ...]]] = {t: [] for t in TARGETS}
        incomplete = 0
        for round_no in range(args.rounds):
            order = TARGETS[round_no % len(TARGETS) :] + TARGETS[: round_no % len(TARGETS)]
            for name in order:
                url, headers = urls[name]
                port = _port(url)
                run = measure(url, port, headers, args.duration)
                w50, w99 = _percentile(run.wire_ms, 50), _percentile(run.wire_ms, 99)
                c50 = c99 = float("nan")
                if closed_loop is not None:
                    c = _closed_loop.run(closed_loop, port, _request_bytes(port, headers), args.duration, driver)
                    c50, c99 = c.p50_ms, c.p99_ms
                rows[name].append((w50, w99, run.p50_ms, run.p99_ms, c50, c99))
                incomplete += 0 if run.complete else 1
                print(
                    f"r{round_no} {name:18} {len(run.wire_ms):6d} of {run.requests:6d} requests timed"
                    f" ({run.dropped} segments dropped)  wire p50 {w50:.3f} p99 {w99:.3f} ms"
                    f"  | load generator p50 {run.p50_ms:.3f} p99 {run.p99_ms:.3f} ms,"
                    f" its turnaround p99 {_percentile(run.turnaround_ms, 99):.3f} ms"
                    f"  | C client p50 {c50:.3f} p99 {c99:.3f} ms",
                    flush=True,
                )
    finally:
        for stop in stops:
            stop()
        for proc in procs:
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(
        "| target | wire p50 ms | wire p99 ms | added wire p50 | added wire p99 | load gen. p50 | load gen. p99 "
        "| added load gen. p99 | C client p50 | C client p99 | added C client p99 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    direct = rows["direct"]
    for name in TARGETS:
        runs = rows[name]

        def median(i: int, runs: list[tuple[float, ...]] = runs) -> str:
            return f"{statistics.median(r[i] for r in runs):.3f}"

        def added(i: int, runs: list[tuple[float, ...]] = runs, name: str = name) -> str:
            if name == "direct":
                return "-"
            return f"{statistics.median(r[i] - d[i] for r, d in zip(runs, direct, strict=True)):+.3f}"

        print(
            f"| {name} | {median(0)} | {median(1)} | {added(0)} | {added(1)} | {median(2)} | {median(3)} "
            f"| {added(3)} | {median(4)} | {median(5)} | {added(5)} |"
        )
    if incomplete:
        print(
            f"\nWARNING: {incomplete} run(s) did not time every request (capture incomplete); their tails are suspect"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
