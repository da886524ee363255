"""The shared A/B of a sidecar feature: the same fake upstream and control plane,
two ``keyplane sidecar`` processes on the same core(s), one with the feature and
one without (a flag), loaded alternately per mix for ``--duration`` seconds,
``--rounds`` times with the order rotating; each one's CPU seconds (from
/proc/<pid>/stat) per request, and on/off as a ratio. Used by
``bench.usage_overhead`` and ``bench.limits_overhead``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench import fake_upstream, loadgen
from bench._keyplane import Admin, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds, pin_note

__all__ = ["MODEL", "Case", "FeatureAB", "chat_body", "run"]

MODEL = "bench-model"


def chat_body(stream: bool, *, usage_asked: bool = False) -> bytes:
    """A small chat request (100 characters in, 64 tokens out at most)."""
    payload: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * 100}],
        "max_tokens": 64,
    }
    if stream:
        payload["stream"] = True
    if usage_asked:
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Case:
    mix: str
    on: bool
    url: str
    body: bytes
    proc: Proc
    headers: tuple[tuple[str, str], ...]
    cpu_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureAB:
    """What one A/B compares: the feature's name, the sidecar flag that turns it
    off, the request mixes, and set-up done through the admin API before the
    sidecars start (``configure``) and how long to let them settle."""

    name: str
    off_flag: str
    mixes: Sequence[tuple[str, bytes]]
    configure: Callable[[Admin], None] = lambda admin: None
    settle: float = 0.0


def measure(case: Case, duration: float, concurrency: int, driver: frozenset[int] | None) -> None:
    before = cpu_seconds(case.proc.pid)
    stats = loadgen.run_load(
        loadgen.LoadSpec(
            url=case.url,
            body=case.body,
            concurrency=concurrency,
            duration=duration,
            headers=case.headers,
            cpus=driver,
        )
    )
    used = cpu_seconds(case.proc.pid) - before
    case.errors += stats.errors
    for status, count in stats.statuses.items():
        case.statuses[status] = case.statuses.get(status, 0) + count
    if stats.requests:
        case.cpu_ms.append(1000 * used / stats.requests)
        case.rps.append(stats.requests / stats.elapsed)


def _arguments(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.duration, args.rounds = 1.0, 1
    return args


def run(ab: FeatureAB, doc: str | None, argv: list[str] | None = None) -> int:
    """The whole A/B: processes, warm-up, rounds, the table; exit status 1 on errors."""
    args = _arguments(doc, argv)
    driver = None if args.no_pin else DRIVER_CPUS or None
    proxy = None if args.no_pin else PROXY_CPUS or None
    print(
        f"# {ab.name} A/B ({'smoke' if args.smoke else 'full'}): {args.rounds} round(s) x "
        f"{args.duration:.1f} s, concurrency {args.concurrency}; {pin_note(not args.no_pin)}",
        flush=True,
    )
    procs: list[Proc] = []
    cases: list[Case] = []
    cp = None
    try:
        upstream = fake_upstream.start_process(cpus=driver)
        procs.append(upstream)
        cp = start_control_plane(cpus=driver)
        admin = Admin(cp.address, cp.admin_token)
        try:
            _, token = admin.setup(upstream.match.group(1), [MODEL])
            ab.configure(admin)
        finally:
            admin.close()
        headers = (("Authorization", f"Bearer {token}"),)
        sidecars = {
            True: start_sidecar(cp, cpus=proxy),
            False: start_sidecar(cp, cpus=proxy, extra_args=(ab.off_flag,)),
        }
        procs += sidecars.values()
        time.sleep(ab.settle)
        for mix, body in ab.mixes:
            for on, proc in sidecars.items():
                cases.append(Case(mix, on, proc.match.group(1) + "/v1/chat/completions", body, proc, headers))
        for case in cases:  # warm-up: connections, pools
            stats = loadgen.run_load(
                loadgen.LoadSpec(url=case.url, body=case.body, concurrency=8, requests=256, headers=case.headers)
            )
            if stats.errors:
                raise RuntimeError(f"{case.mix} failed the warm-up: {stats.statuses}")
        for round_no in range(args.rounds):
            shift = round_no % len(cases)
            for case in cases[shift:] + cases[:shift]:
                measure(case, args.duration, args.concurrency, driver)
                print(
                    f"[r{round_no}] {case.mix:28s} {ab.name} {'on ' if case.on else 'off'} "
                    f"{case.rps[-1]:7.0f} req/s  cpu {case.cpu_ms[-1]:.3f} ms/req",
                    flush=True,
                )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if cp is not None:
            cp.stop()
    return _report(ab, cases, args.rounds)


def _report(ab: FeatureAB, cases: list[Case], rounds: int) -> int:
    print()
    print(f"| mix | {ab.name} off: CPU ms/req | on: CPU ms/req | on/off | req/s off | req/s on |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for mix in dict.fromkeys(c.mix for c in cases):
        case_off = next(c for c in cases if c.mix == mix and not c.on)
        case_on = next(c for c in cases if c.mix == mix and c.on)
        cpu_off, cpu_on = statistics.median(case_off.cpu_ms), statistics.median(case_on.cpu_ms)
        ratio = cpu_on / cpu_off
        worst = max(worst, ratio)
        print(
            f"| {mix} | {cpu_off:.3f} | {cpu_on:.3f} | {ratio:.3f} | {statistics.median(case_off.rps):.0f} "
            f"| {statistics.median(case_on.rps):.0f} |"
        )
    errors = sum(c.errors for c in cases)
    print(f"\nworst on/off CPU ratio {worst:.3f} (medians of {rounds} round(s)); errors {errors}")
    for case in cases:
        if case.errors:
            print(f"  {case.mix}, {ab.name} {'on' if case.on else 'off'}: {case.errors} errors {case.statuses}")
    return 1 if errors else 0
