"""Sidecar CPU per request against the number of keys a route's provider has.

Key selection should touch only the keys a request tries, so the sidecar's CPU
per request at 100 and 1,000 keys should stay within 10% of the 1-key figure.
The same run also measures what the opt-in access log (``--access-log``) costs
and the default log level against ``--log-level warning``.

- Processes: the fake upstream; per source tree and key count N, a
  ``keyplane control-plane`` (SQLite) holding tenant ``bench`` with N
  ``openai_compatible`` keys of weight 1 on the fake upstream and one route to
  them, and a ``keyplane sidecar`` on it at the default log level (as shipped:
  outcome reports on). At N = 1 two more sidecars of this checkout on the same
  control plane: ``--access-log FILE`` (a file in the control plane's
  temporary home) and ``--log-level warning``.
- ``--compare-src DIR`` (or ``--compare-commit REV``: a ``git archive`` of REV
  into a temporary directory) adds the same sidecars of another tree, e.g. the
  code before the change, measured in the same run (``KEYPLANE_BENCH_SRC``
  replaces this checkout as the first tree).
- Load: bench.loadgen, closed loop, non-streaming small requests (~100 B
  prompt, 64 B answer), one sidecar at a time, the order rotated each round;
  CPU per request of the sidecar process from /proc/<pid>/stat. Sidecars
  pinned to the proxy core, everything else to the driver core(s).

Prints, per sidecar and N, requests/s and CPU ms per request (median over
rounds) and the ratio to the same tree's 1-key figure.

    python -m bench.key_scaling [--compare-commit 8e43e6b] [--rounds 3] [--duration 4]
    python -m bench.key_scaling --smoke            # N = 1 and 100, one short round
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import fake_upstream, loadgen
from bench._keyplane import Admin, keyplane_src, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds, pin_note, repo_root

MODEL = "bench-model"
TARGET = 0.10  # CPU per request at 1,000 keys within 10% of 1 key
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are a benchmark."}, {"role": "user", "content": "x" * 100}],
        "max_tokens": 64,
    },
    separators=(",", ":"),
).encode()


@dataclass
class Case:
    name: str  # "sidecar", "sidecar +access-log", "base", ...
    tree: str  # "this" or "compare"
    keys: int
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    proc: Proc | None = field(default=None, repr=False)
    cpu_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0


def git_archive(rev: str) -> Path:
    """``git archive`` of ``rev`` of this repository into a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-src-{rev[:12]}-"))
    archive = subprocess.run(["git", "-C", str(repo_root()), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def measure(case: Case, duration: float, concurrency: int, driver: frozenset[int] | None) -> None:
    assert case.proc is not None
    before = cpu_seconds(case.proc.pid)
    stats = loadgen.run_load(
        loadgen.LoadSpec(
            url=case.url, body=BODY, concurrency=concurrency, duration=duration, headers=case.headers, cpus=driver
        )
    )
    used = cpu_seconds(case.proc.pid) - before
    case.errors += stats.errors
    if stats.requests:
        case.cpu_ms.append(used * 1000 / stats.requests)
        case.rps.append(stats.requests / stats.elapsed if stats.elapsed else 0.0)


def render(cases: Sequence[Case]) -> str:
    base: dict[str, float] = {}
    for case in cases:
        if case.keys == 1 and case.name in ("sidecar", "compare") and case.cpu_ms:
            base[case.tree] = statistics.median(case.cpu_ms)
    lines = [
        "| sidecar | keys | requests/s | CPU ms/request | vs the same sidecar at 1 key | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        if not case.cpu_ms:
            continue
        cpu = statistics.median(case.cpu_ms)
        ratio = f"{cpu / base[case.tree]:.2f}x" if case.tree in base else "-"
        lines.append(
            f"| {case.name} | {case.keys} | {statistics.median(case.rps):.0f} | {cpu:.3f} | {ratio} | {case.errors} |"
        )
    lines.append("(median over rounds)")
    ours = {c.keys: statistics.median(c.cpu_ms) for c in cases if c.name == "sidecar" and c.cpu_ms}
    if 1 in ours and len(ours) > 1:
        most = max(ours)
        growth = ours[most] / ours[1] - 1
        verdict = "met" if growth <= TARGET else "missed"
        lines.append(f"target (CPU/request at {most} keys within {TARGET:.0%} of 1 key): {growth:+.1%}, {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="N = 1 and 100, one short round")
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 100, 1000], help="key counts (1 is always added)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per sidecar and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--compare-src", type=Path, help="also measure the sidecar of this source tree")
    parser.add_argument("--compare-commit", help="also measure this commit's sidecar (git archive into a temp dir)")
    parser.add_argument("--no-pin", action="store_true", help="let the OS schedule every process")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.keys, args.duration, args.rounds, args.concurrency = [1, 100], 0.5, 1, 4
    counts = sorted({1, *args.keys})
    proxy_cpus = None if args.no_pin else PROXY_CPUS or None
    driver_cpus = None if args.no_pin else DRIVER_CPUS or None
    cleanups: list[Callable[[], None]] = []
    compare_src = args.compare_src.resolve() if args.compare_src is not None else None
    if args.compare_commit:
        compare_src = git_archive(args.compare_commit)
        cleanups.append(lambda: shutil.rmtree(compare_src, ignore_errors=True))
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if compare_src is not None:
        trees.append(("compare", compare_src))
    print(
        f"# key scaling ({'smoke' if args.smoke else 'full'}): keys {counts}, {args.duration:.1f} s x {args.rounds} "
        f"round(s), concurrency {args.concurrency}; this tree {keyplane_src()}"
        f"{f', compare {compare_src}' if compare_src else ''}; {pin_note(not args.no_pin)}",
        flush=True,
    )
    procs: list[Proc] = []
    cases: list[Case] = []
    try:
        upstream = fake_upstream.start_process(cpus=driver_cpus)
        procs.append(upstream)
        base_url = upstream.match.group(1)
        for tree, src in trees:
            for n in counts:
                cp = start_control_plane(cpus=driver_cpus, src=src)
                cleanups.append(cp.stop)
                admin = Admin(cp.address, cp.admin_token)
                try:
                    _, token = admin.setup(base_url, [MODEL], keys=n)
                finally:
                    admin.close()
                variants: list[tuple[str, tuple[str, ...]]] = [("sidecar" if tree == "this" else "compare", ())]
                if tree == "this" and n == 1:
                    # To a file: this harness's stdout pipe reader is no collector to measure.
                    variants += [("sidecar --access-log FILE", ("--access-log", str(cp.home / "access.jsonl")))]
                    variants += [("sidecar --log-level warning", ("--log-level", "warning"))]
                for name, extra in variants:
                    sidecar = start_sidecar(cp, cpus=proxy_cpus, extra_args=extra)
                    procs.append(sidecar)
                    case = Case(name, tree, n, sidecar.match.group(1) + "/v1/chat/completions")
                    case.headers, case.proc = (("Authorization", f"Bearer {token}"),), sidecar
                    cases.append(case)
        for case in cases:  # warm up: connections, pools, the key schedule
            stats = loadgen.run_load(
                loadgen.LoadSpec(url=case.url, body=BODY, concurrency=8, requests=128, headers=case.headers)
            )
            if stats.errors:
                raise RuntimeError(f"{case.name} ({case.keys} keys) failed the warm-up: {stats.statuses}")
        for round_no in range(args.rounds):
            shift = round_no % len(cases)
            for case in cases[shift:] + cases[:shift]:
                measure(case, args.duration, args.concurrency, driver_cpus)
                print(
                    f"[r{round_no}] {case.name:28s} {case.keys:5d} keys {case.rps[-1]:7.0f} req/s "
                    f"cpu {case.cpu_ms[-1]:.3f} ms/req",
                    flush=True,
                )
    finally:
        for proc in reversed(procs):
            proc.stop()
        for cleanup in reversed(cleanups):
            cleanup()
    print()
    print(render(cases))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"name": c.name, "tree": c.tree, "keys": c.keys, "cpu_ms": c.cpu_ms, "rps": c.rps, "errors": c.errors}
            for c in cases
        ]
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cases": rows}, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
