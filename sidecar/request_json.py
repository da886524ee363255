"""The checking parse of an app's JSON request body, and its re-encoding for another model: pure, no I/O.

``parse_request_json`` accepts exactly one JSON object and refuses, with a
typed ``RequestJsonError`` (the app answers 400 ``invalid_request_error``),
whatever the standard parser would turn into an uncaught exception or a
silent surprise:

- invalid UTF-8 (and a UTF-16/32 body: the API speaks UTF-8 only);
- nesting deeper than ``MAX_DEPTH`` (the stdlib parser recurses and would raise
  RecursionError near 1,000 levels);
- integers longer than ``MAX_NUMBER_DIGITS`` digits (Python 3.11 refuses more
  than 4,300 with ValueError) and non-finite numbers (``NaN``, ``Infinity``,
  and floats that overflow to infinity);
- duplicate keys in any object (the stdlib keeps the last one silently; an
  upstream might keep the first: refused rather than guessed);
- a top level that is not an object.

``bodies_for`` gives the body to send for each upstream model: the app's own
bytes for the model it named, else the request re-encoded naming the other.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_NUMBER_DIGITS", "RequestJsonError", "bodies_for", "parse_request_json"]

# Chat requests nest a few levels (messages -> content parts -> ...); tool
# schemas go deeper, still far below this.
MAX_DEPTH = 128
MAX_NUMBER_DIGITS = 1000


class RequestJsonError(ValueError):
    """The body is not an acceptable JSON object; ``str(exc)`` is safe to return to the app."""


# A JSON string (escapes included), and every character but the brackets.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_PAIRS = ("{}", "[]")


def _max_depth_exceeded(text: str) -> bool:
    """True when brackets outside strings nest deeper than MAX_DEPTH, without
    recursion and without a Python-level loop over the characters (this runs
    on every request): a body with few brackets cannot nest deep; else the
    strings are cut out, only the brackets kept, and the innermost pairs
    removed one level at a time (C-level string operations), at most
    MAX_DEPTH times."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    brackets = "".join(_BRACKET.findall(_STRING.sub("", text)))
    for _ in range(MAX_DEPTH):
        if not brackets:
            return False
        shorter = brackets.replace(_PAIRS[0], "").replace(_PAIRS[1], "")
        if shorter == brackets:
            # Nothing pairs up any more: not JSON. Call it deep when the
            # openings left could nest past the limit, else let the parser say.
            return brackets.count("[") + brackets.count("{") > MAX_DEPTH
        brackets = shorter
    return bool(brackets)


_BRACKET = re.compile(r"[\[\]{}]")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RequestJsonError(f"The JSON body has a duplicate key: '{key[:100]}'.")
        result[key] = value
    return result


def _int(token: str) -> int:
    if len(token.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise RequestJsonError(f"The JSON body has a number longer than {MAX_NUMBER_DIGITS} digits.")
    return int(token)


def _float(token: str) -> float:
    if len(token) > MAX_NUMBER_DIGITS:
        raise RequestJsonError(f"The JSON body has a number longer than {MAX_NUMBER_DIGITS} characters.")
    value = float(token)
    if not math.isfinite(value):
        raise RequestJsonError("The JSON body has a number out of range.")
    return value


def _constant(token: str) -> Any:
    raise RequestJsonError(f"The JSON body has an invalid number: {token}.")


def parse_request_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ``RequestJsonError`` saying why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestJsonError("The request body is not valid UTF-8.") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if _max_depth_exceeded(text):
        raise RequestJsonError(f"The JSON body nests deeper than {MAX_DEPTH} levels.")
    try:
        payload = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
        )
    except RequestJsonError:
        raise
    except (ValueError, RecursionError):
        raise RequestJsonError("We could not parse the JSON body of your request.") from None
    if not isinstance(payload, dict):
        raise RequestJsonError("The request body must be a JSON object.")
    return payload


def bodies_for(payload: dict[str, Any], model: str, own: bytes | None) -> Callable[[str], bytes]:
    """The body for each upstream model: ``own`` (the app's bytes, if they may pass through)
    for the ``model`` the app named, else ``payload`` naming the upstream model (encoded once each)."""
    encoded: dict[str, bytes] = {}

    def body_for(upstream_model: str) -> bytes:
        if upstream_model == model and own is not None:
            return own  # pass-through: the app's bytes already name this model
        body = encoded.get(upstream_model)
        if body is None:
            payload["model"] = upstream_model
            body = encoded[upstream_model] = json.dumps(payload, separators=(",", ":")).encode()
        return body

    return body_for
