"""Child processes for the benchmarks: start, wait for a banner, pin, measure CPU, stop."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["CLK_TCK", "CPU_LAYOUT", "Proc", "cpu_seconds", "pin_note", "repo_root"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
# On a 2-core machine: the process under test gets core 1 alone; the upstream and
# the load generator share core 0. Elsewhere: the last core vs the others.
PROXY_CPUS: frozenset[int] = frozenset({NCPU - 1}) if NCPU > 1 else frozenset()
DRIVER_CPUS: frozenset[int] = frozenset(range(NCPU - 1)) if NCPU > 1 else frozenset()
CPU_LAYOUT = {"proxy": PROXY_CPUS, "driver": DRIVER_CPUS}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pin_note(pinned: bool) -> str:
    if not pinned or NCPU < 2:
        return "not pinned (the OS schedules every process on any core)"
    return (
        f"pinned: process under test on core(s) {sorted(PROXY_CPUS)}, "
        f"upstream + load generator on core(s) {sorted(DRIVER_CPUS)}"
    )


def _stat_ticks(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime ticks) of one live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid`` and its live descendants."""
    own = _stat_ticks(pid)
    if own is None:
        return 0.0
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {pid: own[1]}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pid:
            continue
        stat = _stat_ticks(int(entry))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry))
            ticks[int(entry)] = stat[1]
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo.extend(children.get(current, ()))
    return total / CLK_TCK


@dataclass
class Proc:
    """A child process whose stdout printed a ready line matching a pattern."""

    popen: subprocess.Popen[bytes]
    match: re.Match[str]
    log_path: Path
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        ready: str | None,
        cpus: frozenset[int] | None,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> Proc:
        log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONUNBUFFERED"] = "1"

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=log,
            env=full_env,
            cwd=cwd or repo_root(),
            preexec_fn=pin,
            start_new_session=True,
        )
        log.close()
        assert popen.stdout is not None
        if ready is None:
            _drain(popen.stdout)
            empty = re.match("", "")
            assert empty is not None
            return cls(popen, empty, Path(log.name))
        pattern = re.compile(ready)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(popen.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or (popen.poll() is not None and not selector.select(0)):
                    popen.kill()
                    popen.wait()
                    tail = Path(log.name).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{argv[:4]} not ready ({'timeout' if left <= 0 else 'exited'}):\n{tail}")
                if not selector.select(min(left, 0.5)):
                    continue
                chunk = os.read(popen.stdout.fileno(), 65536)
                if not chunk:
                    continue
                buffer += chunk
                while b"\n" in buffer:
                    raw, buffer = buffer.split(b"\n", 1)
                    line = raw.decode(errors="replace").rstrip()
                    lines.append(line)
                    found = pattern.search(line)
                    if found:
                        _drain(popen.stdout)
                        return cls(popen, found, Path(log.name), lines)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        code = self.popen.returncode
        self.log_path.unlink(missing_ok=True)
        return code

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _drain(stream: IO[bytes]) -> None:
    """Keep reading a child's stdout in a thread so it never blocks on a full pipe."""
    import threading

    def pump() -> None:
        try:
            while os.read(stream.fileno(), 65536):
                pass
        except (OSError, ValueError):
            pass

    threading.Thread(target=pump, daemon=True).start()


def python() -> str:
    return sys.executable
