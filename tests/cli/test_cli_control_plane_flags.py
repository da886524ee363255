"""``--store-timeout`` and ``--deny-private-base-urls`` of ``keyplane
control-plane`` and ``keyplane up``, through the real parser."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from control_plane.config import ControlPlaneConfig
from keyplane_cli import build_parser
from keyplane_cli.control_plane_flags import DENY_PRIVATE_ENV, STORE_TIMEOUT_ENV, control_plane_options_from_args

CONTROL_PLANE = ("control-plane", "--store", "sqlite:///unused.db")
UP = ("up",)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser({}).parse_args(list(argv))


@pytest.mark.parametrize("command", [CONTROL_PLANE, UP])
def test_defaults_are_the_config_defaults(command: tuple[str, ...]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ControlPlaneConfig)}
    options = control_plane_options_from_args(parse(*command), environ={})
    assert options == {
        "store_timeout": defaults["store_timeout"],
        "deny_private_base_urls": defaults["deny_private_base_urls"],
    }
    assert options["store_timeout"] == 5.0
    assert options["deny_private_base_urls"] is False


@pytest.mark.parametrize("command", [CONTROL_PLANE, UP])
def test_flags(command: tuple[str, ...]) -> None:
    args = parse(*command, "--store-timeout", "2.5", "--deny-private-base-urls")
    assert control_plane_options_from_args(args, environ={}) == {
        "store_timeout": 2.5,
        "deny_private_base_urls": True,
    }


def test_environment_and_flag_precedence() -> None:
    env = {STORE_TIMEOUT_ENV: "7", DENY_PRIVATE_ENV: "true"}
    assert control_plane_options_from_args(parse(*CONTROL_PLANE), environ=env) == {
        "store_timeout": 7.0,
        "deny_private_base_urls": True,
    }
    flagged = parse(*CONTROL_PLANE, "--store-timeout", "1")
    assert control_plane_options_from_args(flagged, environ=env)["store_timeout"] == 1.0
    assert control_plane_options_from_args(parse(*CONTROL_PLANE), environ={DENY_PRIVATE_ENV: "0"}) == {
        "store_timeout": 5.0,
        "deny_private_base_urls": False,
    }


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_store_timeout_flag_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*CONTROL_PLANE, "--store-timeout", value)
    assert info.value.code == 2
    assert "--store-timeout" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "named"),
    [({STORE_TIMEOUT_ENV: "0"}, STORE_TIMEOUT_ENV), ({DENY_PRIVATE_ENV: "maybe"}, DENY_PRIVATE_ENV)],
)
def test_bad_environment_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        control_plane_options_from_args(parse(*CONTROL_PLANE), environ=env)


def test_store_timeout_must_be_positive_in_the_config() -> None:
    with pytest.raises(ValueError, match="store_timeout"):
        ControlPlaneConfig(store_url="sqlite://", admin_token="a", master_key=b"k" * 32, store_timeout=0)


def test_drain_seconds_flag() -> None:
    assert parse(*CONTROL_PLANE).drain_seconds == 5.0
    assert parse(*CONTROL_PLANE, "--drain-seconds", "0").drain_seconds == 0.0
    assert parse(*CONTROL_PLANE, "--drain-seconds", "12.5").drain_seconds == 12.5


@pytest.mark.parametrize("value", ["-1", "inf", "soon"])
def test_bad_drain_seconds_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*CONTROL_PLANE, "--drain-seconds", value)
    assert "--drain-seconds" in capsys.readouterr().err


def test_drain_seconds_must_not_be_negative_in_the_config() -> None:
    with pytest.raises(ValueError, match="drain_seconds"):
        ControlPlaneConfig(store_url="sqlite:///unused.db", admin_token="t", master_key=b"k" * 32, drain_seconds=-1)
