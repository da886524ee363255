"""The stumbles a new user met, each now a clear one-line answer from the
real ``keyplane`` command: busy ports, a secret prompt without a terminal, a
missing admin token, a route to a provider without keys, and flags without
help."""

from __future__ import annotations

import argparse
import base64
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyplane_cli import build_parser
from tests.e2e.deployment import Deployment
from tests.e2e.processes import child_env, cli


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def plane_env(tmp_path: Path) -> dict[str, str]:
    return child_env(
        tmp_path / "home",
        {
            "KEYPLANE_ADMIN_TOKEN": "kpa-cli-errors-0123456789",
            "KEYPLANE_SIDECAR_TOKEN": "kps-cli-errors-0123456789",
            "KEYPLANE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        },
    )


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["control-plane", "sidecar", "up-grpc", "up-http"])
async def test_a_busy_port_is_one_line_naming_the_address_and_flag(
    command: str, busy_port: int, plane_env: dict[str, str], tmp_path: Path
) -> None:
    address = f"127.0.0.1:{busy_port}"
    argv = {
        "control-plane": ["control-plane", "--listen", address, "--store", f"sqlite:///{tmp_path / 'kp.db'}"],
        "sidecar": ["sidecar", "--port", str(busy_port), "--control-plane", "127.0.0.1:1"],
        "up-grpc": ["up", "--listen", address, "--port", "0"],
        "up-http": ["up", "--listen", "127.0.0.1:0", "--port", str(busy_port)],
    }[command]
    result = await cli(argv, plane_env)
    assert result.code == 1
    line = _one_line(result.stderr)
    assert line.startswith(f"keyplane: cannot listen on {address}: ")
    assert ("--listen" if command in ("control-plane", "up-grpc") else "--host/--port") in line


async def test_keys_add_without_a_secret_source_and_no_terminal_says_what_to_do(deployment: Deployment) -> None:
    await deployment.ok("tenants", "create", "acme")
    result = await deployment.cli("keys", "add", "-t", "acme", "-p", "openai", "-l", "main")
    assert result.code == 2
    assert _one_line(result.stderr) == (
        "error: no secret given and stdin is not a terminal: use --secret-env VAR or --secret-stdin"
    )
    listed = await deployment.ok("keys", "list", "-t", "acme")
    assert "(no keys)" in listed


async def test_a_missing_admin_token_names_where_it_was_looked_for(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    result = await cli(["tenants", "list", "--server", "127.0.0.1:1"], child_env(home))
    assert result.code == 2
    line = _one_line(result.stderr)
    assert str(home / "admin.token") in line
    assert "KEYPLANE_ADMIN_TOKEN" in line and "--admin-token-file" in line


async def test_a_route_to_a_provider_without_keys_warns_and_strict_refuses(deployment: Deployment) -> None:
    await deployment.ok("tenants", "create", "acme")
    strict = await deployment.cli(
        "routes", "add", "-t", "acme", "-m", "gpt-4o-mini", "--target", "openai:gpt-4o-mini", "--strict"
    )
    assert strict.code == 2
    assert "no active key in tenant 'acme' for provider(s) openai" in strict.stderr
    assert "nothing was changed" in strict.stderr
    assert "(no routes)" in await deployment.ok("routes", "list", "-t", "acme")
    warned = await deployment.cli("routes", "add", "-t", "acme", "-m", "gpt-4o-mini", "--target", "openai:gpt-4o-mini")
    assert warned.code == 0
    assert warned.stderr.startswith("warning: no active key in tenant 'acme' for provider(s) openai")
    assert "503 no_usable_key" in warned.stderr
    # With a key of that provider, no warning.
    await deployment.ok("keys", "add", "-t", "acme", "-p", "openai", "-l", "main", "--secret-stdin", stdin="sk-a1\n")
    quiet = await deployment.cli("routes", "add", "-t", "acme", "-m", "other", "--target", "openai:gpt-4o", "--strict")
    assert (quiet.code, quiet.stderr) == (0, "")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_of_every_command_has_help_text() -> None:
    missing = [
        f"{parser.prog} {action.option_strings[0] if action.option_strings else action.dest}"
        for parser in _parsers(build_parser({}))
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction))
        and not action.help
    ]
    assert missing == []
