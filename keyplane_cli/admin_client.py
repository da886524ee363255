"""The CLI's way to the admin API: flags saying where it is and how to reach it,
the admin token, one synchronous client, and RPC errors as one line.

Every admin command module (``admin``, ``apply``, ``audit``, ``tokens``, ...)
builds on this one; none imports another command module for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from keyplane.home import Home, read_token_file
from keyplane.tls import ClientTls, TlsError, channel_credentials, channel_options
from keyplane.v1 import admin_service_pb2_grpc as admin_grpc
from keyplane_cli.output import add_output_flags
from keyplane_cli.tls_flags import add_client_tls_flags, client_tls_from_args

__all__ = [
    "ADMIN_TOKEN_ENV",
    "DEFAULT_SERVER",
    "RPC_TIMEOUT",
    "SERVER_ENV",
    "AdminClient",
    "CliError",
    "admin_flags",
    "admin_token",
    "connection_flags",
    "with_admin_client",
]

SERVER_ENV = "KEYPLANE_SERVER"
ADMIN_TOKEN_ENV = "KEYPLANE_ADMIN_TOKEN"
DEFAULT_SERVER = "127.0.0.1:50051"
RPC_TIMEOUT = 10.0


class CliError(Exception):
    """A user-facing error: printed as ``error: ...`` with exit code 1/2."""


class AdminClient:
    """A thin synchronous client: one channel (TLS when ``tls``), the admin token on every call."""

    def __init__(self, server: str, token: str, tls: ClientTls | None = None) -> None:
        if tls is None:
            self._channel = grpc.insecure_channel(server)
        else:
            self._channel = grpc.secure_channel(server, channel_credentials(tls), options=channel_options(tls))
        self._stub = admin_grpc.AdminServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.last_response: Message | None = None

    def call(self, method: str, request: Message, *, timeout: float = RPC_TIMEOUT) -> Any:
        rpc: Callable[..., Any] = getattr(self._stub, method)
        self.last_response = rpc(request, metadata=self._metadata, timeout=timeout)
        return self.last_response

    def close(self) -> None:
        self._channel.close()


def admin_token(args: argparse.Namespace) -> str:
    if args.admin_token_file:
        return read_token_file(args.admin_token_file)
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env:
        return env.strip()
    path = Home.default().admin_token_file
    if path.exists():
        return read_token_file(path)
    raise CliError(
        f"no admin token: {path} does not exist and {ADMIN_TOKEN_ENV} is not set; pass --admin-token-file, "
        f"set {ADMIN_TOKEN_ENV}, or run 'keyplane up' first (it writes {path})"
    )


def with_admin_client(args: argparse.Namespace, body: Callable[[AdminClient], int]) -> int:
    """Run ``body`` with a client of the admin API (``--server``, the admin
    token, the TLS flags): an RPC error is one line on stderr and exit code 1."""
    try:
        client = AdminClient(args.server, admin_token(args), client_tls_from_args(args))
    except TlsError as exc:
        raise CliError(str(exc)) from None
    try:
        return body(client)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "ERROR"
        sys.stderr.write(f"error: {name}: {details}\n")
        return 1
    finally:
        client.close()


def connection_flags(parser: argparse.ArgumentParser) -> None:
    """Where the admin API is and how to reach it: --server, the admin token, TLS."""
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"control plane address (env {SERVER_ENV}, default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help=f"file holding the admin token (else env {ADMIN_TOKEN_ENV}, else $KEYPLANE_HOME/admin.token)",
    )
    add_client_tls_flags(parser)


def admin_flags(parser: argparse.ArgumentParser) -> None:
    """The connection flags and ``-o``: what every admin command takes."""
    connection_flags(parser)
    add_output_flags(parser)
