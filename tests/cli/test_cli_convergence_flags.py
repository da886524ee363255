"""The convergence flags, through the real parser into the configs:
``keyplane sidecar --provider/--sidecar-id`` and ``keyplane control-plane
--replica-id/--lag-wait``."""

from __future__ import annotations

import argparse

import pytest

from control_plane.config import ControlPlaneConfig
from keyplane.domain import Provider
from keyplane.health.machine import HealthPolicy
from keyplane_cli import build_parser
from keyplane_cli.convergence_flags import convergence_options_from_args
from keyplane_cli.run import sidecar_config_from_args


def parse(*argv: str) -> argparse.Namespace:
    return build_parser({}).parse_args(list(argv))


def test_sidecar_defaults_serve_every_provider_under_the_default_id() -> None:
    config = sidecar_config_from_args(parse("sidecar"), "tok", HealthPolicy())
    assert config.providers == ()
    assert config.sidecar_id  # <hostname>-<pid>


def test_sidecar_flags() -> None:
    args = parse("sidecar", "--provider", "openai", "--provider", "anthropic", "--sidecar-id", "pod-7")
    config = sidecar_config_from_args(args, "tok", HealthPolicy())
    assert config.providers == (Provider.OPENAI, Provider.ANTHROPIC)
    assert config.sidecar_id == "pod-7"


def test_unknown_provider_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("sidecar", "--provider", "openia")
    assert info.value.code == 2
    assert "unknown provider 'openia'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [("control-plane", "--store", "sqlite:///unused.db"), ("up",)])
def test_control_plane_flags(command: tuple[str, ...]) -> None:
    defaults = convergence_options_from_args(parse(*command))
    assert defaults == {"replica_id": "", "lag_wait": ControlPlaneConfig.lag_wait}
    flagged = convergence_options_from_args(parse(*command, "--replica-id", "cp-a", "--lag-wait", "2.5"))
    assert flagged == {"replica_id": "cp-a", "lag_wait": 2.5}
