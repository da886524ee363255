"""The upstream flags of ``keyplane sidecar``, through the real parser, into the
config the sidecar runs with; bad values are refused before it starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from keyplane.health.machine import HealthPolicy
from keyplane_cli import build_parser
from keyplane_cli.run import sidecar_config_from_args


def parse(*argv: str) -> argparse.Namespace:
    handlers: dict[str, object] = {}
    return build_parser(handlers).parse_args(["sidecar", *argv])  # type: ignore[arg-type]


def test_defaults() -> None:
    config = sidecar_config_from_args(parse(), "tok", HealthPolicy())
    assert (config.upstream_connect_timeout, config.upstream_read_timeout, config.request_timeout) == (10, 600, 600)
    assert config.upstream_limit_per_host == 256
    assert config.upstream_trust_env is False
    assert config.upstream_ca_file is None
    assert config.upstream_ca_file_only is False
    assert (config.upstream_max_header_size, config.upstream_max_headers) == (8190, 128)
    assert config.upstream_max_body_bytes == 64 * 1024 * 1024
    assert config.report_outcomes is True
    assert config.access_log is None  # opt-in


def test_access_log_flag() -> None:
    assert sidecar_config_from_args(parse("--access-log"), "tok", HealthPolicy()).access_log == "-"
    assert sidecar_config_from_args(parse("--access-log", "/var/log/kp.jsonl"), "tok", HealthPolicy()).access_log == (
        "/var/log/kp.jsonl"
    )


def test_every_upstream_flag_reaches_the_config(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = parse(
        "--upstream-connect-timeout=2.5",
        "--upstream-read-timeout=30",
        "--request-timeout=120",
        "--upstream-limit-per-host=16",
        "--upstream-trust-env",
        f"--upstream-ca-file={ca}",
        "--upstream-ca-file-only",
        "--upstream-max-header-size=4096",
        "--upstream-max-headers=64",
        "--upstream-max-body-bytes=1000000",
        "--no-outcome-reports",
        "--tenant=acme",
    )
    config = sidecar_config_from_args(args, "tok", HealthPolicy())
    assert config.upstream_connect_timeout == 2.5
    assert config.upstream_read_timeout == 30
    assert config.request_timeout == 120
    assert config.upstream_limit_per_host == 16
    assert config.upstream_trust_env is True
    assert config.upstream_ca_file == str(ca)
    assert config.upstream_ca_file_only is True
    assert (config.upstream_max_header_size, config.upstream_max_headers) == (4096, 64)
    assert config.upstream_max_body_bytes == 1_000_000
    assert config.report_outcomes is False
    assert config.tenants == ("acme",)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--upstream-connect-timeout=0", "upstream_connect_timeout must be positive"),
        ("--request-timeout=-1", "request_timeout must be positive"),
        ("--upstream-limit-per-host=0", "upstream_limit_per_host must be at least 1"),
        ("--upstream-ca-file=/no/such/ca.pem", "upstream_ca_file is not a file"),
        ("--upstream-ca-file-only", "upstream_ca_file_only needs upstream_ca_file"),
        ("--upstream-max-headers=0", "upstream_max_headers must be at least 1"),
        ("--upstream-max-body-bytes=0", "upstream_max_body_bytes must be at least 1"),
    ],
)
def test_bad_values_are_refused(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sidecar_config_from_args(parse(flag), "tok", HealthPolicy())


def test_static_stability_flags_and_their_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYPLANE_HOME", str(tmp_path / "home"))
    config = sidecar_config_from_args(parse("--port", "8799"), "tok", HealthPolicy())
    assert config.snapshot_file == str(tmp_path / "home" / "sidecar-8799.snapshot")  # on by default
    assert (config.snapshot_key_file, config.max_snapshot_age, config.watch_backoff_cap) == (None, None, 1.0)
    assert sidecar_config_from_args(parse("--no-snapshot-file"), "tok", HealthPolicy()).snapshot_file is None
    key_file = tmp_path / "snap.key"
    key_file.write_text("0123456789abcdef0123456789abcdef")
    config = sidecar_config_from_args(
        parse(
            "--snapshot-file",
            str(tmp_path / "s.snap"),
            "--snapshot-key-file",
            str(key_file),
            "--max-snapshot-age",
            "3600",
            "--watch-backoff-cap",
            "0.5",
        ),
        "tok",
        HealthPolicy(),
    )
    assert config.snapshot_file == str(tmp_path / "s.snap")
    assert (config.snapshot_key_file, config.max_snapshot_age, config.watch_backoff_cap) == (str(key_file), 3600, 0.5)
    with pytest.raises(ValueError, match="contradict"):
        sidecar_config_from_args(parse("--snapshot-file", "x", "--no-snapshot-file"), "tok", HealthPolicy())
    with pytest.raises(SystemExit):
        parse("--max-snapshot-age", "0")


def test_shutdown_flags() -> None:
    default = sidecar_config_from_args(parse(), "tok", HealthPolicy())
    assert (default.shutdown_delay, default.shutdown_grace) == (5.0, 10.0)
    config = sidecar_config_from_args(parse("--shutdown-delay=0", "--shutdown-grace=2.5"), "tok", HealthPolicy())
    assert (config.shutdown_delay, config.shutdown_grace) == (0.0, 2.5)


@pytest.mark.parametrize("flag", ["--shutdown-delay=-1", "--shutdown-grace=nan", "--shutdown-grace=soon"])
def test_bad_shutdown_flags_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(flag)
    assert flag.split("=")[0] in capsys.readouterr().err
