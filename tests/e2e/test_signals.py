"""A SIGTERM sent the moment a long-running command says it is ready stops
it cleanly (exit 0): the signal handlers are installed before anything starts."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.e2e import processes


async def test_up_stops_cleanly_on_a_sigterm_right_after_its_banner(tmp_path: Path) -> None:
    env = processes.child_env(tmp_path / "home")
    for _ in range(3):
        running = await processes.start(
            ["up", "--listen", "127.0.0.1:0", "--port", "0"], env, ready=r"keyplane sidecar listening"
        )
        assert await running.stop() == 0, running.output


async def test_control_plane_stops_cleanly_on_a_sigterm_right_after_its_banner(tmp_path: Path) -> None:
    env = processes.child_env(
        tmp_path / "home",
        {
            "KEYPLANE_ADMIN_TOKEN": "kpa-signals-0123456789",
            "KEYPLANE_SIDECAR_TOKEN": "kps-signals-0123456789",
            "KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        },
    )
    running = await processes.start(
        ["control-plane", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path / 'kp.db'}"],
        env,
        ready=r"listening on port \d+",
    )
    assert await running.stop() == 0, running.output
