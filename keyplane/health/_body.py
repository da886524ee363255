"""Extract what classification needs from an upstream error body (pure, bounded)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["MAX_SCAN", "ScannedBody", "scan_body"]

MAX_SCAN = 64 * 1024  # bytes of body ever looked at
# Error fields whose text is searched. "error" and "detail" count when they are plain strings
# ({"error": "Invalid API key"}, FastAPI's {"detail": ...}); as objects they are walked.
_FIELDS = ("message", "code", "type", "status", "reason", "error", "detail", "msg")
_CODE_FIELDS = ("code", "type", "status")
# A code is echoed into reasons only when it looks like an identifier in lower snake
# case (or a SCREAMING one): keys carry dashes or mixed case, so they never match.
_SAFE_CODE = re.compile(r"[a-z][a-z0-9_]{2,47}|[A-Z][A-Z0-9_]{2,47}")
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class ScannedBody:
    haystack: str  # lower-cased: the JSON error fields, or the raw text when the body is not JSON
    code: str | None  # first safe identifier-like error code/type/status, for reasons
    codes: frozenset[str]  # every code/type/status value seen, as given
    retry_delay: str | None = None  # Gemini google.rpc.RetryInfo "retryDelay" ("47s"), as given
    message: str | None = None  # the first "message" string of the error, as given (may hold key fragments)


def _walk(node: object, strings: list[str], codes: list[str], delays: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, list):
        for item in node[:16]:
            _walk(item, strings, codes, delays, depth + 1)
        return
    if isinstance(node, str) and depth == 0:  # a JSON string body: xAI answers '"Your team ... credits ..."'
        strings.append(node)
        return
    if not isinstance(node, dict):
        return
    delay = node.get("retryDelay")
    if isinstance(delay, str):
        delays.append(delay)
    # The nested error object first: Anthropic wraps it in {"type": "error", "error": {...}}.
    inner = node.get("error")
    if isinstance(inner, dict | list):
        _walk(inner, strings, codes, delays, depth + 1)
    for name in _FIELDS:
        value = node.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, str | int):
            text = str(value)
            strings.append(text)
            if name in _CODE_FIELDS:
                codes.append(text)
    for key in ("details", "errors", "detail", "metadata"):
        child = node.get(key)
        if isinstance(child, dict | list):
            _walk(child, strings, codes, delays, depth + 1)


def scan_body(body: bytes) -> ScannedBody:
    """Lower-cased searchable text plus the error codes of a (possibly JSON) body."""
    text = body[:MAX_SCAN].decode("utf-8", errors="replace")
    strings: list[str] = []
    codes: list[str] = []
    delays: list[str] = []
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            parsed: object = json.loads(stripped)
        except ValueError:
            parsed = None
        _walk(parsed, strings, codes, delays, 0)
    elif stripped[:1] == '"':
        try:
            _walk(json.loads(stripped), strings, codes, delays, 0)
        except ValueError:
            pass
    code = next((c for c in codes if _SAFE_CODE.fullmatch(c)), None)
    # When the body is JSON with error fields, only those are searched: free text elsewhere in
    # the body (an echoed request parameter, say) must not mark a key invalid for every model.
    haystack = "\n".join(strings if strings else [text]).lower()
    return ScannedBody(
        haystack=haystack,
        code=code,
        codes=frozenset(codes),
        retry_delay=delays[0] if delays else None,
        message=_first_message(strings, None if stripped[:1] in ("{", "[", '"') else stripped),
    )


def _first_message(strings: list[str], text: str | None) -> str | None:
    """The error's human text: the first field string with a space in it (the
    message, which the walk meets first, not a code), else the raw text when
    the body is not JSON at all."""
    for candidate in strings:
        if " " in candidate.strip():
            return candidate
    return text or None
