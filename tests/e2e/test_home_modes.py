"""``keyplane up`` keeps its data private: a KEYPLANE_HOME that others can
read is tightened to 0700 with a warning, and the SQLite database with its
-wal/-shm files, the master key and the tokens are 0600."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.e2e.processes import child_env, cli, start


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_up_tightens_a_shared_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    up = await start(["up", "--listen", "127.0.0.1:0", "--port", "0"], child_env(home), r"sidecar listening on http://")
    try:
        target = up.find(r"control plane listening on (\S+)").group(1)
        created = await cli(["tenants", "create", "acme", "--server", target], child_env(home))
        assert created.code == 0, created.stderr
        assert mode(home) == 0o700
        files = ["keyplane.db", "keyplane.db-wal", "keyplane.db-shm", "master.key", "admin.token", "sidecar.token"]
        assert {name: oct(mode(home / name)) for name in files} == {name: "0o600" for name in files}
    finally:
        code = await up.stop()
    assert code == 0, up.output
    assert any("(mode 0755); tightened it to 0700" in line for line in up.stderr_lines), up.output
