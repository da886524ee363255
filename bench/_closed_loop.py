"""``bench/c/closed_loop.c``, built with the machine's C compiler and run: a second
load generator at concurrency 1 (blocking sockets, CLOCK_MONOTONIC per request)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClosedLoopResult", "build", "run"]

_SOURCE = Path(__file__).resolve().parent / "c" / "closed_loop.c"
_LINE = re.compile(r"requests (\d+) p50 ([\d.]+) p99 ([\d.]+) p999 ([\d.]+) max ([\d.]+)")


@dataclass(frozen=True, slots=True)
class ClosedLoopResult:
    requests: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


def build(directory: Path) -> Path | None:
    """The compiled binary in ``directory``, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = directory / "closed_loop"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(_SOURCE)], check=True, capture_output=True)
    return binary


def run(binary: Path, port: int, request: bytes, seconds: float, cpus: frozenset[int] | None) -> ClosedLoopResult:
    """``request`` (a whole HTTP/1.1 request) sent back to back to 127.0.0.1:``port``."""
    with tempfile.NamedTemporaryFile(prefix="bench-request-") as f:
        f.write(request)
        f.flush()

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        done = subprocess.run(
            [str(binary), str(port), f.name, str(seconds)],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=pin,
            timeout=seconds + 30,
        )
    m = _LINE.search(done.stdout)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"closed_loop failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return ClosedLoopResult(int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)), float(m.group(5)))
