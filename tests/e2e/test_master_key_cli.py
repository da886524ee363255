"""``keyplane master-key`` end to end: the real command in subprocesses
against ``keyplane control-plane`` on SQLite, started with a single master
key and a keyring file that does not exist yet; rotate, status, add,
rewrap, retire (refused while in use or primary), then a restart with only
the keyring file serves every secret."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from keyplane.keyring import legacy_key_id
from keyplane.keyring_file import read_keyring_file
from keyplane.v1 import sidecar_service_pb2 as spb
from keyplane.v1 import sidecar_service_pb2_grpc
from tests.e2e.processes import CliResult, Running, child_env, cli, start

ADMIN_TOKEN = "adm-mk-cli-1a2b3c4d5e6f"
SIDECAR_TOKEN = "sc-mk-cli-6f5e4d3c2b1a"
K0 = os.urandom(32)
LEGACY = legacy_key_id(K0)
SECRETS = {f"k{n}": f"sk-mk-cli-{n}-PROVIDER-SECRET-xyz" for n in range(3)}


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.keyring = tmp_path / "master.keyring"
        self.env = child_env(
            tmp_path / "home",
            {
                "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
                "KEYPLANE_SIDECAR_TOKEN": SIDECAR_TOKEN,
                "KEYPLANE_MASTER_KEY": base64.b64encode(K0).decode(),
                **{f"SECRET_{label.upper()}": secret for label, secret in SECRETS.items()},
            },
        )
        self.server = ""

    async def control_plane(self, env: dict[str, str]) -> Running:
        running = await start(
            [
                "control-plane",
                "--listen",
                "127.0.0.1:0",
                "--store",
                f"sqlite:///{self.tmp_path / 'keyplane.db'}",
                "--master-keyring-file",
                str(self.keyring),
            ],
            env,
            r"control plane listening on port \d+",
        )
        port = running.find(r"port (\d+)").group(1)
        self.server = f"127.0.0.1:{port}"
        return running

    async def kp(self, *args: str) -> CliResult:
        return await cli([*args, "--server", self.server], self.env)

    async def ok(self, *args: str) -> str:
        result = await self.kp(*args)
        assert result.code == 0, result.stderr
        return result.stdout

    async def wait_primary(self, key_id: str) -> None:
        for _ in range(40):
            if f"new ones are sealed with {key_id}" in await self.ok("master-key", "status"):
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"the control plane never picked up {key_id}")


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    yield Setup(tmp_path)


def _usage(status: str) -> dict[str, int]:
    rows = [line.split() for line in status.splitlines()[1:-1]]
    return {row[0]: int(row[1]) for row in rows}


async def _watched_secrets(server: str) -> dict[str, str]:
    async with aio.insecure_channel(server) as channel:
        stub = sidecar_service_pb2_grpc.SidecarServiceStub(channel)
        call = stub.Watch(
            spb.WatchRequest(sidecar_id="mk-cli-test"), metadata=(("authorization", f"Bearer {SIDECAR_TOKEN}"),)
        )
        message = await asyncio.wait_for(call.read(), 10)
        call.cancel()
    assert isinstance(message, spb.WatchResponse)
    return {k.label: k.secret for t in message.snapshot.tenants for k in t.keys}


async def test_master_key_commands_against_a_running_control_plane(setup: Setup) -> None:
    plane = await setup.control_plane(setup.env)
    try:
        await setup.ok("tenants", "create", "acme")
        for label in SECRETS:
            await setup.ok(
                "keys", "add", "-t", "acme", "-p", "openai", "-l", label, "--secret-env", f"SECRET_{label.upper()}"
            )
        status = await setup.ok("master-key", "status")
        assert _usage(status) == {LEGACY: 3}
        assert status.splitlines()[-1] == f"3 secret(s); new ones are sealed with {LEGACY}"

        # rotate: the first keyring file holds the single key under its legacy id, then the new one.
        out = await setup.ok("master-key", "rotate", "--keyring-file", str(setup.keyring), "--id", "k1")
        assert f"with the current master key as {LEGACY}" in out
        assert "rewrapped 3 secret(s) under master key k1" in out
        assert [key_id for key_id, _ in read_keyring_file(setup.keyring)] == [LEGACY, "k1"]
        assert stat.S_IMODE(setup.keyring.stat().st_mode) == 0o600
        assert _usage(await setup.ok("master-key", "status")) == {LEGACY: 0, "k1": 3}

        # retire refuses the primary, and a key that still seals secrets.
        refused = await setup.kp("master-key", "retire", "k1", "--keyring-file", str(setup.keyring))
        assert refused.code == 2 and "is the primary" in refused.stderr
        out = await setup.ok("master-key", "add", "--keyring-file", str(setup.keyring), "--id", "k2")
        assert "added master key k2" in out
        await setup.wait_primary("k2")
        refused = await setup.kp("master-key", "retire", "k1", "--keyring-file", str(setup.keyring))
        assert refused.code == 2 and "still seals 3 secret(s)" in refused.stderr
        assert [key_id for key_id, _ in read_keyring_file(setup.keyring)] == [LEGACY, "k1", "k2"]

        out = await setup.ok("master-key", "rewrap", "--key-id", "k2", "--batch-size", "2")
        assert "rewrapped 3 secret(s) under master key k2 (3 examined" in out
        again = await setup.ok("master-key", "rewrap")
        assert "rewrapped 0 secret(s) under master key k2 (3 examined, 3 already under it" in again
        for key_id in ("k1", LEGACY):
            out = await setup.ok("master-key", "retire", key_id, "--keyring-file", str(setup.keyring))
            assert f"retired master key {key_id}" in out
        assert [key_id for key_id, _ in read_keyring_file(setup.keyring)] == ["k2"]
        for _ in range(40):  # the control plane re-reads the file within a second
            usage = _usage(await setup.ok("master-key", "status"))
            if usage == {"k2": 3}:
                break
            await asyncio.sleep(0.25)
        assert usage == {"k2": 3}
    finally:
        await plane.stop()
    for secret in SECRETS.values():
        assert secret not in plane.output

    # Restarted with only the keyring file: every secret opens.
    env = {k: v for k, v in setup.env.items() if k != "KEYPLANE_MASTER_KEY"}
    plane = await setup.control_plane(env)
    try:
        assert _usage(await setup.ok("master-key", "status")) == {"k2": 3}
        assert await _watched_secrets(setup.server) == SECRETS
    finally:
        await plane.stop()
    assert "not sent to sidecars" not in plane.output


async def test_rotate_on_one_machine_with_keyplane_up(tmp_path: Path) -> None:
    """``keyplane up`` keeps its single key in $KEYPLANE_HOME/master.key and
    watches $KEYPLANE_HOME/master.keyring: ``master-key rotate`` with no
    flags moves it to a keyring without a restart."""
    home = tmp_path / "home"
    up = await start(["up", "--listen", "127.0.0.1:0", "--port", "0"], child_env(home), r"sidecar listening on http://")
    try:
        target = up.find(r"control plane listening on (\S+)").group(1)
        env = child_env(home, {"KEYPLANE_SERVER": target, "SECRET": SECRETS["k0"]})

        async def ok(*args: str) -> str:
            result = await cli(list(args), env)
            assert result.code == 0, result.stderr
            return result.stdout

        await ok("tenants", "create", "acme")
        await ok("keys", "add", "-t", "acme", "-p", "openai", "-l", "main", "--secret-env", "SECRET")
        legacy = legacy_key_id(base64.b64decode((home / "master.key").read_text()))
        out = await ok("master-key", "rotate")
        new_id = out.split("added master key ")[1].split()[0]
        assert f"rewrapped 1 secret(s) under master key {new_id}" in out
        assert [key_id for key_id, _ in read_keyring_file(home / "master.keyring")] == [legacy, new_id]
        assert _usage(await ok("master-key", "status")) == {legacy: 0, new_id: 1}
        assert f"retired master key {legacy}" in await ok("master-key", "retire", legacy)
    finally:
        assert await up.stop() == 0, up.output

    # Restarted: the keyring file wins over master.key, which no longer opens anything.
    (home / "master.key").unlink()
    up = await start(["up", "--listen", "127.0.0.1:0", "--port", "0"], child_env(home), r"sidecar listening on http://")
    try:
        target = up.find(r"control plane listening on (\S+)").group(1)
        result = await cli(["master-key", "status"], child_env(home, {"KEYPLANE_SERVER": target}))
        assert result.code == 0 and _usage(result.stdout) == {new_id: 1}
    finally:
        assert await up.stop() == 0, up.output
    assert not (home / "master.key").exists()
    assert "not sent to sidecars" not in up.output
