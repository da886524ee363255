"""Profile the sidecar's hot path with py-spy under load.

Starts the fake upstream, a real control plane and a real sidecar (pinned to
its own core), drives ``--concurrency`` keep-alive connections of one mix
through the sidecar, and meanwhile samples the sidecar process with
``py-spy record --format raw`` (collapsed stacks; py-spy must be installed:
``pip install py-spy``). Prints where the samples fall: self time by
function, inclusive time by function, and inclusive time by area (sidecar
modules, the upstream HTTP client, uvicorn/httptools server, json, prometheus_client,
logging, asyncio/uvloop).

    python -m bench.profile_sidecar [--mix json-small|sse-small|json-8k|sse-8k] [--seconds 10]
    python -m bench.profile_sidecar --smoke
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from bench import _wrk, fake_upstream, loadgen
from bench._keyplane import Admin, start_control_plane, start_sidecar
from bench._procs import DRIVER_CPUS, PROXY_CPUS, Proc
from bench.proxy_overhead import MIXES, MODEL

AREAS = (
    ("sidecar/app.py", "sidecar.app (ASGI edge)"),
    ("sidecar/chat.py", "sidecar.chat (handler)"),
    ("sidecar/answering.py", "sidecar.answering (run and answer)"),
    ("sidecar/planning.py", "sidecar.planning (plan)"),
    ("sidecar/relay.py", "sidecar.relay (answer relay)"),
    ("sidecar/proxy.py", "sidecar.proxy (attempt loop)"),
    ("sidecar/upstream/", "sidecar.upstream (client glue)"),
    ("sidecar/router.py", "sidecar.router (plan)"),
    ("sidecar/state.py", "sidecar.state (lookups)"),
    ("sidecar/metrics.py", "sidecar.metrics"),
    ("sidecar/", "sidecar (other)"),
    ("prometheus_client", "prometheus_client"),
    ("aiohttp/", "aiohttp client"),
    ("uvicorn/", "uvicorn + httptools server"),
    ("json/", "json encode/decode"),
    ("logging/", "logging"),
    ("asyncio/", "asyncio"),
)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def parse(raw: str) -> tuple[Counter[str], Counter[str], Counter[str], int]:
    """Collapsed stacks -> (self by frame, inclusive by frame, inclusive by area, total samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
        seen: set[str] = set()
        for frame in frames:
            for needle, area in AREAS:
                if needle in frame:
                    seen.add(area)
                    break
        for area in seen:
            areas[area] += count
    return own, inclusive, areas, total


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)`` keeping the last two path parts."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 s, tiny report")
    parser.add_argument("--mix", default="json-small", choices=[m.name for m in MIXES])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--save", type=Path, help="keep the collapsed stacks here (e.g. for a flame graph)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.top = 2.0, 8
    spy = py_spy()
    mix = next(m for m in MIXES if m.name == args.mix)
    procs: list[Proc] = []
    cp = None
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        out = Path(tmp) / "stacks.txt"
        try:
            upstream = fake_upstream.start_process(cpus=DRIVER_CPUS or None)
            procs.append(upstream)
            cp = start_control_plane(cpus=DRIVER_CPUS or None)
            admin = Admin(cp.address, cp.admin_token)
            try:
                _, token = admin.setup(upstream.match.group(1), [MODEL])
            finally:
                admin.close()
            sidecar = start_sidecar(cp, cpus=PROXY_CPUS or None)
            procs.append(sidecar)
            url = sidecar.match.group(1) + "/v1/chat/completions"
            headers = (("Authorization", f"Bearer {token}"),)
            load_seconds = args.seconds + 2

            def drive() -> None:
                if _wrk.available():
                    _wrk.run_wrk(
                        url,
                        mix.body(),
                        headers,
                        concurrency=args.concurrency,
                        duration=load_seconds,
                        cpus=DRIVER_CPUS or None,
                    )
                else:
                    loadgen.run_load(
                        loadgen.LoadSpec(
                            url=url,
                            body=mix.body(),
                            concurrency=args.concurrency,
                            duration=load_seconds,
                            headers=headers,
                            procs=2,
                            cpus=DRIVER_CPUS or None,
                        )
                    )

            load = threading.Thread(target=drive)
            load.start()
            spied = subprocess.run(
                [
                    spy,
                    "record",
                    "--pid",
                    str(sidecar.pid),
                    "--duration",
                    str(round(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            load.join()
            if spied.returncode != 0 or not out.exists():
                raise SystemExit(f"py-spy failed ({spied.returncode}): {spied.stderr[-2000:]}")
            raw = out.read_text()
            if args.save:
                args.save.write_text(raw)
        finally:
            for proc in reversed(procs):
                proc.stop()
            if cp is not None:
                cp.stop()
    own, inclusive, areas, total = parse(raw)
    print(
        f"# sidecar profile: {args.mix}, concurrency {args.concurrency}, {args.seconds:.0f} s, "
        f"{total} samples (py-spy --nonblocking at {args.rate} Hz; idle threads excluded)"
    )
    print("\n## Inclusive time by area\n\n| area | share of samples |\n| --- | ---: |")
    for area, count in areas.most_common():
        print(f"| {area} | {count / total:.1%} |")
    print("\n## Self time by function\n\n| function | self |\n| --- | ---: |")
    for frame, count in own.most_common(args.top):
        print(f"| {frame} | {count / total:.1%} |")
    print("\n## Inclusive time by function (sidecar and library frames)\n\n| function | inclusive |\n| --- | ---: |")
    for frame, count in inclusive.most_common(args.top * 2)[: args.top]:
        print(f"| {frame} | {count / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
