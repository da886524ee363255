"""Database on the request path: count the store's queries during a
10,000-request run through a real sidecar. It must be zero; the benchmark
exits 1 if it is not.

The control plane runs in its own process through this module's
``serve-control-plane`` command: the real ``ControlPlane`` with its real store,
handed in wrapped in a counter of every ``Store`` method call (SQLite or
Postgres) and, on SQLite, with sqlite3's trace callback counting every SQL
statement the connection executes. The clock-driven safety-net re-read of
the change log (``poll_interval``, every 5 s whatever the traffic), the
limits' re-read, any periodic sweep and the usage rollups' batched flushes
(off the request path; counted by tests/sidecar/test_usage_fleet.py) are
switched off in this process, so every statement counted
during the run was caused by the traffic. The sidecar is the real
``keyplane sidecar`` process; requests are half non-streaming, half streaming.

    python -m bench.db_queries                 # 10,000 requests
    python -m bench.db_queries --smoke         # 500 requests
    python -m bench.db_queries --store postgresql://postgres@127.0.0.1:5432/test   # throwaway schema
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

from bench import fake_upstream, loadgen
from bench._keyplane import TENANT, Admin, drop_schema, start_control_plane, start_sidecar
from bench._procs import Proc
from keyplane.v1 import admin_service_pb2 as admin_pb2

MODEL = "bench-model"
COUNTS_ENV = "BENCH_DB_COUNTS_FILE"


class CountingStore:
    """Any store, with every awaited method call counted by name."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        calls = self.calls

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return attr(*args, **kwargs)

        return counted


async def _serve(args: argparse.Namespace) -> int:
    from control_plane.config import ControlPlaneConfig
    from control_plane.server import ControlPlane
    from control_plane.store.base import Store
    from control_plane.store.factory import open_store
    from control_plane.store.sqlite import SqliteStore
    from keyplane.crypto import load_master_key
    from keyplane.home import read_token_file

    inner = open_store(args.store)
    counting = CountingStore(inner)
    statements: Counter[str] = Counter()
    knobs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(ControlPlaneConfig)}
    if "poll_interval" in names:
        knobs["poll_interval"] = None
    for name in names:
        # Clock-driven reads (sweeps, the limits' re-read) are off; so are the usage
        # rollups' flushes: batched writes off the request path, one per rollup row
        # per flush whatever the traffic (measured by tests/sidecar/test_usage_fleet.py).
        if name.endswith(("sweep_interval", "reload_interval")) or name == "usage_flush_interval":
            knobs[name] = 3600.0
    config = ControlPlaneConfig(
        listen=args.listen,
        store_url=args.store,
        admin_token=read_token_file(args.admin_token_file),
        sidecar_tokens={os.environ["KEYPLANE_SIDECAR_TOKEN"]: ("*",)},
        master_key=load_master_key(None, create=False),
        **knobs,
    )
    cp = ControlPlane(config, store=cast(Store, counting))
    await cp.start()
    traced = False
    if isinstance(inner, SqliteStore):  # trace every statement on the store's one connection
        conn = await inner._connection()

        def trace(sql: str) -> None:
            statements[" ".join(sql.split())[:70]] += 1

        await conn.set_trace_callback(trace)
        traced = True
    counts_file = Path(os.environ[COUNTS_ENV])
    loop = asyncio.get_running_loop()

    def dump() -> None:
        data = {"store_calls": dict(counting.calls), "sql": dict(statements), "sql_traced": traced}
        tmp = counts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(counts_file)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"traced control plane listening on port {cp.port} (knobs {knobs})", flush=True)
    try:
        await stop.wait()
    finally:
        await cp.stop()
    return 0


def serve_control_plane(argv: list[str]) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="bench.db_queries serve-control-plane")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--store", required=True)
    parser.add_argument("--admin-token-file", type=Path, required=True)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    return int(uvloop.run(_serve(args)))


def _snapshot(cp_proc: Proc, counts_file: Path) -> dict[str, Any]:
    counts_file.unlink(missing_ok=True)
    os.kill(cp_proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not counts_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the traced control plane did not report its counts")
        time.sleep(0.02)
    return cast(dict[str, Any], json.loads(counts_file.read_text()))


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "serve-control-plane":
        return serve_control_plane(args_list[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="500 requests")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    args = parser.parse_args(args_list)
    total = 500 if args.smoke else args.requests
    store, schema = args.store, None
    if store and store.startswith("postgres") and "schema=" not in store:
        schema = "bench_dbq_" + secrets.token_hex(4)  # a throwaway schema, dropped at the end
        store += ("&" if "?" in store else "?") + f"schema={schema}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-dbq-"))
    counts_file = workdir / "counts.json"
    procs: list[Proc] = []
    cp = None
    try:
        upstream = fake_upstream.start_process(cpus=None)
        procs.append(upstream)
        base = upstream.match.group(1)
        cp = start_control_plane(
            store=store,
            argv=[sys.executable, "-m", "bench.db_queries", "serve-control-plane"],
            extra_env={COUNTS_ENV: str(counts_file)},
        )
        admin = Admin(cp.address, cp.admin_token)
        try:
            _, token = admin.setup(base, [MODEL])
        finally:
            admin.close()
        sidecar = start_sidecar(cp)
        procs.append(sidecar)
        url = sidecar.match.group(1) + "/v1/chat/completions"
        headers = (("Authorization", f"Bearer {token}"),)
        time.sleep(0.5)  # let the watch stream settle
        before = _snapshot(cp.proc, counts_file)
        started = time.monotonic()
        results = []
        for stream, count in ((False, total // 2), (True, total - total // 2)):
            body = json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": stream}
            ).encode()
            results.append(
                loadgen.run_load(
                    loadgen.LoadSpec(
                        url=url, body=body, concurrency=args.concurrency, requests=count, headers=headers, procs=1
                    )
                )
            )
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # anything the traffic triggers later (outcome reports, flushes) counts too
        after = _snapshot(cp.proc, counts_file)
        # Positive control: one admin read must show up, or the counters are blind.
        admin = Admin(cp.address, cp.admin_token)
        try:
            admin.stub.ListProviderKeys(
                admin_pb2.ListProviderKeysRequest(tenant=TENANT), metadata=admin.metadata, timeout=30
            )
        finally:
            admin.close()
        control = _snapshot(cp.proc, counts_file)
    finally:
        for proc in reversed(procs):
            proc.stop()
        if cp is not None:
            cp.stop()
        if schema is not None:
            drop_schema(args.store, schema)
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    sent = sum(r.requests for r in results)
    ok = sum(r.statuses.get("200", 0) for r in results)
    calls = _diff(after["store_calls"], before["store_calls"])
    sql = _diff(after["sql"], before["sql"])
    n_calls, n_sql = sum(calls.values()), sum(sql.values())
    print(f"# database queries on the request path ({'smoke' if args.smoke else 'full'})")
    print(
        f"requests through the sidecar: {sent} ({ok} answered 200) in {elapsed:.1f} s, concurrency {args.concurrency}"
    )
    print(f"store method calls during the run: {n_calls} {calls or ''}")
    if after.get("sql_traced"):
        print(f"SQL statements during the run (sqlite3 trace): {n_sql} {sql or ''}")
    else:
        print("SQL statements: not traced for this store (store calls counted)")
    control_calls = sum(_diff(control["store_calls"], after["store_calls"]).values())
    control_sql = sum(_diff(control["sql"], after["sql"]).values())
    print(f"instrument check: one admin ListProviderKeys afterwards -> {control_calls} store calls, {control_sql} SQL")
    if not control_calls or (after.get("sql_traced") and not control_sql):
        print("FAIL: the counters did not see an admin read; they cannot be trusted")
        return 1
    per_request = (n_calls + n_sql) / max(sent, 1)
    print(f"store queries per proxied request: {per_request:.4f}")
    if ok != sent:
        print(f"FAIL: {sent - ok} requests did not answer 200")
        return 1
    if n_calls or n_sql:
        print("FAIL: the request path touched the database")
        return 1
    print("PASS: zero store queries during the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
