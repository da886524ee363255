"""The flags of what a sidecar does when no key can serve (``--no-panic-routing``,
``--panic-probe-wait``, ``--max-rate-limit-wait``), through the real parser into
the config ``keyplane sidecar`` and ``keyplane up`` run with."""

from __future__ import annotations

import argparse

import pytest

from keyplane.health.machine import HealthPolicy
from keyplane.health.panic import PanicPolicy
from keyplane_cli import build_parser
from keyplane_cli.panic_flags import DEFAULT_MAX_RATE_LIMIT_WAIT, DEFAULT_PROBE_WAIT, panic_policy_from_args
from keyplane_cli.run import sidecar_config_from_args


def parse(command: str, *argv: str) -> argparse.Namespace:
    handlers: dict[str, object] = {}
    return build_parser(handlers).parse_args([command, *argv])  # type: ignore[arg-type]


def test_defaults_are_the_policys() -> None:
    assert sidecar_config_from_args(parse("sidecar"), "tok", HealthPolicy()).panic_policy == PanicPolicy()
    assert (DEFAULT_PROBE_WAIT, DEFAULT_MAX_RATE_LIMIT_WAIT) == (
        PanicPolicy().probe_wait,
        PanicPolicy().max_rate_limit_wait,
    )


@pytest.mark.parametrize("command", ["sidecar", "up"])
def test_flags_reach_the_policy(command: str) -> None:
    args = parse(command, "--no-panic-routing", "--panic-probe-wait=0.5", "--max-rate-limit-wait=0")
    assert panic_policy_from_args(args) == PanicPolicy(enabled=False, probe_wait=0.5, max_rate_limit_wait=0.0)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_values_are_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("sidecar", f"--max-rate-limit-wait={value}")
    assert exc.value.code == 2
    assert "--max-rate-limit-wait" in capsys.readouterr().err
