"""``-o/--output table|json|yaml`` for every admin command, in one place.

``table`` (the default) is for people: the text each command composes, with
headers on lists. ``json`` and ``yaml`` print the same data (the API response
as protobuf's JSON mapping, field names as in the protos), so scripts can
parse either. ``--json`` stays as an alias of ``-o json``.

Secrets are never printed: the admin API does not return provider secrets,
and any field named like one is dropped here all the same. A token that a
``create`` issues (shown once) is the one exception, by design.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

__all__ = ["FORMATS", "add_output_flags", "emit", "to_data", "write_data"]

FORMATS = ("table", "json", "yaml")
# Fields of request messages that carry provider secrets; never in output.
_SECRET_FIELDS = frozenset({"secret", "new_secret"})


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table (for people, the default), or json / yaml (the API response, the same data in both)",
    )
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="the same as -o json (kept for scripts)"
    )


def to_data(value: Message | Mapping[str, Any]) -> dict[str, Any]:
    """What json and yaml print: a message in protobuf's JSON mapping, or a plain mapping."""
    data = MessageToDict(value, preserving_proto_field_name=True) if isinstance(value, Message) else dict(value)
    return {k: _without_secrets(v) for k, v in data.items() if not _is_secret(k, v)}


def _is_secret(name: str, value: Any) -> bool:
    # A string under a secret's name; a plan's {"from": fingerprint, "to": fingerprint} stays.
    return name in _SECRET_FIELDS and isinstance(value, str)


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items() if not _is_secret(k, v)}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


def emit(
    args: argparse.Namespace, value: Message | Mapping[str, Any], table: str | Callable[[], str], out: TextIO
) -> None:
    """Print ``value`` as ``args.output`` asks: ``table`` (a text, or a function making it) or the data."""
    output = getattr(args, "output", "table")
    if output in ("json", "yaml"):
        write_data(output, value, out)
    else:
        out.write((table() if callable(table) else table) + "\n")


def write_data(output: str, value: Message | Mapping[str, Any], out: TextIO) -> None:
    """``value`` as ``json`` or ``yaml`` (``to_data``)."""
    data = to_data(value)
    if output == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False))
