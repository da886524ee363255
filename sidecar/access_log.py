"""The opt-in access log (``keyplane sidecar --access-log``): one JSON line per
chat request, to stdout or appended to a file.

Fields: ``ts`` (Unix seconds), ``request_id``, ``tenant``, ``model`` (the public
model the app asked for), ``status``, ``attempts``, ``provider`` and ``key_id``
of the attempt that answered (empty when none did), ``latency_ms`` (until the
last byte, streams included). Never a secret: keys appear by id only.

Lines are written as requests end, synchronously: a reader of stdout that
falls behind (a full pipe) holds the sidecar up, a file does not.
"""

from __future__ import annotations

import json.encoder
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from .router import Attempt

__all__ = ["AccessEntry", "AccessLog", "access_line"]

# json's own (C) string escaper: an app-chosen model name cannot break the line.
_quote = json.encoder.encode_basestring_ascii


@dataclass(slots=True)
class AccessEntry:
    """What one request's handler learns on the way, filled as it goes."""

    started: float  # loop time
    request_id: str = ""
    tenant: str = ""
    model: str = ""
    attempts: int = 0
    provider: str = ""
    key_id: str = ""

    def answered(self, attempts: int, attempt: Attempt | None) -> None:
        self.attempts = attempts
        if attempt is not None:
            self.provider = attempt.target.provider.value
            self.key_id = attempt.key.id if attempt.key is not None else ""


def access_line(entry: AccessEntry, status: int, latency_ms: float, ts: float) -> str:
    """The entry as one JSON line (no newline); strings escaped as ``json.dumps`` does."""
    q = _quote
    return (
        f'{{"ts":{ts:.3f},"request_id":{q(entry.request_id)},"tenant":{q(entry.tenant)},'
        f'"model":{q(entry.model)},"status":{status:d},"attempts":{entry.attempts:d},'
        f'"provider":{q(entry.provider)},"key_id":{q(entry.key_id)},"latency_ms":{latency_ms:.2f}}}'
    )


class AccessLog:
    """Writes access lines to ``stream``, or appends them to the file at ``path``
    (opened on the first line, closed by ``close``), one write and flush per request."""

    __slots__ = ("_file", "_path", "_stream")

    def __init__(self, stream: TextIO | None = None, *, path: str | None = None) -> None:
        if (stream is None) == (path is None):
            raise ValueError("an access log needs a stream or a path")
        self._stream = stream
        self._path = path
        self._file: TextIO | None = None

    @classmethod
    def to(cls, where: str) -> AccessLog:
        """``-``: stdout; anything else: a file path."""
        return cls(sys.stdout) if where == "-" else cls(path=where)

    def write(self, entry: AccessEntry, status: int, now: float) -> None:
        """``now``: the loop time the request ended, against ``entry.started``."""
        line = access_line(entry, status, (now - entry.started) * 1000, time.time())
        try:
            out = self._stream
            if out is None:
                out = self._file
                if out is None:
                    assert self._path is not None
                    out = self._file = open(self._path, "a", encoding="utf-8")
            out.write(line + "\n")
            out.flush()
        except (OSError, ValueError):  # a closed, broken or unwritable log must not fail the request
            pass

    def close(self) -> None:
        """Close the file (a later line opens it again); a stream is left open."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
