"""The README's TLS deployment, end to end through the real ``keyplane`` command:
``keyplane dev-certs`` makes the certificates, ``keyplane control-plane`` serves
mTLS, the admin commands and ``keyplane sidecar`` connect with their client
certificates, and an app's request is proxied to a real local upstream."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import CliResult, child_env, cli, start
from tests.e2e.test_quickstart import _wait_until_served
from tests.fakes.upstream import FakeUpstream

ADMIN_TOKEN = "adm-tls-e2e-0a1b2c3d4e5f"
SIDECAR_TOKEN = "sc-tls-e2e-6a7b8c9d0e1f"
SECRET = "sk-upstream-tls-e2e-0001"
SERVER_NAME = "keyplane.test"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return child_env(tmp_path / "home", {"KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), **extra})


def _no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_control_plane_and_sidecar_over_mtls(tmp_path: Path, upstream: FakeUpstream) -> None:
    certs = tmp_path / "certs"
    env = _env(tmp_path)
    made = await cli(["dev-certs", "--out", str(certs), "--hosts", f"{SERVER_NAME},localhost"], env)
    assert made.code == 0, made.stderr
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "sidecar.tokens").write_text(f"{SIDECAR_TOKEN} acme\n")
    (tmp_path / "sidecar.token").write_text(SIDECAR_TOKEN + "\n")

    plane = await start(
        [
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path / 'keyplane.db'}",
            "--admin-token-file",
            str(tmp_path / "admin.token"),
            "--sidecar-tokens-file",
            str(tmp_path / "sidecar.tokens"),
            "--tls-cert",
            str(certs / "server.crt"),
            "--tls-key",
            str(certs / "server.key"),
            "--client-ca",
            str(certs / "ca.crt"),
        ],
        env,
        r"control plane listening on port \d+",
    )
    processes = [plane]
    try:
        port = plane.find(r"listening on port (\d+)").group(1)
        target = f"127.0.0.1:{port}"
        # The admin commands, with their TLS settings from the environment.
        admin_env = {
            **env,
            "KEYPLANE_SERVER": target,
            "KEYPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "KEYPLANE_TLS_CA": str(certs / "ca.crt"),
            "KEYPLANE_TLS_CERT": str(certs / "client.crt"),
            "KEYPLANE_TLS_KEY": str(certs / "client.key"),
            "KEYPLANE_TLS_SERVER_NAME": SERVER_NAME,
        }

        async def admin(*args: str, stdin: str | None = None) -> str:
            result = await cli(list(args), admin_env, stdin)
            assert result.code == 0, f"keyplane {' '.join(args)}: {result.stderr}"
            return result.stdout

        await admin("tenants", "create", "acme")
        await admin(
            "keys",
            "add",
            "-t",
            "acme",
            "-p",
            "openai_compatible",
            "-l",
            "only",
            "--base-url",
            upstream.base_url,
            "--secret-stdin",
            stdin=SECRET + "\n",
        )
        await admin("routes", "add", "-t", "acme", "-m", "gpt-test", "--target", "openai_compatible:upstream-model")
        issued = await admin("client-keys", "create", "-t", "acme", "-l", "app")
        token = re.search(r"token \(shown once.*\): (\S+)", issued)
        assert token, issued

        # Without its client certificate (or in plaintext) the admin CLI is turned away, in one line.
        no_cert = {k: v for k, v in admin_env.items() if k not in ("KEYPLANE_TLS_CERT", "KEYPLANE_TLS_KEY")}
        refused = await cli(["tenants", "list"], no_cert)
        assert refused.code == 1 and refused.stderr.startswith("error: UNAVAILABLE"), refused.stderr
        _no_traceback(refused)
        plain = {k: v for k, v in admin_env.items() if not k.startswith("KEYPLANE_TLS")}
        refused = await cli(["tenants", "list"], plain)
        assert refused.code == 1 and refused.stderr.startswith("error: UNAVAILABLE"), refused.stderr
        # The flags work as well as the environment (and win over it).
        flags = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt")]
        flags += ["--tls-key", str(certs / "client.key"), "--tls-server-name", SERVER_NAME]
        listed = await cli(["tenants", "list", *flags], {**plain, "KEYPLANE_TLS_SERVER_NAME": "wrong.test"})
        assert listed.code == 0 and listed.stdout.split() == ["TENANT", "acme"], listed.stderr

        sidecar = await start(
            [
                "sidecar",
                "--control-plane",
                target,
                "--token-file",
                str(tmp_path / "sidecar.token"),
                "--port",
                "0",
                "--tls-ca",
                str(certs / "ca.crt"),
                "--tls-cert",
                str(certs / "client.crt"),
                "--tls-key",
                str(certs / "client.key"),
                "--tls-server-name",
                SERVER_NAME,
            ],
            env,
            r"sidecar listening on http://",
        )
        processes.append(sidecar)
        url = sidecar.find(r"listening on (http://\S+/v1)").group(1)
        await _wait_until_served(url, token.group(1))
        async with httpx.AsyncClient(timeout=20.0) as client:
            reply = await client.post(
                f"{url}/chat/completions",
                headers={"authorization": f"Bearer {token.group(1)}"},
                json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream!"
        assert upstream.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    finally:
        for process in reversed(processes):
            assert await process.stop() == 0, process.output


async def test_plaintext_on_a_public_address_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    env = _env(tmp_path, KEYPLANE_SIDECAR_TOKEN=SIDECAR_TOKEN)
    store = tmp_path / "never.db"
    args = ["control-plane", "--store", f"sqlite:///{store}", "--admin-token-file", str(tmp_path / "admin.token")]
    result = await cli(args, env)  # the default --listen is 0.0.0.0:50051
    assert result.code == 1
    assert result.stderr.startswith("control-plane: refusing to serve plaintext gRPC on 0.0.0.0:50051"), result.stderr
    assert "--insecure-plaintext" in result.stderr
    _no_traceback(result)
    assert not store.exists()  # refused before touching anything

    result = await cli([*args, "--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(tmp_path / "k")], env)
    assert result.code == 1
    assert result.stderr.startswith("control-plane: cannot read the TLS certificate"), result.stderr
    _no_traceback(result)
    assert not store.exists()
