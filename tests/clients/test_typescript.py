"""The generated TypeScript stubs (clients/ts) against a real control plane.

A control plane on 127.0.0.1:0 over a real SQLite file; clients/ts/test/watch.test.ts
(run with tsx under Node) creates a tenant and a provider key through AdminService,
opens a Watch with a sidecar token, checks the snapshot and then the deltas of admin
changes. Needs `npm ci --prefix clients/ts` (bash .ci/run does it): without it the
tests skip, or fail under CI=true.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.server import ControlPlane
from tests.control_plane.conftest import ADMIN_TOKEN, SIDECAR_ALL, make_config

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "ts"
TSX = TS / "node_modules" / ".bin" / "tsx"
BUF = TS / "node_modules" / ".bin" / "buf"
NODE_TEST_TIMEOUT = 90.0


def _require(tool: Path) -> Path:
    missing = None
    if shutil.which("node") is None:
        missing = "node is not on PATH"
    elif not tool.exists():
        missing = f"{tool.relative_to(ROOT)} is missing: run `npm ci --prefix clients/ts` (bash .ci/run does)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    return tool


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control_plane = ControlPlane(make_config(tmp_path))
    await control_plane.start()
    yield control_plane
    await control_plane.stop(grace=0.2)


async def _run_node_test(address: str, admin_token: str, sidecar_token: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "KEYPLANE_SERVER": address,
        "KEYPLANE_ADMIN_TOKEN": admin_token,
        "KEYPLANE_SIDECAR_TOKEN": sidecar_token,
    }
    # Async, so this event loop keeps serving the control plane while node runs.
    process = await asyncio.create_subprocess_exec(
        str(_require(TSX)),
        "test/watch.test.ts",
        cwd=TS,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), NODE_TEST_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the node test did not finish within {NODE_TEST_TIMEOUT}s")
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_typescript_client_creates_a_tenant_and_a_key_and_watches_the_changes(plane: ControlPlane) -> None:
    code, output = await _run_node_test(plane.address, ADMIN_TOKEN, SIDECAR_ALL)
    assert code == 0, f"clients/ts/test/watch.test.ts failed:\n{output}"
    assert "ok: AdminService and SidecarService.Watch from TypeScript" in output
    # The watched tenant was created by the node test and deleted at its end.
    assert [t.name for t in await plane.store.list_tenants()] == []


async def test_the_node_test_fails_clearly_on_a_wrong_admin_token(plane: ControlPlane) -> None:
    code, output = await _run_node_test(plane.address, "kpa-wrong", SIDECAR_ALL)
    assert code == 1, output
    assert "FAIL at AdminService.CreateTenant: Unauthenticated" in output
    assert "kpa-wrong" not in output


def test_the_committed_stubs_are_what_buf_generates(tmp_path: Path) -> None:
    subprocess.run(
        [str(_require(BUF)), "generate", "../..", "--template", "buf.gen.yaml", "-o", str(tmp_path)],
        cwd=TS,
        env={**os.environ, "PATH": f"{TS / 'node_modules' / '.bin'}{os.pathsep}{os.environ.get('PATH', '')}"},
        check=True,
        timeout=120,
    )
    fresh, committed = tmp_path / "gen", TS / "gen"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_files = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert fresh_files == committed_files
    assert fresh_files, "buf generated nothing"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, [str(p) for p in fresh_files], shallow=False)
    assert (mismatch, errors) == ([], []), "clients/ts/gen is stale: run `npm --prefix clients/ts run generate`"


def test_the_readme_example_is_the_typechecked_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```typescript\n", readme.index("## Clients in other languages")) + len("```typescript\n")
    snippet = readme[start : readme.index("```\n", start)]
    example = (TS / "src" / "example.ts").read_text()
    code = "".join(line for line in example.splitlines(keepends=True) if not line.startswith("//"))
    assert snippet == code, "README's TypeScript example differs from clients/ts/src/example.ts"
