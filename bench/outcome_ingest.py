"""Outcome ingest: how many outcomes per second one control-plane process
folds from many ReportOutcomes streams, and the CPU it costs.

The control plane is the real ``keyplane control-plane`` process (pinned to
its own core by default); reporter processes on the other core(s) open
``--streams`` client-streaming ReportOutcomes calls (each on its own gRPC
channel, like that many sidecars) and send batches of ``--batch`` outcomes
(keyplane.v1 ReportOutcomesRequest / Outcome) as fast as flow control lets
them for ``--duration`` seconds; the figure is the ``accepted`` count the
control plane returns, over the time, and the control plane's CPU seconds
(from /proc/<pid>/stat) per 1,000 outcomes. ``--failure-rate`` mixes in
rate-limited outcomes (which move keys into cooldown: store writes).
Outcomes carry usage (tokens, a client key out of ``--client-keys``, a public
model) as sidecars send them, so the figure includes folding usage into the
per-minute rollups and their batched writes; ``--no-usage`` leaves it out.

    python -m bench.outcome_ingest                 # 0% and 1% failures
    python -m bench.outcome_ingest --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from bench._keyplane import Admin, start_control_plane
from bench._procs import DRIVER_CPUS, PROXY_CPUS, cpu_seconds, pin_note

MODEL = "bench-model"


# --- reporter process ---------------------------------------------------------------


async def _report(
    target: str,
    token: str,
    key_ids: list[str],
    streams: int,
    batch: int,
    duration: float,
    failure_rate: float,
    client_keys: int = 0,
) -> dict[str, float | int | str]:
    import grpc
    from google.protobuf import duration_pb2, timestamp_pb2

    from keyplane.v1 import resources_pb2
    from keyplane.v1 import sidecar_service_pb2 as pb
    from keyplane.v1 import sidecar_service_pb2_grpc as pb_grpc

    provider = resources_pb2.Provider.Value("PROVIDER_OPENAI_COMPATIBLE")
    success = pb.OutcomeClass.Value("OUTCOME_CLASS_SUCCESS")
    limited = pb.OutcomeClass.Value("OUTCOME_CLASS_RATE_LIMITED")
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    failures_every = round(1 / failure_rate) if failure_rate > 0 else 0

    def outcome(n: int) -> pb.Outcome:
        failed = failures_every and n % failures_every == failures_every - 1
        message = pb.Outcome(
            tenant="bench",
            key_id=key_ids[n % len(key_ids)],
            provider=provider,
            model=MODEL,
            outcome_class=limited if failed else success,
            status_code=429 if failed else 200,
            latency_ms=120,
            provider_final=True,
            request_id=f"req-{n}",
            time=now,
            reason="429 rate_limited" if failed else "",
        )
        if failed:
            message.retry_after.CopyFrom(duration_pb2.Duration(seconds=1))
        if client_keys:
            message.client_key_id = f"ck_{n % client_keys}"
            message.public_model = "bench"
            if not failed:
                message.usage.input_tokens = 900 + n % 100
                message.usage.cached_input_tokens = 512
                message.usage.output_tokens = 60 + n % 7
        return message

    metadata = (("authorization", f"Bearer {token}"),)
    sent = accepted = 0
    errors: list[str] = []
    deadline = time.monotonic() + duration

    async def one(index: int) -> None:
        nonlocal sent, accepted
        request = pb.ReportOutcomesRequest(
            outcomes=[outcome(index * batch + i) for i in range(batch)], sidecar_id=f"reporter-{index}"
        )
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])

        async def requests() -> AsyncIterator[pb.ReportOutcomesRequest]:
            nonlocal sent
            while time.monotonic() < deadline:
                yield request
                sent += batch

        try:
            response = await pb_grpc.SidecarServiceStub(channel).ReportOutcomes(requests(), metadata=metadata)
            accepted += response.accepted
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
        finally:
            await channel.close(None)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.monotonic() - started
    return {
        "sent": sent,
        "accepted": accepted,
        "elapsed": elapsed,
        "errors": len(errors),
        "error": errors[0] if errors else "",
    }


def reporter_main(argv: list[str]) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="bench.outcome_ingest report")
    parser.add_argument("--target", required=True)
    parser.add_argument("--key", action="append", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--client-keys", type=int, default=0)
    args = parser.parse_args(argv)
    result = uvloop.run(
        _report(
            args.target,
            os.environ["BENCH_SIDECAR_TOKEN"],
            args.key,
            args.streams,
            args.batch,
            args.duration,
            args.failure_rate,
            args.client_keys,
        )
    )
    print(json.dumps(result), flush=True)
    return 0


# --- orchestrator -------------------------------------------------------------------


def run(args: argparse.Namespace, failure_rate: float) -> dict[str, float | int | str]:
    pinned = not args.no_pin
    cp = start_control_plane(cpus=(PROXY_CPUS or None) if pinned else None)
    try:
        admin = Admin(cp.address, cp.admin_token)
        try:
            key_ids, _ = admin.setup("http://127.0.0.1:9", [MODEL], keys=args.keys)
        finally:
            admin.close()
        env = dict(os.environ)
        env["BENCH_SIDECAR_TOKEN"] = cp.sidecar_token
        driver = (DRIVER_CPUS or None) if pinned else None

        def pin() -> None:
            if driver:
                os.sched_setaffinity(0, driver)

        before = cpu_seconds(cp.proc.pid)
        popens = []
        per = max(1, args.streams // args.reporter_procs)
        for _ in range(args.reporter_procs):
            argv = [
                sys.executable,
                "-m",
                "bench.outcome_ingest",
                "report",
                "--target",
                cp.address,
                "--streams",
                str(per),
                "--batch",
                str(args.batch),
                "--duration",
                str(args.duration),
                "--failure-rate",
                str(failure_rate),
                "--client-keys",
                str(0 if args.no_usage else args.client_keys),
            ]
            for key in key_ids:
                argv += ["--key", key]
            popens.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, preexec_fn=pin))
        results = []
        for popen in popens:
            out, _ = popen.communicate(timeout=args.duration + 120)
            if popen.returncode != 0:
                raise RuntimeError(f"reporter exited with {popen.returncode}")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        used = cpu_seconds(cp.proc.pid) - before
    finally:
        cp.stop()
    accepted = sum(int(r["accepted"]) for r in results)
    sent = sum(int(r["sent"]) for r in results)
    elapsed = max(float(r["elapsed"]) for r in results)
    errors = [str(r["error"]) for r in results if r["errors"]]
    return {
        "failure_rate": failure_rate,
        "usage": not args.no_usage,
        "streams": per * args.reporter_procs,
        "batch": args.batch,
        "sent": sent,
        "accepted": accepted,
        "elapsed_s": elapsed,
        "outcomes_per_s": accepted / elapsed if elapsed else 0.0,
        "cp_cpu_s": used,
        "cp_cpu_ms_per_1000": 1_000_000 * used / accepted if accepted else float("nan"),
        "cp_core_busy": used / elapsed if elapsed else 0.0,
        "error": errors[0] if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "report":
        return reporter_main(args_list[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1.5 s, 8 streams")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--reporter-procs", type=int, default=1)
    parser.add_argument("--failure-rate", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--client-keys", type=int, default=50, help="client keys the usage is spread over")
    parser.add_argument("--no-usage", action="store_true", help="outcomes without usage (the figure before usage)")
    args = parser.parse_args(args_list)
    if args.smoke:
        args.streams, args.duration, args.failure_rate = 8, 1.5, [0.0]
    print(
        f"# outcome ingest ({'smoke' if args.smoke else 'full'}); {pin_note(not args.no_pin)} "
        "(control plane = process under test, reporters = load generator)"
    )
    rows = []
    for rate in args.failure_rate:
        row = run(args, rate)
        rows.append(row)
        if row["error"] and not row["accepted"]:
            print(f"ReportOutcomes is not usable on this control plane ({row['error']}): is the RPC implemented?")
            return 2
        print(
            f"failures {rate:.0%}: {row['outcomes_per_s']:.0f} outcomes/s accepted ({row['accepted']} of "
            f"{row['sent']} sent, {row['streams']} streams x batches of {row['batch']}); control plane "
            f"{row['cp_cpu_ms_per_1000']:.2f} ms CPU per 1,000 outcomes, core {row['cp_core_busy']:.0%} busy",
            flush=True,
        )
    print()
    print("| failures | streams | batch | outcomes/s | CP CPU ms per 1,000 | CP core busy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {float(r['failure_rate']):.0%} | {r['streams']} | {r['batch']} | {float(r['outcomes_per_s']):.0f} "
            f"| {float(r['cp_cpu_ms_per_1000']):.2f} | {float(r['cp_core_busy']):.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
