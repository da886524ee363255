"""The app-facing edge flags of ``keyplane sidecar`` and ``keyplane up``, through the real parser."""

from __future__ import annotations

import argparse

import pytest

from keyplane.health.machine import HealthPolicy
from keyplane_cli import build_parser
from keyplane_cli.edge_flags import edge_options_from_args
from keyplane_cli.run import sidecar_config_from_args


def parse(command: str, *argv: str) -> argparse.Namespace:
    handlers: dict[str, object] = {}
    return build_parser(handlers).parse_args([command, *argv])  # type: ignore[arg-type]


def test_defaults() -> None:
    config = sidecar_config_from_args(parse("sidecar"), "tok", HealthPolicy())
    assert config.max_request_head_bytes == 64 * 1024
    assert config.max_request_headers == 100
    assert config.max_body_bytes == 10 * 1024 * 1024
    assert (config.request_head_timeout, config.request_body_timeout) == (10.0, 30.0)


@pytest.mark.parametrize("command", ["sidecar", "up"])
def test_every_edge_flag_reaches_the_config(command: str) -> None:
    args = parse(
        command,
        "--max-request-head-bytes=8192",
        "--max-request-headers=20",
        "--max-request-body-bytes=4096",
        "--request-head-timeout=2.5",
        "--request-body-timeout=7",
    )
    assert edge_options_from_args(args) == {
        "max_request_head_bytes": 8192,
        "max_request_headers": 20,
        "max_body_bytes": 4096,
        "request_head_timeout": 2.5,
        "request_body_timeout": 7.0,
    }
    if command == "sidecar":
        config = sidecar_config_from_args(args, "tok", HealthPolicy())
        assert (config.max_request_head_bytes, config.max_request_headers, config.max_body_bytes) == (8192, 20, 4096)
        assert (config.request_head_timeout, config.request_body_timeout) == (2.5, 7.0)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--max-request-head-bytes=100", "max_request_head_bytes must be at least 1024"),
        ("--max-request-headers=0", "max_request_headers must be at least 1"),
        ("--max-request-body-bytes=0", "max_body_bytes must be positive"),
        ("--request-head-timeout=0", "request_head_timeout must be positive"),
        ("--request-body-timeout=-1", "request_body_timeout must be positive"),
    ],
)
def test_bad_values_are_refused(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sidecar_config_from_args(parse("sidecar", flag), "tok", HealthPolicy())
