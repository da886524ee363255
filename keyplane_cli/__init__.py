"""The ``keyplane`` command: run the control plane and sidecars, and administer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from keyplane import __version__
from keyplane_cli.admin import add_admin_commands
from keyplane_cli.admin_client import CliError
from keyplane_cli.affinity import add_affinity_commands
from keyplane_cli.apply import add_apply_commands
from keyplane_cli.audit import add_audit_commands
from keyplane_cli.limits_cmd import add_limits_commands
from keyplane_cli.master_key import add_master_key_commands
from keyplane_cli.proxy_status import add_proxy_status_command
from keyplane_cli.run import add_run_commands
from keyplane_cli.tls_flags import add_dev_certs_command
from keyplane_cli.tokens import add_token_commands
from keyplane_cli.usage import add_usage_commands

__all__ = ["main"]


def build_parser(handlers: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyplane", description="The control plane for LLM provider keys.")
    parser.add_argument("--version", action="version", version=f"keyplane {__version__}")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    add_run_commands(sub, handlers)
    add_admin_commands(sub, handlers)
    add_limits_commands(sub, handlers)
    add_apply_commands(sub, handlers)
    add_audit_commands(sub, handlers)
    add_proxy_status_command(sub, handlers)
    add_usage_commands(sub, handlers)
    add_token_commands(sub, handlers)
    add_affinity_commands(sub, handlers)
    add_master_key_commands(sub, handlers)
    add_dev_certs_command(sub, handlers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    args = build_parser(handlers).parse_args(argv)
    try:
        return handlers[args.group](args)
    except CliError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
