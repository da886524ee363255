"""The usage flags, through the real parser: ``keyplane sidecar --no-usage-accounting``
into the sidecar's config; ``--usage-flush-interval`` / ``--usage-retention-days`` of
``keyplane control-plane`` and ``keyplane up``; bad values are refused."""

from __future__ import annotations

import argparse

import pytest

from keyplane.health.machine import HealthPolicy
from keyplane_cli import build_parser
from keyplane_cli.run import sidecar_config_from_args
from keyplane_cli.usage import dollars, micros_per_million
from keyplane_cli.usage_flags import usage_options_from_args


def parse(*argv: str) -> argparse.Namespace:
    handlers: dict[str, object] = {}
    return build_parser(handlers).parse_args(list(argv))  # type: ignore[arg-type]


def test_sidecar_accounting_is_on_unless_turned_off() -> None:
    assert sidecar_config_from_args(parse("sidecar"), "tok", HealthPolicy()).usage_accounting is True
    off = sidecar_config_from_args(parse("sidecar", "--no-usage-accounting"), "tok", HealthPolicy())
    assert off.usage_accounting is False


@pytest.mark.parametrize("command", ["control-plane", "up"])
def test_control_plane_usage_flags(command: str) -> None:
    base = [command, "--store", "sqlite:///kp.db"] if command == "control-plane" else [command]
    assert usage_options_from_args(parse(*base)) == {"usage_flush_interval": 1.0, "usage_retention_days": 90.0}
    args = parse(*base, "--usage-flush-interval", "0.25", "--usage-retention-days", "0")
    assert usage_options_from_args(args) == {"usage_flush_interval": 0.25, "usage_retention_days": 0.0}


@pytest.mark.parametrize("bad", [["--usage-flush-interval", "0"], ["--usage-retention-days", "-1"]])
def test_bad_usage_flags_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("up", *bad)
    assert "usage" in capsys.readouterr().err


def test_prices_in_dollars() -> None:
    assert micros_per_million("0.15") == 150_000
    assert micros_per_million("$2.5") == 2_500_000
    assert dollars(9_900_000) == "$9.900000"
    for bad in ("-1", "abc", "0.0000001", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            micros_per_million(bad)
