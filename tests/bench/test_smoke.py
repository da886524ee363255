"""Every benchmark's smoke mode, through its real command, so the benchmarks can't rot.

Short runs, no thresholds: each must exit 0 and print its figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 110


def run_smoke(*args: str) -> str:
    env = dict(os.environ)
    completed = subprocess.run(
        [sys.executable, "-m", *args, "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{' '.join(args)} --smoke exited {completed.returncode}:\n{output[-4000:]}"
    return completed.stdout


def test_fake_upstream_compare() -> None:
    out = run_smoke("bench.fake_upstream", "--compare")
    assert re.search(r"asgi=\d+ aiohttp=\d+ -> faster: (asgi|aiohttp)", out), out


def test_proxy_overhead() -> None:
    out = run_smoke("bench.proxy_overhead", "--targets", "direct", "sidecar", "sidecar-noreports", "ideal")
    assert re.search(r"\| json-small \| 1 \| sidecar \| \d+ \| [\d.]+ \|", out), out
    assert re.search(r"\| json-small \| 1 \| sidecar-noreports \| \d+ \| [\d.]+ \|", out), out
    assert re.search(r"\| sse-small \| sidecar \| [\d.]+ \|", out), out  # TTFB probe
    assert re.search(r"\| sidecar \| 3 \| [\d.]+ \| [\d.]+ \|", out), out  # inter-chunk timing
    assert "### Targets" in out


def test_propagation() -> None:
    out = run_smoke("bench.propagation")
    assert re.search(r"\| 20 \| 1 \| 5 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out


def test_outcome_ingest() -> None:
    out = run_smoke("bench.outcome_ingest")
    assert re.search(r"\| 0% \| 8 \| 100 \| [1-9]\d* \|", out), out


def test_db_queries() -> None:
    out = run_smoke("bench.db_queries")
    assert "store queries per proxied request: 0.0000" in out, out
    assert "PASS" in out


@pytest.mark.skipif(
    shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists(),
    reason="py-spy is not installed (pip install py-spy)",
)
def test_profile_sidecar() -> None:
    out = run_smoke("bench.profile_sidecar")
    assert re.search(r"\| sidecar\.app \(ASGI handler, relay\) \| [\d.]+% \|", out), out


def test_reporter_lag() -> None:
    out = run_smoke("bench.reporter_lag")
    assert re.search(r"\| off \| \d+ \| [\d.]+ \|", out), out
    assert re.search(r"\| on \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| [\d.]+ \| [1-9]\d* \|", out), out


def test_client_stack() -> None:
    out = run_smoke("bench.client_stack")
    for stack in ("uvicorn-aiohttp", "uvicorn-raw", "raw-aiohttp", "raw-raw"):
        assert re.search(rf"\| 1 \| {stack} \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out
