"""The health-policy flags of ``keyplane control-plane``, ``sidecar`` and ``up``,
through the real parser. (tests/e2e/test_health_flags.py checks that they reach
the running processes.)"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from control_plane.config import ControlPlaneConfig
from keyplane.health.machine import HealthPolicy
from keyplane_cli import build_parser
from keyplane_cli.health_flags import (
    AGGREGATOR_SETTINGS,
    POLICY_SETTINGS,
    aggregator_intervals_from_args,
    health_policy_from_args,
)

CONTROL_PLANE = ("control-plane", "--store", "sqlite:///unused.db")
SIDECAR = ("sidecar",)
UP = ("up",)

EVERY_POLICY_FLAG = (
    "--health-error-window=30",
    "--health-error-threshold=5",
    "--health-base-cooldown=2.5",
    "--health-max-cooldown=120",
    "--health-rate-limit-default=3",
    "--health-provider-window=45",
    "--health-provider-threshold=4",
    "--health-provider-cooldown=15",
    "--health-idle-ttl=600",
    "--health-max-entries=5000",
)
EVERY_POLICY = HealthPolicy(
    error_window=30.0,
    error_threshold=5,
    base_cooldown=2.5,
    max_cooldown=120.0,
    rate_limit_default=3.0,
    provider_window=45.0,
    provider_threshold=4,
    provider_cooldown=15.0,
    idle_ttl=600.0,
    max_entries=5000,
)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser({}).parse_args(list(argv))


def test_every_tunable_has_a_flag() -> None:
    assert [s.name for s in POLICY_SETTINGS] == [f.name for f in dataclasses.fields(HealthPolicy)]
    aggregator_fields = [
        f.name
        for f in dataclasses.fields(ControlPlaneConfig)
        if f.name.startswith("health_") and f.name != "health_policy"
    ]
    assert ["health_" + s.name for s in AGGREGATOR_SETTINGS] == aggregator_fields


@pytest.mark.parametrize("command", [CONTROL_PLANE, SIDECAR, UP])
def test_no_flags_no_environment_means_the_defaults(command: tuple[str, ...]) -> None:
    args = parse(*command)
    assert health_policy_from_args(args, {}) == HealthPolicy()
    assert aggregator_intervals_from_args(args, {}) == {}


@pytest.mark.parametrize("command", [CONTROL_PLANE, SIDECAR, UP])
def test_flags_set_every_field_of_the_policy(command: tuple[str, ...]) -> None:
    assert health_policy_from_args(parse(*command, *EVERY_POLICY_FLAG), {}) == EVERY_POLICY
    # The space-separated form too.
    args = parse(*command, "--health-error-threshold", "7", "--health-base-cooldown", "1.5")
    assert health_policy_from_args(args, {}) == HealthPolicy(error_threshold=7, base_cooldown=1.5)


@pytest.mark.parametrize("command", [CONTROL_PLANE, UP])
def test_the_aggregator_intervals_reach_the_control_plane_config(command: tuple[str, ...]) -> None:
    args = parse(*command, "--health-sweep-interval", "7.5", "--health-retry-interval", "0.5")
    intervals = aggregator_intervals_from_args(args, {})
    assert intervals == {"health_sweep_interval": 7.5, "health_retry_interval": 0.5}
    config = ControlPlaneConfig(
        store_url="sqlite:///unused.db",
        admin_token="adm",
        master_key=b"k" * 32,
        health_policy=health_policy_from_args(args, {}),
        **intervals,
    )
    assert (config.health_sweep_interval, config.health_retry_interval) == (7.5, 0.5)


def test_a_sidecar_has_no_aggregator_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*SIDECAR, "--health-sweep-interval", "5")
    assert info.value.code == 2
    assert "unrecognized arguments: --health-sweep-interval" in capsys.readouterr().err


def test_the_environment_fills_in_and_flags_win() -> None:
    env = {
        "KEYPLANE_HEALTH_BASE_COOLDOWN": "20",
        "KEYPLANE_HEALTH_ERROR_THRESHOLD": "4",
        "KEYPLANE_HEALTH_MAX_ENTRIES": "  ",  # blank: ignored
        "KEYPLANE_HEALTH_RETRY_INTERVAL": "0.25",
    }
    args = parse(*CONTROL_PLANE, "--health-error-threshold", "6")
    assert health_policy_from_args(args, env) == HealthPolicy(base_cooldown=20.0, error_threshold=6)
    assert aggregator_intervals_from_args(args, env) == {"health_retry_interval": 0.25}


def test_the_environment_is_read_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYPLANE_HEALTH_PROVIDER_THRESHOLD", "9")
    assert health_policy_from_args(parse(*SIDECAR)) == HealthPolicy(provider_threshold=9)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--health-base-cooldown", "0", "must be a positive number of seconds, got '0'"),
        ("--health-error-window", "-5", "must be a positive number of seconds, got '-5'"),
        ("--health-max-cooldown", "inf", "must be a positive number of seconds, got 'inf'"),
        ("--health-idle-ttl", "nan", "must be a positive number of seconds, got 'nan'"),
        ("--health-rate-limit-default", "soon", "expected a number of seconds, got 'soon'"),
        ("--health-error-threshold", "0", "must be at least 1, got '0'"),
        ("--health-provider-threshold", "-1", "must be at least 1, got '-1'"),
        ("--health-max-entries", "2.5", "expected a whole number, got '2.5'"),
        ("--health-sweep-interval", "0", "must be a positive number of seconds, got '0'"),
        ("--health-retry-interval", "-0.1", "must be a positive number of seconds, got '-0.1'"),
    ],
)
def test_bad_flag_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*CONTROL_PLANE, f"{flag}={value}")
    assert info.value.code == 2
    assert f"keyplane control-plane: error: argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KEYPLANE_HEALTH_PROVIDER_COOLDOWN", "0", "must be a positive number of seconds, got '0'"),
        ("KEYPLANE_HEALTH_ERROR_THRESHOLD", "three", "expected a whole number, got 'three'"),
        ("KEYPLANE_HEALTH_SWEEP_INTERVAL", "-60", "must be a positive number of seconds, got '-60'"),
    ],
)
def test_bad_environment_values_name_the_variable(variable: str, value: str, message: str) -> None:
    args = parse(*CONTROL_PLANE)
    with pytest.raises(SystemExit) as info:
        health_policy_from_args(args, {variable: value})
        aggregator_intervals_from_args(args, {variable: value})
    assert info.value.code == f"{variable}: {message}"
