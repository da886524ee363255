"""TLS flags of the control plane, the sidecar and the admin commands, and
``keyplane dev-certs``. A flag wins over its environment variable.

``--tls-cert``/``--tls-key`` are always the certificate this process presents:
the server's on ``control-plane``, the client's (mTLS) on ``sidecar`` and the
admin commands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keyplane.tls import ClientTls, ServerTls, TlsError

__all__ = [
    "add_client_tls_flags",
    "add_dev_certs_command",
    "add_server_tls_flags",
    "client_tls_from_args",
    "server_tls_from_args",
]

TLS_ENV = "KEYPLANE_TLS"
TLS_CA_ENV = "KEYPLANE_TLS_CA"
TLS_CERT_ENV = "KEYPLANE_TLS_CERT"
TLS_KEY_ENV = "KEYPLANE_TLS_KEY"
TLS_SERVER_NAME_ENV = "KEYPLANE_TLS_SERVER_NAME"
TLS_CLIENT_CA_ENV = "KEYPLANE_TLS_CLIENT_CA"
_TRUE = {"1", "true", "yes", "on"}


def add_server_tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (plaintext is refused on non-loopback addresses)")
    group.add_argument("--tls-cert", type=Path, help=f"server certificate chain, PEM (env {TLS_CERT_ENV})")
    group.add_argument("--tls-key", type=Path, help=f"server private key, PEM (env {TLS_KEY_ENV})")
    group.add_argument(
        "--client-ca",
        type=Path,
        help=f"require client certificates signed by this CA, PEM: mTLS (env {TLS_CLIENT_CA_ENV}); "
        "the bearer tokens are still checked",
    )
    group.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="serve plaintext gRPC on a non-loopback address (tokens and provider secrets travel in the clear)",
    )


def add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS to the control plane")
    group.add_argument(
        "--tls",
        action="store_true",
        help=f"use TLS with the system's CAs (implied by the flags below; env {TLS_ENV}=1)",
    )
    group.add_argument("--tls-ca", type=Path, help=f"CA that signed the control plane's certificate (env {TLS_CA_ENV})")
    group.add_argument("--tls-cert", type=Path, help=f"client certificate for mTLS, PEM (env {TLS_CERT_ENV})")
    group.add_argument("--tls-key", type=Path, help=f"client private key for mTLS, PEM (env {TLS_KEY_ENV})")
    group.add_argument(
        "--tls-server-name",
        help=f"name to check the server certificate against, when not the --server/--control-plane host "
        f"(env {TLS_SERVER_NAME_ENV})",
    )


def _pick(args: argparse.Namespace, attr: str, env: Mapping[str, str], name: str) -> Any:
    value = getattr(args, attr, None)
    if value is not None:
        return value
    text = env.get(name, "").strip()
    return text or None


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


def server_tls_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerTls | None:
    """``TlsError`` for an incomplete combination; None when no TLS flag is set."""
    env = os.environ if env is None else env
    cert = _path(_pick(args, "tls_cert", env, TLS_CERT_ENV))
    key = _path(_pick(args, "tls_key", env, TLS_KEY_ENV))
    client_ca = _path(_pick(args, "client_ca", env, TLS_CLIENT_CA_ENV))
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsError("--client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise TlsError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(cert_file=cert, key_file=key, client_ca_file=client_ca)


def client_tls_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ClientTls | None:
    """``TlsError`` for an incomplete combination; None when TLS is not asked for."""
    env = os.environ if env is None else env
    ca = _path(_pick(args, "tls_ca", env, TLS_CA_ENV))
    cert = _path(_pick(args, "tls_cert", env, TLS_CERT_ENV))
    key = _path(_pick(args, "tls_key", env, TLS_KEY_ENV))
    server_name = _pick(args, "tls_server_name", env, TLS_SERVER_NAME_ENV)
    wanted = bool(getattr(args, "tls", False)) or env.get(TLS_ENV, "").strip().lower() in _TRUE
    if not wanted and ca is None and cert is None and key is None and server_name is None:
        return None
    if (cert is None) != (key is None):
        raise TlsError("a client certificate needs both --tls-cert and --tls-key")
    return ClientTls(ca_file=ca, cert_file=cert, key_file=key, server_name=server_name)


def _run_dev_certs(args: argparse.Namespace) -> int:
    from keyplane.devcerts import write_dev_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if args.days < 1:
        raise SystemExit("dev-certs: --days must be at least 1")
    try:
        files = write_dev_certs(args.out, hosts, client_name=args.client_name, days=args.days, force=args.force)
    except (FileExistsError, ValueError) as exc:
        raise SystemExit(f"dev-certs: {exc}") from None
    print(
        f"wrote {files.ca_cert} (CA), {files.server_cert} + server.key (for {', '.join(hosts)}), "
        f"{files.client_cert} + client.key (CN={args.client_name}); keys are mode 0600\n"
        f"control plane: --tls-cert {files.server_cert} --tls-key {files.server_key} --client-ca {files.ca_cert}\n"
        f"sidecar/admin: --tls-ca {files.ca_cert} --tls-cert {files.client_cert} --tls-key {files.client_key}",
        flush=True,
    )
    return 0


def add_dev_certs_command(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    parser = sub.add_parser(
        "dev-certs", help="make a test CA, a server certificate and a client certificate (for trying out TLS/mTLS)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write them to (created 0700)")
    parser.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="comma-separated DNS names and IP addresses for the server certificate (default localhost,127.0.0.1)",
    )
    parser.add_argument("--client-name", default="keyplane-client", help="common name of the client certificate")
    parser.add_argument("--days", type=int, default=90, help="validity of the server and client certificates")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    handlers["dev-certs"] = _run_dev_certs
