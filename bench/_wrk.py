"""wrk (C, one thread) as the load generator when it is installed (Debian: apt-get install wrk)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkResult", "available", "run_wrk"]

_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%(headers)s
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d,"max":%%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    errors: int
    elapsed: float
    p50_ms: float
    p99_ms: float
    cpu_seconds: float


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    *,
    concurrency: int,
    duration: float,
    cpus: frozenset[int] | None,
    timeout: float = 30.0,
) -> WrkResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers)
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT % {"headers": lines, "body": body_path})

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(duration))}s",
                f"--timeout={int(timeout)}s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=pin,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr[-2000:]}")
    last = [line for line in completed.stdout.splitlines() if line.startswith("{")][-1]
    data = json.loads(last)
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=int(data["requests"]),
        errors=errors,
        elapsed=data["duration_us"] / 1e6,
        p50_ms=data["p50"] / 1000,
        p99_ms=data["p99"] / 1000,
        cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )
