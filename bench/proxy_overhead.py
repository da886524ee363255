"""Proxy overhead: the same request mix, side by side, against
(a) the fake upstream directly, (b) a keyplane sidecar (real control plane +
sidecar processes started through the ``keyplane`` CLI), (c) the ideal
pass-through proxy, (d) LiteLLM proxy (installed into bench/.venv-litellm).

Mixes: non-streaming and streaming, small (~100 B prompt, 64 B answer) and
8 KB (8 KB prompt, 8 KB answer); concurrency 1, 32 and 128; a fixed duration
per case; targets alternate within every case and the order rotates each
round. Load generator: wrk (one thread) when installed, else bench.loadgen
(uvloop + httptools, separate processes). Time to first streamed byte and the
inter-chunk timing through each target come from bench.loadgen at
concurrency 1 (its own cost is the same for every target and cancels out).

Everything is reported against the baselines measured in the same run:
added latency = target - direct; CPU per request of each proxy process (from
/proc/<pid>/stat) against the ideal proxy's; throughput against the ideal's.

    python -m bench.proxy_overhead                 # full run (minutes; installs LiteLLM on first use)
    python -m bench.proxy_overhead --smoke         # ~10 s, no LiteLLM, no thresholds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import _wrk, fake_upstream, loadgen
from bench._keyplane import Admin, start_control_plane, start_sidecar
from bench._overhead_report import (
    GAP_MS,
    STREAM_CHUNKS,
    CaseResult,
    ChunkResult,
    ProbeResult,
    Report,
    render,
)
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds, pin_note, repo_root

MODEL = "bench-model"
GAP_MODEL = f"bench-model-gap-{GAP_MS}"
LITELLM_VENV = repo_root() / "bench" / ".venv-litellm"
LITELLM_MASTER_KEY = "sk-litellm-bench-master"


@dataclass(frozen=True, slots=True)
class Mix:
    name: str
    stream: bool
    prompt: int
    answer: int

    def body(self, model: str = MODEL) -> bytes:
        payload = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a benchmark."},
                {"role": "user", "content": ("x" * self.prompt)},
            ],
            "max_tokens": self.answer,
            "stream": self.stream,
        }
        return json.dumps(payload, separators=(",", ":")).encode()


MIXES = (
    Mix("json-small", False, 100, 64),
    Mix("json-8k", False, 8192, 8192),
    Mix("sse-small", True, 100, 64),
    Mix("sse-8k", True, 8192, 8192),
)


@dataclass
class Target:
    name: str
    url: str
    headers: tuple[tuple[str, str], ...]
    # The process charged with the CPU (None: nothing in between).
    proc: Proc | None


# --- LiteLLM ------------------------------------------------------------------------


def ensure_litellm(venv: Path = LITELLM_VENV) -> Path:
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing litellm[proxy] into {venv} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    subprocess.run([pip, "install", "-q", "--disable-pip-version-check", "litellm[proxy]"], check=True)
    return exe


def start_litellm(upstream: str, cpus: frozenset[int] | None, workdir: Path) -> Proc:
    exe = ensure_litellm()
    config = workdir / "litellm.yaml"
    models = "".join(
        f"  - model_name: {name}\n"
        f"    litellm_params:\n"
        f"      model: openai/{name}\n"
        f"      api_base: {upstream}/v1\n"
        f"      api_key: sk-bench-upstream\n"
        for name in (MODEL, GAP_MODEL)
    )
    config.write_text(f"model_list:\n{models}general_settings:\n  master_key: {LITELLM_MASTER_KEY}\n")
    port = _free_port()
    env = dict(os.environ)
    env.update({"LITELLM_MASTER_KEY": LITELLM_MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    env.pop("DATABASE_URL", None)
    proc = Proc.start(
        [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        ready=None,
        cpus=cpus,
        env=env,
        cwd=workdir,
    )
    _wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=180)
    proc.match = __import__("re").match(r"(.*)", f"http://127.0.0.1:{port}")
    return proc


def _free_port() -> int:
    from bench.fake_upstream import bind

    sock = bind("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _wait_http(url: str, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{url}: process exited:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{proc.log_tail()}")


# --- measurement -------------------------------------------------------------------


def _load(
    target: Target, body: bytes, concurrency: int, duration: float, use_wrk: bool, driver: frozenset[int] | None
) -> tuple[int, int, float, float, float, float, str]:
    """(requests, errors, elapsed, p50, p99, load generator CPU s, name)."""
    if use_wrk:
        result = _wrk.run_wrk(target.url, body, target.headers, concurrency=concurrency, duration=duration, cpus=driver)
        return (
            result.requests,
            result.errors,
            result.elapsed,
            result.p50_ms,
            result.p99_ms,
            result.cpu_seconds,
            "wrk -t1",
        )
    procs = 1 if concurrency <= 8 else 2
    stats = loadgen.run_load(
        loadgen.LoadSpec(
            url=target.url,
            body=body,
            concurrency=concurrency,
            duration=duration,
            headers=target.headers,
            procs=procs,
            cpus=driver,
        )
    )
    return (
        stats.requests,
        stats.errors,
        stats.elapsed,
        loadgen.percentile(stats.latency_ms, 50),
        loadgen.percentile(stats.latency_ms, 99),
        stats.cpu_seconds,
        stats.load_generator,
    )


def run_case(
    target: Target,
    upstream: Proc,
    mix: Mix,
    concurrency: int,
    duration: float,
    round_no: int,
    *,
    use_wrk: bool,
    driver: frozenset[int] | None,
) -> CaseResult:
    pid = target.proc.pid if target.proc is not None else None
    proxy_before = cpu_seconds(pid) if pid is not None else 0.0
    upstream_before = cpu_seconds(upstream.pid)
    requests, errors, elapsed, p50, p99, gen_cpu, gen_name = _load(
        target, mix.body(), concurrency, duration, use_wrk, driver
    )
    upstream_used = cpu_seconds(upstream.pid) - upstream_before
    proxy_used = cpu_seconds(pid) - proxy_before if pid is not None else None
    ok = max(requests - errors, 1)
    driver_cores = max(len(driver or ()), 1)
    return CaseResult(
        round=round_no,
        mix=mix.name,
        concurrency=concurrency,
        target=target.name,
        requests=requests,
        errors=errors,
        rps=ok / elapsed if elapsed else 0.0,
        p50_ms=p50,
        p99_ms=p99,
        cpu_ms_per_request=1000 * proxy_used / ok if proxy_used is not None else None,
        upstream_cpu_ms_per_request=1000 * upstream_used / ok,
        proxy_core_busy=proxy_used / elapsed if proxy_used is not None and elapsed else None,
        driver_core_busy=(upstream_used + gen_cpu) / elapsed / driver_cores if elapsed else 0.0,
        load_generator=gen_name,
    )


def run_probe(target: Target, mix: Mix, duration: float, round_no: int, driver: frozenset[int] | None) -> ProbeResult:
    stats = loadgen.run_load(
        loadgen.LoadSpec(
            url=target.url, body=mix.body(), concurrency=1, duration=duration, headers=target.headers, cpus=driver
        )
    )
    if stats.errors:
        raise RuntimeError(f"{target.name}: {stats.errors} errors in the TTFB probe ({stats.statuses})")
    return ProbeResult(
        round=round_no,
        mix=mix.name,
        target=target.name,
        ttfb_p50_ms=loadgen.percentile(stats.ttfb_ms, 50),
        ttfb_p99_ms=loadgen.percentile(stats.ttfb_ms, 99),
        latency_p50_ms=loadgen.percentile(stats.latency_ms, 50),
    )


def run_chunks(target: Target, requests: int, driver: frozenset[int] | None) -> ChunkResult:
    body = Mix("gap", True, 100, 8 * STREAM_CHUNKS).body(GAP_MODEL)
    stats = loadgen.run_load(
        loadgen.LoadSpec(
            url=target.url,
            body=body,
            concurrency=1,
            requests=requests,
            headers=target.headers,
            chunk_times=True,
            cpus=driver,
        )
    )
    if stats.errors:
        raise RuntimeError(f"{target.name}: {stats.errors} errors in the chunk probe ({stats.statuses})")
    gaps: list[float] = []
    for arrivals in stats.chunk_ms:
        previous = 0.0
        for t in arrivals:
            gaps.append(t - previous)
            previous = t
    # Only the gaps the upstream made (reads split by the kernel come ~0 ms apart).
    spaced = [g for g in gaps if g > GAP_MS / 4] or [0.0]
    return ChunkResult(
        target=target.name,
        requests=len(stats.chunk_ms),
        gap_mean_ms=statistics.fmean(spaced),
        gap_min_ms=min(spaced),
        gap_max_ms=max(spaced),
        reads_per_stream=statistics.fmean(len(a) + 1 for a in stats.chunk_ms),
        last_chunk_ms=statistics.fmean(a[-1] if a else 0.0 for a in stats.chunk_ms),
    )


# --- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, no LiteLLM, no thresholds")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--mixes", nargs="+", default=[m.name for m in MIXES], choices=[m.name for m in MIXES])
    parser.add_argument("--targets", nargs="+", default=["direct", "sidecar", "ideal", "litellm"])
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--no-pin", action="store_true", help="let the OS schedule every process")
    parser.add_argument("--probe-seconds", type=float, default=3.0, help="TTFB probe per target and round")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument(
        "--compare-src",
        type=Path,
        help="also run a second sidecar (target 'sidecar-b') from this source tree, e.g. a candidate fix",
    )
    parser.add_argument("--render", type=Path, help="print the tables of an earlier --json file and exit")
    args = parser.parse_args(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text())
        print(
            render(
                Report(
                    data["machine"],
                    data["settings"],
                    [CaseResult(**c) for c in data["cases"]],
                    [ProbeResult(**p) for p in data["probes"]],
                    [ChunkResult(**c) for c in data["chunks"]],
                )
            )
        )
        return 0
    if args.smoke:
        args.duration, args.rounds, args.concurrency = 1.0, 1, [1, 8]
        args.mixes = ["json-small", "sse-small"]
        args.targets = [t for t in args.targets if t != "litellm"]
        args.probe_seconds = 0.5
    use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and _wrk.available())
    proxy_cpus = None if args.no_pin else PROXY_CPUS or None
    driver_cpus = None if args.no_pin else DRIVER_CPUS or None
    mixes = [m for m in MIXES if m.name in args.mixes]
    report = Report(
        machine={
            "nproc": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "python": sys.version.split()[0],
        },
        settings={
            "duration_s": args.duration,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "load_generator": "wrk -t1" if use_wrk else "bench.loadgen",
            "pinning": pin_note(not args.no_pin),
        },
    )
    print(f"# proxy overhead ({'smoke' if args.smoke else 'full'}); {report.settings['pinning']}", flush=True)
    procs: list[Proc] = []
    cleanups: list[Callable[[], None]] = []
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        upstream = fake_upstream.start_process("--chunks", str(STREAM_CHUNKS), cpus=driver_cpus)
        procs.append(upstream)
        base = upstream.match.group(1)
        targets: list[Target] = [Target("direct", base + "/v1/chat/completions", (), None)]
        sidecars = [name for name in ("sidecar", "sidecar-noreports") if name in args.targets]
        if sidecars:
            cp = start_control_plane(cpus=driver_cpus)
            cleanups.append(cp.stop)
            admin = Admin(cp.address, cp.admin_token)
            try:
                _, token = admin.setup(base, [MODEL, GAP_MODEL])
            finally:
                admin.close()
            for name in sidecars:
                # sidecar-noreports: the same sidecar without outcome reports, so the
                # control plane's ingest (on the driver core here) is out of the picture.
                extra = ("--no-outcome-reports",) if name == "sidecar-noreports" else ()
                sidecar = start_sidecar(cp, cpus=proxy_cpus, extra_args=extra)
                procs.append(sidecar)
                targets.append(
                    Target(
                        name,
                        sidecar.match.group(1) + "/v1/chat/completions",
                        (("Authorization", f"Bearer {token}"),),
                        sidecar,
                    )
                )
        if args.compare_src is not None:
            cp_b = start_control_plane(cpus=driver_cpus, src=args.compare_src.resolve())
            cleanups.append(cp_b.stop)
            admin = Admin(cp_b.address, cp_b.admin_token)
            try:
                _, token_b = admin.setup(base, [MODEL, GAP_MODEL])
            finally:
                admin.close()
            sidecar_b = start_sidecar(cp_b, cpus=proxy_cpus)
            procs.append(sidecar_b)
            targets.append(
                Target(
                    "sidecar-b",
                    sidecar_b.match.group(1) + "/v1/chat/completions",
                    (("Authorization", f"Bearer {token_b}"),),
                    sidecar_b,
                )
            )
        if "ideal" in args.targets:
            ideal = Proc.start(
                [sys.executable, "-m", "bench.ideal_proxy", "--upstream", base, "--port", "0"],
                ready=r"listening on (http://\S+)/v1",
                cpus=proxy_cpus,
            )
            procs.append(ideal)
            targets.append(Target("ideal", ideal.match.group(1) + "/v1/chat/completions", (), ideal))
        if "litellm" in args.targets:
            litellm = start_litellm(base, proxy_cpus, workdir)
            procs.append(litellm)
            targets.append(
                Target(
                    "litellm",
                    litellm.match.group(1) + "/v1/chat/completions",
                    (("Authorization", f"Bearer {LITELLM_MASTER_KEY}"),),
                    litellm,
                )
            )
        print(f"targets: {', '.join(t.name for t in targets)}; load generator: {report.settings['load_generator']}")
        # Warm up: connections, pools, caches.
        for target in targets:
            for mix in mixes:
                stats = loadgen.run_load(
                    loadgen.LoadSpec(
                        url=target.url, body=mix.body(), concurrency=8, requests=64, headers=target.headers
                    )
                )
                if stats.errors:
                    raise RuntimeError(f"{target.name} failed the warm-up: {stats.statuses}")
        total = len(targets) * len(mixes) * len(args.concurrency) * args.rounds
        done = 0
        for round_no in range(args.rounds):
            for conc in args.concurrency:
                for mix in mixes:
                    shift = (round_no + done) % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        case = run_case(
                            target,
                            upstream,
                            mix,
                            conc,
                            args.duration,
                            round_no,
                            use_wrk=use_wrk,
                            driver=driver_cpus,
                        )
                        report.cases.append(case)
                        done += 1
                        cpu = f"{case.cpu_ms_per_request:.3f}" if case.cpu_ms_per_request is not None else "-"
                        print(
                            f"[{done}/{total}] r{round_no} {mix.name:10s} c={conc:<3d} {target.name:8s} "
                            f"{case.rps:8.0f} req/s p50 {case.p50_ms:8.3f} p99 {case.p99_ms:8.3f} ms "
                            f"cpu {cpu} ms/req errors {case.errors}",
                            flush=True,
                        )
            for mix in (m for m in mixes if m.stream):
                for target in targets:
                    report.probes.append(run_probe(target, mix, args.probe_seconds, round_no, driver_cpus))
        for target in targets:
            report.chunks.append(run_chunks(target, 3 if args.smoke else 20, driver_cpus))
    finally:
        for proc in reversed(procs):
            proc.stop()
        for cleanup in cleanups:
            cleanup()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
