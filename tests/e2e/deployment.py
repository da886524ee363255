"""A ``keyplane up`` deployment for end-to-end tests: its addresses and the
admin CLI pointed at it."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.processes import CliResult, Running, child_env, cli

__all__ = ["Deployment"]


class Deployment:
    def __init__(self, home: Path, up: Running) -> None:
        self.home = home
        self.up = up
        self.grpc_target = up.find(r"control plane listening on (\S+)").group(1)
        self.sidecar_url = up.find(r"sidecar listening on (http://\S+/v1)").group(1)
        self.env = child_env(home, {"KEYPLANE_SERVER": self.grpc_target})

    async def cli(self, *args: str, stdin: str | None = None) -> CliResult:
        return await cli(list(args), self.env, stdin)

    async def ok(self, *args: str, stdin: str | None = None) -> str:
        result = await self.cli(*args, stdin=stdin)
        assert result.code == 0, f"keyplane {' '.join(args)} failed: {result.stderr}"
        return result.stdout
