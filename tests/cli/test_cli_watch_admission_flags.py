"""``--watch-admit-rate`` / ``--watch-admit-burst`` of ``keyplane control-plane`` and ``keyplane up``."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from control_plane.config import ControlPlaneConfig
from keyplane_cli import build_parser
from keyplane_cli.stability_flags import watch_admission_options_from_args

CONTROL_PLANE = ("control-plane", "--store", "sqlite:///unused.db")
UP = ("up",)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser({}).parse_args(list(argv))


@pytest.mark.parametrize("command", [CONTROL_PLANE, UP])
def test_defaults_are_the_config_defaults_and_flags_win(command: tuple[str, ...]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ControlPlaneConfig)}
    assert watch_admission_options_from_args(parse(*command)) == {
        "watch_admit_rate": defaults["watch_admit_rate"],
        "watch_admit_burst": defaults["watch_admit_burst"],
    }
    args = parse(*command, "--watch-admit-rate", "250", "--watch-admit-burst", "50")
    assert watch_admission_options_from_args(args) == {"watch_admit_rate": 250.0, "watch_admit_burst": 50}


@pytest.mark.parametrize("flag,value", [("--watch-admit-rate", "0"), ("--watch-admit-burst", "0")])
def test_bad_values_are_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*CONTROL_PLANE, flag, value)
    assert flag in capsys.readouterr().err
