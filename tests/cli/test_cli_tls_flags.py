"""The TLS flags and their environment variables, the plaintext-on-loopback-only
rule, and ``keyplane dev-certs``."""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from control_plane.config import ControlPlaneConfig
from keyplane.health.machine import HealthPolicy
from keyplane.tls import ClientTls, ServerTls, TlsError, is_loopback_listen
from keyplane_cli import build_parser, main
from keyplane_cli.run import sidecar_config_from_args
from keyplane_cli.tls_flags import client_tls_from_args, server_tls_from_args


def _parse(*argv: str) -> argparse.Namespace:
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    return build_parser(handlers).parse_args(list(argv))


CP = ("control-plane", "--store", "sqlite:///unused.db")


def test_control_plane_flags() -> None:
    args = _parse(*CP, "--tls-cert", "s.crt", "--tls-key", "s.key", "--client-ca", "ca.crt")
    assert server_tls_from_args(args, {}) == ServerTls(Path("s.crt"), Path("s.key"), Path("ca.crt"))
    assert server_tls_from_args(_parse(*CP), {}) is None
    assert _parse(*CP).insecure_plaintext is False
    assert _parse(*CP, "--insecure-plaintext").insecure_plaintext is True


def test_control_plane_environment_and_flags_winning() -> None:
    env = {"KEYPLANE_TLS_CERT": "env.crt", "KEYPLANE_TLS_KEY": "env.key", "KEYPLANE_TLS_CLIENT_CA": "env-ca.crt"}
    assert server_tls_from_args(_parse(*CP), env) == ServerTls(Path("env.crt"), Path("env.key"), Path("env-ca.crt"))
    args = _parse(*CP, "--tls-cert", "flag.crt")
    assert server_tls_from_args(args, env) == ServerTls(Path("flag.crt"), Path("env.key"), Path("env-ca.crt"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert", "s.crt"), "both --tls-cert and --tls-key"),
        (("--tls-key", "s.key"), "both --tls-cert and --tls-key"),
        (("--client-ca", "ca.crt"), "--client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_incomplete_control_plane_tls_is_an_error(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(TlsError, match=message):
        server_tls_from_args(_parse(*CP, *flags), {})


def test_sidecar_flags_reach_its_config(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca.crt", "c.crt", "c.key")}
    for path in files.values():
        path.write_text("x")
    args = _parse(
        "sidecar",
        "--control-plane",
        "10.0.0.7:50051",
        "--tls-ca",
        str(files["ca.crt"]),
        "--tls-cert",
        str(files["c.crt"]),
        "--tls-key",
        str(files["c.key"]),
        "--tls-server-name",
        "keyplane.internal",
    )
    config = sidecar_config_from_args(args, "token", HealthPolicy())
    assert config.control_plane_tls == ClientTls(
        files["ca.crt"], files["c.crt"], files["c.key"], server_name="keyplane.internal"
    )
    assert sidecar_config_from_args(_parse("sidecar"), "token", HealthPolicy()).control_plane_tls is None
    missing = _parse("sidecar", "--tls-ca", str(tmp_path / "nope.crt"))
    with pytest.raises(ValueError, match="control-plane TLS file is not a file"):
        sidecar_config_from_args(missing, "token", HealthPolicy())


def test_client_flags_of_the_admin_commands_and_their_environment() -> None:
    args = _parse("tenants", "list", "--tls-ca", "ca.crt", "--tls-cert", "c.crt", "--tls-key", "c.key")
    assert client_tls_from_args(args, {}) == ClientTls(Path("ca.crt"), Path("c.crt"), Path("c.key"))
    plain = _parse("tenants", "list")
    assert client_tls_from_args(plain, {}) is None
    # TLS against the system's CAs: --tls or KEYPLANE_TLS=1, or any TLS setting.
    assert client_tls_from_args(_parse("tenants", "list", "--tls"), {}) == ClientTls()
    assert client_tls_from_args(plain, {"KEYPLANE_TLS": "1"}) == ClientTls()
    assert client_tls_from_args(plain, {"KEYPLANE_TLS": "0"}) is None
    env = {
        "KEYPLANE_TLS_CA": "e-ca.crt",
        "KEYPLANE_TLS_CERT": "e.crt",
        "KEYPLANE_TLS_KEY": "e.key",
        "KEYPLANE_TLS_SERVER_NAME": "kp.internal",
    }
    assert client_tls_from_args(plain, env) == ClientTls(Path("e-ca.crt"), Path("e.crt"), Path("e.key"), "kp.internal")
    override = _parse("keys", "list", "-t", "acme", "--tls-server-name", "flag.internal")
    tls = client_tls_from_args(override, env)
    assert tls is not None and tls.server_name == "flag.internal"
    with pytest.raises(TlsError, match="both --tls-cert and --tls-key"):
        client_tls_from_args(_parse("tenants", "list", "--tls-cert", "c.crt"), {})


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.3.4.5:0", True),
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("[::1]:50051", True),
        ("unix:/run/keyplane.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("keyplane.internal:50051", False),
        ("localhost.evil.example:50051", False),
    ],
)
def test_which_addresses_are_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback_listen(listen) is loopback


def _cp_config(**overrides: object) -> ControlPlaneConfig:
    values: dict[str, object] = {"store_url": "sqlite:///x.db", "admin_token": "adm", "master_key": os.urandom(32)}
    values.update(overrides)
    return ControlPlaneConfig(**values)  # type: ignore[arg-type]


def test_plaintext_only_on_loopback_unless_forced() -> None:
    with pytest.raises(ValueError, match=r"refusing to serve plaintext gRPC on 0\.0\.0\.0:50051") as caught:
        _cp_config(listen="0.0.0.0:50051")
    assert "--tls-cert" in str(caught.value) and "--insecure-plaintext" in str(caught.value)
    assert _cp_config(listen="127.0.0.1:50051").tls is None
    assert _cp_config(listen="0.0.0.0:50051", insecure_plaintext=True).insecure_plaintext
    tls = ServerTls(Path("s.crt"), Path("s.key"))
    assert _cp_config(listen="0.0.0.0:50051", tls=tls).tls == tls
    assert "tls=ServerTls(" in repr(_cp_config(listen="0.0.0.0:50051", tls=tls))


def test_dev_certs_writes_a_ca_a_server_and_a_client_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["dev-certs", "--out", str(out), "--hosts", "keyplane.internal,127.0.0.1", "--days", "7"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    client = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server, client):
        assert leaf.issuer == ca.subject
        leaf.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["keyplane.internal"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    printed = capsys.readouterr().out
    assert f"--tls-cert {out / 'server.crt'}" in printed and f"--tls-ca {out / 'ca.crt'}" in printed

    # It never overwrites silently.
    before = (out / "ca.crt").read_bytes()
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        main(["dev-certs", "--out", str(out)])
    assert (out / "ca.crt").read_bytes() == before
    assert main(["dev-certs", "--out", str(out), "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != before


def test_up_refuses_a_public_address_before_touching_anything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with pytest.raises(SystemExit, match=r"up: refusing to serve plaintext gRPC on 0\.0\.0\.0:50051"):
        main(["up", "--home", str(home), "--listen", "0.0.0.0:50051", "--port", "0"])
    assert not home.exists()
