"""What outcome reporting costs the requests a sidecar is serving: event-loop stalls.

The sidecar's outcome reporter shares the event loop with the requests it
serves, so whatever it spends at once (building a batch, writing it to the
control plane) a request in flight waits for. At concurrency 1 that is where
the p99 goes; the proxy benchmark sees it only through a lot of noise. This
measures it directly:

- a real control plane (``keyplane control-plane``, its own process, pinned
  with the driver) and, in a child process pinned to the sidecar's core, the
  real ``OutcomeReporter`` on uvloop with its gRPC stream to it;
- a request stand-in, back to back: each "request" spins the CPU for
  ``--work-us`` (a proxied request at concurrency 1 costs the sidecar about
  0.3 ms), queues one attempt record (``enqueue_record``, as the sidecar
  does) and yields to the loop; whatever else is ready then runs (the batch
  timer, the gRPC write), and the time that loop turn takes is the stall the
  next request meets. (A stand-in that slept between requests would let the
  reporter run unseen in the gaps: libuv timers tick in milliseconds.)
- variants, alternating over rounds: ``off`` (nothing reported),
  ``on`` (this checkout's reporter), and ``compare`` (``--compare-src``: the
  reporter of another tree, e.g. ``git archive`` of an older commit).

Prints loop-turn stall p50/p99/p99.9/max per variant, the request-path cost of
``enqueue_record`` per outcome, and how many outcomes reached the control plane.

    python -m bench.reporter_lag [--work-us 300] [--seconds 8] [--rounds 3] [--compare-src DIR]
    python -m bench.reporter_lag --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "bench-model"


# --- the child: one variant -------------------------------------------------------


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from keyplane.domain import Provider
    from keyplane.health.classify import classify_response
    from sidecar.config import SidecarConfig
    from sidecar.model import Key, Target
    from sidecar.proxy import AttemptRecord
    from sidecar.reporter import OutcomeReporter
    from sidecar.router import Attempt
    from sidecar.watch import open_channel

    reporting = args.variant != "off"
    config = SidecarConfig(control_plane_target=args.target, sidecar_token=os.environ["BENCH_SIDECAR_TOKEN"])
    reporter = OutcomeReporter(config)
    channel = open_channel(config)
    task = asyncio.create_task(reporter.run(channel)) if reporting else None
    key = Key(args.key, Provider.OPENAI_COMPATIBLE, "http://127.0.0.1:9", "unused", True, 1, frozenset(), "bench")
    attempt = Attempt(Target(Provider.OPENAI_COMPATIBLE, MODEL, 0, 1, ()), key)
    success = classify_response(200, {}, b"", now=0.0)
    work = args.work_us / 1e6
    stalls: list[float] = []
    enqueue_time = 0.0
    perf = time.perf_counter
    started = perf()
    warm_until = started + min(1.0, args.seconds / 4)
    end = started + args.seconds
    n = 0
    while True:
        now = perf()
        if now >= end:
            break
        spin_until = now + work
        while perf() < spin_until:
            pass
        record = AttemptRecord(attempt, success, time.time(), 1, "2xx", True)
        if reporting:
            before = perf()
            reporter.enqueue_record("bench", record, f"{n:032x}")
            enqueue_time += perf() - before
        n += 1
        turn = perf()
        await asyncio.sleep(0)  # one loop turn: whatever else is ready runs now
        stall = perf() - turn
        if turn >= warm_until:
            stalls.append(stall)
    if task is not None:
        reporter.stop()
        await task
    await channel.close(None)
    stalls.sort()
    count = len(stalls)

    def pct(q: float) -> float:
        return stalls[min(count - 1, int(q * count))] * 1e6

    return {
        "variant": args.variant,
        "turns": count,
        "rate": n / args.seconds,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": stalls[-1] * 1e6,
        "over_250us": sum(1 for s in stalls if s > 250e-6),
        "enqueue_us": enqueue_time / n * 1e6 if reporting and n else 0.0,
        "sent": reporter.stats.sent,
        "dropped": reporter.stats.dropped_total,
        "enqueued": reporter.stats.enqueued,
    }


def child_main(argv: list[str]) -> int:
    import uvloop

    from keyplane.runtime import tune_gc

    parser = argparse.ArgumentParser(prog="bench.reporter_lag child")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--work-us", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    tune_gc()  # as ``keyplane sidecar`` does
    print(json.dumps(uvloop.run(_drive(args))), flush=True)
    return 0


# --- orchestrator -------------------------------------------------------------------


def _run_variant(variant: str, src: Path | None, cp_address: str, token: str, key: str, args: Any) -> dict[str, Any]:
    from bench._keyplane import keyplane_env
    from bench._procs import PROXY_CPUS

    env = keyplane_env({"BENCH_SIDECAR_TOKEN": token}, src)
    # Run as a script, so that keyplane and sidecar come from ``src`` (first on
    # PYTHONPATH), not from the working directory.
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "child",
        "--variant",
        variant,
        "--target",
        cp_address,
        "--key",
        key,
        "--work-us",
        str(args.work_us),
        "--seconds",
        str(args.seconds),
    ]

    def pin() -> None:
        if PROXY_CPUS:
            os.sched_setaffinity(0, PROXY_CPUS)

    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.seconds + 60, preexec_fn=pin, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{completed.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child_main(argv[1:])
    from bench._keyplane import Admin, start_control_plane
    from bench._procs import DRIVER_CPUS, PROXY_CPUS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short round")
    parser.add_argument("--work-us", type=float, default=300.0, help="CPU spent per request stand-in")
    parser.add_argument("--seconds", type=float, default=8.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-src", type=Path, help="also measure the reporter of this source tree")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds = 1.5, 1
    variants: list[tuple[str, Path | None]] = [("off", None), ("on", None)]
    if args.compare_src is not None:
        variants.append(("compare", args.compare_src.resolve()))
    pinning = f"request stand-in on core(s) {sorted(PROXY_CPUS)}, control plane on {sorted(DRIVER_CPUS)}"
    print(
        f"# reporter lag: back-to-back requests of {args.work_us:.0f} us CPU, {args.seconds:.1f} s x "
        f"{args.rounds} round(s); {pinning if PROXY_CPUS else 'not pinned'}",
        flush=True,
    )
    cp = start_control_plane(cpus=DRIVER_CPUS or None)
    runs: list[dict[str, Any]] = []
    try:
        admin = Admin(cp.address, cp.admin_token)
        try:
            key_ids, _ = admin.setup("http://127.0.0.1:9", [MODEL])
        finally:
            admin.close()
        for round_no in range(args.rounds):
            order = variants[round_no % len(variants) :] + variants[: round_no % len(variants)]
            for variant, src in order:
                result = _run_variant(variant, src, cp.address, cp.sidecar_token, key_ids[0], args)
                result["round"] = round_no
                runs.append(result)
                print(
                    f"[r{round_no}] {variant:8s} {result['rate']:5.0f} req/s; stall us p50 {result['p50_us']:.1f} "
                    f"p99 {result['p99_us']:.1f} p99.9 {result['p999_us']:.1f} max {result['max_us']:.1f}; "
                    f"stalls > 250 us: {result['over_250us']}; enqueue {result['enqueue_us']:.2f} us/outcome; "
                    f"sent {result['sent']} dropped {result['dropped']}",
                    flush=True,
                )
    finally:
        cp.stop()
    print()
    header = ["variant", "requests/s", "stall p50 us", "p99 us", "p99.9 us", "max us", "stalls > 250 us"]
    print("| " + " | ".join([*header, "enqueue us/outcome", "sent"]) + " |")
    print("| --- |" + " ---: |" * (len(header) + 1))
    for variant, _ in variants:
        mine = [r for r in runs if r["variant"] == variant]

        def med(field: str, mine: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(r[field] for r in mine))

        print(
            f"| {variant} | {med('rate'):.0f} | {med('p50_us'):.1f} | {med('p99_us'):.1f} | {med('p999_us'):.1f} | "
            f"{med('max_us'):.1f} | {med('over_250us'):.0f} | {med('enqueue_us'):.2f} | {int(med('sent'))} |"
        )
    print("(median over rounds)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": runs}, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
