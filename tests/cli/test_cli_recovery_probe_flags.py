"""The recovery-probe flags: parsing, defaults that match the config, bad values refused."""

from __future__ import annotations

import argparse

import pytest

from control_plane.recovery_probe import RecoveryProbeConfig
from keyplane.domain import Provider
from keyplane_cli import recovery_probe_flags as flags


def parse(*argv: str) -> RecoveryProbeConfig:
    parser = argparse.ArgumentParser()
    flags.add_recovery_probe_flags(parser)
    return flags.recovery_probe_from_args(parser.parse_args(list(argv)))


def test_defaults_match_the_config() -> None:
    assert parse() == RecoveryProbeConfig()
    defaults = RecoveryProbeConfig()
    assert (flags.DEFAULT_INTERVAL, flags.DEFAULT_TIMEOUT, flags.DEFAULT_LEAD) == (
        defaults.interval,
        defaults.timeout,
        defaults.lead,
    )
    assert flags.PROBE_KINDS == ("completion", "models")


def test_values_and_kinds_per_provider() -> None:
    got = parse(
        "--recovery-probe",
        "vllm=models",
        "--recovery-probe",
        "openai=completion",
        "--recovery-probe-interval",
        "2",
        "--recovery-probe-timeout",
        "3",
        "--recovery-probe-lead",
        "0",
    )
    assert got.kinds == {Provider.VLLM: "models", Provider.OPENAI: "completion"}
    assert (got.interval, got.timeout, got.lead, got.enabled) == (2.0, 3.0, 0.0, True)
    assert got.kind(Provider.ANTHROPIC) == "completion"
    assert not parse("--no-recovery-probe").enabled


@pytest.mark.parametrize(
    "argv",
    [
        ("--recovery-probe", "nope=models"),
        ("--recovery-probe", "openai=ping"),
        ("--recovery-probe", "openai"),
        ("--recovery-probe-interval", "0"),
        ("--recovery-probe-timeout", "-1"),
        ("--recovery-probe-lead", "soon"),
    ],
)
def test_bad_values_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
