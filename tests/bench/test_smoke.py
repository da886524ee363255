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


def test_usage_overhead() -> None:
    out = run_smoke("bench.usage_overhead")
    assert re.search(r"\| sse, usage not asked \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out


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
    assert re.search(r"\| sidecar\.chat \(handler\) \| [\d.]+% \|", out), out


def test_reporter_lag() -> None:
    out = run_smoke("bench.reporter_lag")
    assert re.search(r"\| off \| \d+ \| [\d.]+ \|", out), out
    assert re.search(r"\| on \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| [\d.]+ \| [1-9]\d* \|", out), out


def test_client_stack() -> None:
    out = run_smoke("bench.client_stack")
    for stack in ("uvicorn-aiohttp", "uvicorn-raw", "raw-aiohttp", "raw-raw"):
        assert re.search(rf"\| 1 \| {stack} \| \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out


def test_wire_latency() -> None:
    out = run_smoke("bench.wire_latency")
    not_measured = re.search(r"# wire latency: not measured: (\S.*)", out)
    if not_measured:  # no tcpdump, or no right to capture: a skip that says why, not a pass
        pytest.skip(f"bench.wire_latency could not measure: {not_measured.group(1)}")
    for target in ("direct", "sidecar", "sidecar-noreports", "ideal"):
        assert re.search(rf"\| {target} \| [\d.]+ \| [\d.]+ \| ", out), out
    assert re.search(r"\| sidecar \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \| [+-][\d.]+ \|", out), out
    if "no C compiler" not in out:
        assert re.search(r"\| sidecar \|( [+-]?[\d.]+ \|){10}$", out, re.MULTILINE), out


def test_wire_latencies_pairs_each_request_with_the_last_segment_of_its_answer() -> None:
    from bench.wire_latency import wire_latencies

    text = "\n".join(
        [
            "100.000000 IP 127.0.0.1.5000 > 127.0.0.1.8000: Flags [P.], length 200",
            "100.000300 IP 127.0.0.1.8000 > 127.0.0.1.5000: Flags [P.], length 90",
            "100.000400 IP 127.0.0.1.8000 > 127.0.0.1.5000: Flags [P.], length 60",
            "100.001000 IP 127.0.0.1.5000 > 127.0.0.1.8000: Flags [P.], length 200",
            "100.001250 IP 127.0.0.1.8000 > 127.0.0.1.5000: Flags [P.], length 150",
            "100.002000 IP 127.0.0.1.5000 > 127.0.0.1.8000: Flags [P.], length 200",  # no answer captured
        ]
    )
    assert [round(x, 3) for x in wire_latencies(text, 8000)] == [0.4, 0.25]


def test_key_scaling() -> None:
    out = run_smoke("bench.key_scaling")
    assert re.search(r"\| sidecar \| 100 \| \d+ \| [\d.]+ \| [\d.]+x \| 0 \|", out), out
    assert re.search(r"\| sidecar --access-log FILE \| 1 \| \d+ \| [\d.]+ \| [\d.]+x \| 0 \|", out), out
    assert "target (CPU/request at 100 keys" in out


def test_affinity() -> None:
    out = run_smoke("bench.affinity")
    assert re.search(r"\| affinity \| \d+ \| 0 \| [\d.]+% \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out
    assert re.search(r"\| round robin \| \d+ \| 0 \| [\d.]+% \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out
    assert re.search(r"\| affinity hit \| \d+ \|", out), out
    assert "affinity hit vs no affinity: CPU x" in out, out


def test_limits_overhead() -> None:
    out = run_smoke("bench.limits_overhead")
    assert re.search(r"worst on/off CPU ratio \d+\.\d+ .* errors 0", out), out
