"""Limits A/B: the sidecar's CPU per request with limits on and off, same run.

One control plane, one fake upstream, and two ``keyplane sidecar`` processes on
the same core(s): one as shipped, leasing quota for the client key's limits
(requests and tokens per minute, and the tenant's requests per minute: three
buckets checked per request, tokens charged after each answer, usage reported
and leases applied in the background), one with ``--no-limits``. The limits are
far above the load, so every request is admitted by both: the figure is the
cost of enforcing, not of refusing. For each mix the two are loaded alternately
for ``--duration`` seconds, ``--rounds`` times, order rotating; each sidecar's
CPU seconds (from /proc/<pid>/stat) per request, and on/off as a ratio (the
issue asks within 10%).

    python -m bench.limits_overhead                 # 3 rounds x 5 s per case
    python -m bench.limits_overhead --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

from bench import fake_upstream, loadgen
from bench._keyplane import TENANT, Admin, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc, cpu_seconds, pin_note
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import limits_pb2 as lpb

MODEL = "bench-model"


def _body(stream: bool) -> bytes:
    payload: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * 100}],
        "max_tokens": 64,
    }
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


def set_limits(admin: Admin) -> None:
    """Limits far above the load on the client key (requests and tokens) and the tenant (requests)."""
    md = admin.metadata
    [client_key] = admin.stub.ListClientKeys(
        admin_pb2.ListClientKeysRequest(tenant=TENANT), metadata=md, timeout=30
    ).client_keys
    for limits in (
        lpb.Limits(tenant=TENANT, client_key_id=client_key.id, requests_per_minute=10**9, tokens_per_minute=10**12),
        lpb.Limits(tenant=TENANT, requests_per_minute=10**9),
    ):
        admin.stub.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=md, timeout=30)


@dataclass
class Case:
    mix: str
    limits: bool
    url: str
    body: bytes
    proc: Proc
    headers: tuple[tuple[str, str], ...]
    cpu_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0


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
    if stats.requests:
        case.cpu_ms.append(1000 * used / stats.requests)
        case.rps.append(stats.requests / stats.elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.duration, args.rounds = 1.0, 1
    driver = None if args.no_pin else DRIVER_CPUS or None
    proxy = None if args.no_pin else PROXY_CPUS or None
    print(
        f"# limits A/B ({'smoke' if args.smoke else 'full'}): {args.rounds} round(s) x "
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
            set_limits(admin)
        finally:
            admin.close()
        headers = (("Authorization", f"Bearer {token}"),)
        sidecars = {
            True: start_sidecar(cp, cpus=proxy),
            False: start_sidecar(cp, cpus=proxy, extra_args=("--no-limits",)),
        }
        procs += sidecars.values()
        time.sleep(2.0)  # the first leases (one rebalance)
        for mix, body in (("json", _body(False)), ("sse", _body(True))):
            for on, proc in sidecars.items():
                url = proc.match.group(1) + "/v1/chat/completions"
                cases.append(Case(mix, on, url, body, proc, headers))
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
                    f"[r{round_no}] {case.mix:6s} limits {'on ' if case.limits else 'off'} "
                    f"{case.rps[-1]:7.0f} req/s  cpu {case.cpu_ms[-1]:.3f} ms/req",
                    flush=True,
                )
    finally:
        for proc in reversed(procs):
            proc.stop()
        if cp is not None:
            cp.stop()
    print()
    print("| mix | limits off: CPU ms/req | on: CPU ms/req | on/off | req/s off | req/s on |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for mix in dict.fromkeys(c.mix for c in cases):
        case_off = next(c for c in cases if c.mix == mix and not c.limits)
        case_on = next(c for c in cases if c.mix == mix and c.limits)
        cpu_off, cpu_on = statistics.median(case_off.cpu_ms), statistics.median(case_on.cpu_ms)
        ratio = cpu_on / cpu_off
        worst = max(worst, ratio)
        print(
            f"| {mix} | {cpu_off:.3f} | {cpu_on:.3f} | {ratio:.3f} | {statistics.median(case_off.rps):.0f} "
            f"| {statistics.median(case_on.rps):.0f} |"
        )
    errors = sum(c.errors for c in cases)
    print(f"\nworst on/off CPU ratio {worst:.3f} (medians of {args.rounds} round(s)); errors {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
