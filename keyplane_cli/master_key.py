"""``keyplane master-key``: rotate the master keys that seal provider secrets.

- ``add``: append a new key to the keyring file (atomically, mode 0600). The
  first ``add`` on a single-key setup writes that key into the file under
  its stable legacy id, so what it sealed still opens. Every control plane
  reading the file (all replicas mount the same secret) picks the new key up
  within about a second and seals new secrets with it.
- ``rewrap``: ask the control plane to re-encrypt every secret under its
  primary key, online and resumably; sidecars see no change.
- ``rotate``: ``add`` then ``rewrap`` (waiting until the control plane has
  re-read the file): for one machine, or a file the CLI shares with the
  control plane. When the control plane runs elsewhere: ``add`` to the
  shared secret, wait until every replica has it (``status``), ``rewrap``.
- ``status``: the keyring the control plane holds and how many secrets each
  master key seals.
- ``retire ID``: remove a key from the keyring file, refused while the
  control plane reports any secret under it, or while it is the primary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import grpc

from keyplane.crypto import MASTER_KEY_ENV, MasterKeyError, load_master_key
from keyplane.home import Home
from keyplane.keyring import legacy_key_id, new_key_id, validate_key_id
from keyplane.keyring_file import KEYRING_ENV, read_keyring_file, write_keyring_file
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane_cli.admin_client import AdminClient, CliError, admin_flags, with_admin_client
from keyplane_cli.output import emit as _emit
from keyplane_cli.tables import table as _table

__all__ = ["add_master_key_commands", "keyring_path", "master_key_sources"]

KEYRING_FILE_NAME = "master.keyring"


def keyring_path(explicit: Path | None, home: Home | None = None) -> Path:
    """The keyring file: the flag, else ``$KEYPLANE_MASTER_KEYRING``, else
    ``master.keyring`` in the data directory."""
    if explicit is not None:
        return explicit
    env = os.environ.get(KEYRING_ENV)
    if env:
        return Path(env)
    return (home or Home.default()).root / KEYRING_FILE_NAME


def master_key_sources(
    key_file: Path | None, keyring_file: Path | None, *, home: Home | None = None, create: bool = False
) -> tuple[bytes, Path | None]:
    """``(single master key or b"", keyring file or None)`` for a control plane.

    The keyring file (flag or ``$KEYPLANE_MASTER_KEYRING``; with ``home``,
    its ``master.keyring``) is the ring whenever it exists; the single key
    (``$KEYPLANE_MASTER_KEY`` or ``key_file``; with ``home``, its
    ``master.key``, created when ``create`` and no keyring exists yet) is
    the ring until then.
    """
    keyring = keyring_file or (Path(os.environ[KEYRING_ENV]) if os.environ.get(KEYRING_ENV) else None)
    if home is not None:
        keyring = keyring or home.root / KEYRING_FILE_NAME
        key_file = key_file or home.master_key_file
        if keyring.exists() and not os.environ.get(MASTER_KEY_ENV) and not key_file.exists():
            return b"", keyring
        return load_master_key(key_file, create=create and not keyring.exists()), keyring
    if keyring is not None and key_file is None and not os.environ.get(MASTER_KEY_ENV):
        return b"", keyring
    return load_master_key(key_file, create=False), keyring


# add / retire: the keyring file ---------------------------------------------------


def _current_entries(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """The keyring file's entries; before the first ``add``, the single
    master key (if any) under its legacy id."""
    path = keyring_path(args.keyring_file)
    if path.exists():
        return read_keyring_file(path)
    home = Home.default()
    key_file = args.master_key_file or (home.master_key_file if home.master_key_file.exists() else None)
    if key_file is None and not os.environ.get(MASTER_KEY_ENV):
        return []
    key = load_master_key(key_file, create=False)
    return [(legacy_key_id(key), key)]


def add_key(args: argparse.Namespace, out: TextIO, *, report: bool = True) -> str:
    path = keyring_path(args.keyring_file)
    entries = _current_entries(args)
    key_id = validate_key_id(args.id) if args.id else new_key_id()
    if any(existing == key_id for existing, _ in entries):
        raise CliError(f"master key id {key_id!r} is already in {path}")
    bootstrapped = not path.exists() and entries
    write_keyring_file(path, [*entries, (key_id, os.urandom(32))])
    if report:
        lines = [f"wrote {path} with the current master key as {entries[0][0]}"] if bootstrapped else []
        lines.append(
            f"added master key {key_id} to {path}; it seals new secrets once the control plane re-reads the file"
        )
        data = {"key_id": key_id, "keyring_file": str(path), "previous_key_ids": [e[0] for e in entries]}
        _emit(args, data, "\n".join(lines), out)
    return key_id


def _status(client: AdminClient) -> admin_pb2.GetMasterKeyStatusResponse:
    resp: admin_pb2.GetMasterKeyStatusResponse = client.call(
        "GetMasterKeyStatus", admin_pb2.GetMasterKeyStatusRequest()
    )
    return resp


def retire_key(args: argparse.Namespace, client: AdminClient, out: TextIO) -> None:
    path = keyring_path(args.keyring_file)
    if not path.exists():
        raise CliError(f"no keyring file {path}: there is nothing to retire")
    entries = read_keyring_file(path)
    ids = [key_id for key_id, _ in entries]
    if args.key_id not in ids:
        raise CliError(f"master key {args.key_id!r} is not in {path} (it has {', '.join(ids)})")
    if args.key_id == ids[-1]:
        raise CliError(f"master key {args.key_id!r} is the primary; add a new key and rewrap before retiring it")
    status = _status(client)
    if status.primary_key_id != ids[-1]:
        raise CliError(
            f"the control plane seals with master key {status.primary_key_id!r}, not {ids[-1]!r} (the primary in "
            f"{path}); wait until it has re-read the keyring file, rewrap, then retire"
        )
    used = {u.key_id: u.secrets for u in status.usage}.get(args.key_id, 0)
    if used:
        raise CliError(
            f"master key {args.key_id!r} still seals {used} secret(s); run 'keyplane master-key rewrap' first"
        )
    write_keyring_file(path, [(key_id, key) for key_id, key in entries if key_id != args.key_id])
    data = {"retired_key_id": args.key_id, "keyring_file": str(path)}
    _emit(args, data, f"retired master key {args.key_id} from {path}", out)


# rewrap: the control plane ----------------------------------------------------------


def rewrap(args: argparse.Namespace, client: AdminClient, out: TextIO, key_id: str = "") -> int:
    """Run RewrapSecrets until every secret was examined; first wait (up to
    ``--wait`` seconds) until the control plane's primary is ``key_id``."""
    deadline = time.monotonic() + args.wait
    totals = dict.fromkeys(("examined", "rewrapped", "already_current", "skipped_changed", "unreadable"), 0)
    token = ""
    primary = ""
    while True:
        request = admin_pb2.RewrapSecretsRequest(primary_key_id=key_id, batch_size=args.batch_size, page_token=token)
        try:
            resp: admin_pb2.RewrapSecretsResponse = client.call("RewrapSecrets", request)
        except grpc.RpcError as exc:
            waiting = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            if waiting and not token and time.monotonic() < deadline:
                time.sleep(0.5)  # the control plane has not re-read the keyring file yet
                continue
            raise
        primary = resp.primary_key_id
        for name in totals:
            totals[name] += getattr(resp, name)
        token = resp.next_page_token
        if not token:
            break
    text = (
        f"rewrapped {totals['rewrapped']} secret(s) under master key {primary} "
        f"({totals['examined']} examined, {totals['already_current']} already under it, "
        f"{totals['skipped_changed']} changed meanwhile, {totals['unreadable']} unreadable)"
    )
    _emit(args, {"primary_key_id": primary, **totals}, text, out)
    if totals["unreadable"] or totals["skipped_changed"]:
        sys.stderr.write(
            "warning: some secrets were not rewrapped (see the control plane's log for unreadable ones); "
            "run 'keyplane master-key rewrap' again\n"
        )
        return 1
    return 0


def status_text(resp: admin_pb2.GetMasterKeyStatusResponse) -> str:
    rows = []
    for usage in resp.usage:
        where = ("primary" if usage.key_id == resp.primary_key_id else "yes") if usage.in_keyring else "NO"
        rows.append((usage.key_id or "(legacy, unknown key)", str(usage.secrets), where))
    lines = _table(("MASTER KEY", "SECRETS", "IN KEYRING"), rows)
    lines.append(f"{resp.total_secrets} secret(s); new ones are sealed with {resp.primary_key_id}")
    return "\n".join(lines)


def run_master_key(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        if args.action == "add":
            add_key(args, out)
            return 0

        def body(client: AdminClient) -> int:
            if args.action == "status":
                resp = _status(client)
                _emit(args, resp, status_text(resp), out)
                return 0
            if args.action == "retire":
                retire_key(args, client, out)
                return 0
            if args.action == "rewrap":
                return rewrap(args, client, out, args.key_id or "")
            # rotate: json/yaml print one document, the rewrap's (its primary_key_id is the new key)
            key_id = add_key(args, out, report=args.output == "table")
            return rewrap(args, client, out, key_id)

        return with_admin_client(args, body)
    except (MasterKeyError, OSError) as exc:
        raise CliError(str(exc)) from None


def _keyring_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keyring-file",
        "--master-keyring-file",
        type=Path,
        help=f"the master keyring file (else env {KEYRING_ENV}, else $KEYPLANE_HOME/{KEYRING_FILE_NAME})",
    )


def _rewrap_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=100, help="secrets per transaction (1-1000)")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the control plane to pick up the new key"
    )


def _single_key_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--master-key-file",
        type=Path,
        help=f"the single master key used so far (else env {MASTER_KEY_ENV}, else $KEYPLANE_HOME/master.key); "
        "written into a new keyring file",
    )
    parser.add_argument("--id", help="id of the new key (default: date and random hex)")


def add_master_key_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    parser = sub.add_parser("master-key", help="rotate the master keys that seal provider secrets")
    handlers["master-key"] = run_master_key
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, *extra: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=text)
        admin_flags(p)
        for add in extra:
            add(p)
        return p

    add_text = "append a new master key to the keyring file (new secrets are sealed with it)"
    action("add", add_text, _keyring_flags, _single_key_flag)
    action(
        "rewrap", "re-encrypt every secret under the control plane's primary master key", _rewrap_flags
    ).add_argument("--key-id", help="only if the control plane's primary master key has this id (waits for it)")
    rotate_text = "add a new master key, then rewrap every secret under it"
    action("rotate", rotate_text, _keyring_flags, _single_key_flag, _rewrap_flags)
    action("status", "the control plane's keyring and how many secrets each master key seals")
    action("retire", "remove an unused master key from the keyring file", _keyring_flags).add_argument(
        "key_id", metavar="ID", help="the master key's id (from master-key status)"
    )
