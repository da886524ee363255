"""Fixtures of the end-to-end tests: a fake provider and a ``keyplane up``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.deployment import Deployment
from tests.e2e.processes import child_env, start
from tests.fakes.upstream import FakeUpstream


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    home = tmp_path / "home"
    up = await start(["up", "--listen", "127.0.0.1:0", "--port", "0"], child_env(home), r"sidecar listening on http://")
    try:
        yield Deployment(home, up)
    finally:
        code = await up.stop()
        assert code == 0, up.output
