"""Propagation: N simulated sidecars (N Watch streams, each on its own gRPC
channel and TCP connection, opened by grpc.aio in separate watcher
processes) on one control plane (the real ``keyplane control-plane``
process). Repeated admin writes (UpdateProviderKey, a new weight each time);
for each, the time from the admin call returning to the last of the N
streams receiving that change, p50/p99/max over the writes. Also reported:
from the call being sent, and to the first stream.

With ``--replicas 2 --store postgresql://...`` two control-plane replicas
share one Postgres; the streams are split between them and every write goes
to the first replica, so half the fleet learns it through the change log +
LISTEN/NOTIFY.

    python -m bench.propagation                        # N = 100 and 1,000
    python -m bench.propagation --smoke                # N = 20, 5 writes
    python -m bench.propagation --replicas 2 --store 'postgresql://postgres@127.0.0.1:5432/test'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import selectors
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from google.protobuf import field_mask_pb2

from bench import loadgen
from bench._keyplane import TENANT, Admin, ControlPlaneProc, drop_schema, start_control_plane
from bench._procs import cpu_seconds
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import resources_pb2

# --- watcher process ----------------------------------------------------------------


async def _watch(targets: list[str], token: str, streams: int, first_id: int) -> None:
    import grpc

    from keyplane.v1 import sidecar_service_pb2 as pb
    from keyplane.v1 import sidecar_service_pb2_grpc as pb_grpc

    arrivals: dict[int, list[float]] = {}
    snapshots = 0
    all_ready = asyncio.Event()
    metadata = (("authorization", f"Bearer {token}"),)
    out = sys.stdout

    async def one(index: int) -> None:
        nonlocal snapshots
        target = targets[index % len(targets)]
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            stub = pb_grpc.SidecarServiceStub(channel)
            request = pb.WatchRequest(tenants=[TENANT], sidecar_id=f"sim-{first_id + index}")
            async for response in stub.Watch(request, metadata=metadata):
                now = time.monotonic()
                if response.HasField("snapshot"):
                    snapshots += 1
                    if snapshots == streams:
                        all_ready.set()
                    continue
                for change in response.delta.changes:
                    if change.HasField("key_put"):
                        seen = arrivals.setdefault(change.key_put.weight, [])
                        seen.append(now)
                        if len(seen) == streams:
                            line = {"weight": change.key_put.weight, "first": min(seen), "last": max(seen)}
                            out.write(json.dumps(line) + "\n")
                            out.flush()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                out.write(json.dumps({"error": f"{exc.code().name}: {exc.details()}"}) + "\n")
                out.flush()
        finally:
            await channel.close(None)

    tasks = []
    for index in range(streams):
        tasks.append(asyncio.create_task(one(index)))
        if index % 100 == 99:
            await asyncio.sleep(0.05)  # open in waves, as a fleet rolling out would
    await asyncio.wait_for(all_ready.wait(), 120)
    out.write(json.dumps({"ready": streams}) + "\n")
    out.flush()
    # Run until the orchestrator closes our stdin.
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def watcher_main(argv: list[str]) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="bench.propagation watch")
    parser.add_argument("--target", action="append", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--first-id", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(_watch(args.target, os.environ["BENCH_SIDECAR_TOKEN"], args.streams, args.first_id))
    return 0


# --- orchestrator -------------------------------------------------------------------


@dataclass
class Watchers:
    popens: list[subprocess.Popen[bytes]]
    buffers: dict[int, bytes]

    def read_lines(self, want: int, timeout: float) -> list[dict[str, object]]:
        """Wait for ``want`` JSON lines (one per watcher process)."""
        got: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for popen in self.popens:
                assert popen.stdout is not None
                selector.register(popen.stdout, selectors.EVENT_READ)
            while len(got) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"watchers: {len(got)}/{want} answers after {timeout}s")
                for key, _ in selector.select(left):
                    stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
                    chunk = os.read(stream.fileno(), 65536)
                    if not chunk:
                        raise RuntimeError("a watcher process exited")
                    buf = self.buffers.get(stream.fileno(), b"") + chunk
                    while b"\n" in buf:
                        raw, buf = buf.split(b"\n", 1)
                        line = json.loads(raw)
                        if "error" in line:
                            raise RuntimeError(f"watch stream failed: {line['error']}")
                        got.append(line)
                    self.buffers[stream.fileno()] = buf
        return got

    def stop(self) -> None:
        for popen in self.popens:
            if popen.stdin is not None:
                popen.stdin.close()
        for popen in self.popens:
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
            if popen.stdout is not None:
                popen.stdout.close()


def start_watchers(cps: list[ControlPlaneProc], streams: int, procs: int) -> Watchers:
    env = dict(os.environ)
    env["BENCH_SIDECAR_TOKEN"] = cps[0].sidecar_token
    popens = []
    first = 0
    for index in range(procs):
        count = streams // procs + (1 if index < streams % procs else 0)
        argv = [sys.executable, "-m", "bench.propagation", "watch", "--streams", str(count), "--first-id", str(first)]
        for cp in cps:
            argv += ["--target", cp.address]
        popens.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
        first += count
    watchers = Watchers(popens, {})
    watchers.read_lines(procs, timeout=180)
    return watchers


def measure(
    cps: list[ControlPlaneProc], key_id: str, streams: int, writes: int, procs: int
) -> dict[str, float | int | str]:
    admin = Admin(cps[0].address, cps[0].admin_token)
    watchers = start_watchers(cps, streams, procs)
    cpu_before = sum(cpu_seconds(cp.proc.pid) for cp in cps)
    from_return: list[float] = []
    from_send: list[float] = []
    first_seen: list[float] = []
    try:
        for index in range(writes):
            weight = 2 + (index % 900)
            request = admin_pb2.UpdateProviderKeyRequest(
                tenant=TENANT,
                id=key_id,
                key=resources_pb2.ProviderKey(weight=weight),
                update_mask=field_mask_pb2.FieldMask(paths=["weight"]),
            )
            sent = time.monotonic()
            admin.stub.UpdateProviderKey(request, metadata=admin.metadata, timeout=30)
            returned = time.monotonic()
            lines = watchers.read_lines(procs, timeout=60)
            if any(line["weight"] != weight for line in lines):
                raise RuntimeError(f"unexpected change order: {lines}")
            last = max(float(line["last"]) for line in lines)  # type: ignore[arg-type]
            first = min(float(line["first"]) for line in lines)  # type: ignore[arg-type]
            from_return.append(1000 * (last - returned))
            from_send.append(1000 * (last - sent))
            first_seen.append(1000 * (first - returned))
            time.sleep(0.05)
    finally:
        watchers.stop()
        admin.close()
    cpu_used = sum(cpu_seconds(cp.proc.pid) for cp in cps) - cpu_before

    def pct(values: list[float], q: float) -> float:
        return loadgen.percentile(values, q)

    return {
        "streams": streams,
        "replicas": len(cps),
        "writes": writes,
        "last_from_return_p50_ms": pct(from_return, 50),
        "last_from_return_p99_ms": pct(from_return, 99),
        "last_from_return_max_ms": max(from_return),
        "last_from_send_p50_ms": pct(from_send, 50),
        "first_from_return_p50_ms": pct(first_seen, 50),
        "mean_ms": statistics.fmean(from_return),
        "control_plane_cpu_s": cpu_used,
    }


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "watch":
        return watcher_main(args_list[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="20 streams, 5 writes, no thresholds")
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--watcher-procs", type=int, default=2, help="processes holding the streams")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file; postgresql:// for replicas)")
    args = parser.parse_args(args_list)
    if args.smoke:
        args.streams, args.writes, args.watcher_procs = [20], 5, 1
    if args.replicas > 1 and not (args.store or "").startswith("postgres"):
        parser.error("--replicas needs --store postgresql://...")
    store = args.store
    schema = None
    if store and store.startswith("postgres"):
        schema = "bench_prop_" + secrets.token_hex(4)
        store += ("&" if "?" in store else "?") + f"schema={schema}"
    print(
        f"# propagation ({'smoke' if args.smoke else 'full'}); {args.replicas} replica(s), store "
        f"{'postgres' if schema else 'sqlite'}, watchers in {args.watcher_procs} process(es), nothing pinned"
    )
    results = []
    for streams in args.streams:
        cps: list[ControlPlaneProc] = []
        try:
            cps.append(start_control_plane(store=store))
            for _ in range(args.replicas - 1):
                cps.append(start_control_plane(store=store, same_secrets_as=cps[0]))
            admin = Admin(cps[0].address, cps[0].admin_token)
            try:
                key_ids, _ = admin.setup("http://127.0.0.1:9", ["bench-model"])
            finally:
                admin.close()
            result = measure(cps, key_ids[0], streams, args.writes, min(args.watcher_procs, streams))
            results.append(result)
            print(
                f"N={streams:5d}: last stream {result['last_from_return_p50_ms']:.1f} ms p50, "
                f"{result['last_from_return_p99_ms']:.1f} ms p99, {result['last_from_return_max_ms']:.1f} ms max "
                f"after the admin call returned ({args.writes} writes); first stream p50 "
                f"{result['first_from_return_p50_ms']:.1f} ms; control plane CPU {result['control_plane_cpu_s']:.2f} s",
                flush=True,
            )
        finally:
            for cp in cps:
                cp.stop()
            if schema and args.store:
                drop_schema(args.store, schema)
    print()
    print(
        "| streams | replicas | writes | last stream p50 ms | p99 ms | max ms | from send p50 ms "
        "| first stream p50 ms | CP CPU s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['streams']} | {r['replicas']} | {r['writes']} | {r['last_from_return_p50_ms']:.1f} "
            f"| {r['last_from_return_p99_ms']:.1f} | {r['last_from_return_max_ms']:.1f} "
            f"| {r['last_from_send_p50_ms']:.1f} | {r['first_from_return_p50_ms']:.1f} "
            f"| {r['control_plane_cpu_s']:.2f} |"
        )
    if not args.smoke:
        for r in results:
            if r["streams"] == 1000:
                p99 = float(r["last_from_return_p99_ms"])
                verdict = "MET" if p99 <= 200 else f"MISSED by {p99 - 200:.1f} ms ({(p99 - 200) / 200:.0%})"
                print(f"target: propagation to 1,000 streams <= 200 ms p99: {p99:.1f} ms -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
