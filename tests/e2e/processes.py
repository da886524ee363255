"""Run the real ``keyplane`` command in subprocesses, as a user would."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KEYPLANE = [sys.executable, "-m", "keyplane_cli"]
STARTUP_TIMEOUT = 30.0


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@dataclass
class Running:
    """A long-running keyplane process and what it printed at startup."""

    process: asyncio.subprocess.Process
    banner: list[str]
    stderr_lines: list[str] = field(default_factory=list)
    _drain: asyncio.Task[None] | None = None

    def find(self, pattern: str) -> re.Match[str]:
        for line in self.banner:
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {self.banner}")

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            await self._drain
        return self.process.returncode if self.process.returncode is not None else -1

    @property
    def output(self) -> str:
        return "\n".join(self.banner + self.stderr_lines)


def child_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYPLANE_", "OPENAI_"))}
    env["KEYPLANE_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


async def start(args: list[str], env: dict[str, str], ready: str) -> Running:
    """Start ``keyplane ARGS`` and wait until a stdout line matches ``ready``."""
    process = await asyncio.create_subprocess_exec(
        *KEYPLANE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    running = Running(process, [])

    async def drain_stderr() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            running.stderr_lines.append(raw.decode(errors="replace").rstrip())

    async def drain_stdout() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            running.banner.append(raw.decode(errors="replace").rstrip())

    stderr_task = asyncio.create_task(drain_stderr())

    async def wait_ready() -> None:
        assert process.stdout is not None
        while True:
            raw = await process.stdout.readline()
            if not raw:
                raise AssertionError("keyplane exited before it was ready:\n" + running.output)
            line = raw.decode(errors="replace").rstrip()
            running.banner.append(line)
            if re.search(ready, line):
                return

    try:
        await asyncio.wait_for(wait_ready(), STARTUP_TIMEOUT)
    except BaseException:
        process.kill()
        await process.wait()
        await stderr_task
        raise

    async def drain_both() -> None:
        await asyncio.gather(stderr_task, drain_stdout())

    running._drain = asyncio.create_task(drain_both())
    return running


async def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> CliResult:
    process = await asyncio.create_subprocess_exec(
        *KEYPLANE,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode() if stdin is not None else None), 30)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())
