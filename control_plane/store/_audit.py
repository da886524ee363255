"""What both stores share for the audit log (migration 4): the columns,
the WHERE clause of a query, and the encoding of the changed-field names.
Pure functions, no I/O."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from control_plane.store.base import AuditEntry, AuditQuery

__all__ = ["COLUMNS", "INSERT_COLUMNS", "fields_from_json", "fields_to_json", "insert_values", "where"]

INSERT_COLUMNS = "event_time, caller, method, tenant, resource_kind, resource_id, fields, fingerprint, result"
COLUMNS = "id, " + INSERT_COLUMNS


def fields_to_json(fields: tuple[str, ...]) -> str:
    return json.dumps(list(fields))


def fields_from_json(text: str) -> tuple[str, ...]:
    return tuple(str(f) for f in json.loads(text))


def insert_values(entry: AuditEntry, time: Any) -> tuple[Any, ...]:
    """The values of ``INSERT_COLUMNS``, with the time as the store encodes it."""
    return (
        time,
        entry.caller,
        entry.method,
        entry.tenant,
        entry.resource_kind,
        entry.resource_id,
        fields_to_json(entry.fields),
        entry.fingerprint,
        entry.result,
    )


def where(query: AuditQuery, param: Callable[[Any], str], encode_time: Callable[[datetime, str], Any]) -> str:
    """`` WHERE ...`` for ``query``'s filters ('' for none); ``param(value)``
    binds a value and returns its placeholder."""
    conditions: list[str] = []
    if query.before_id is not None:
        conditions.append(f"id < {param(query.before_id)}")
    for column, value in (
        ("tenant", query.tenant),
        ("resource_kind", query.resource_kind),
        ("resource_id", query.resource_id),
    ):
        if value is not None:
            conditions.append(f"{column} = {param(value)}")
    if query.start is not None:
        conditions.append(f"event_time >= {param(encode_time(query.start, 'start'))}")
    if query.end is not None:
        conditions.append(f"event_time < {param(encode_time(query.end, 'end'))}")
    return (" WHERE " + " AND ".join(conditions)) if conditions else ""
