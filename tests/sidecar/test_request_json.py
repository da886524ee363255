"""The checking JSON parse of request bodies: every pathological body is a RequestJsonError."""

from __future__ import annotations

import pytest

from sidecar.request_json import MAX_DEPTH, MAX_NUMBER_DIGITS, RequestJsonError, parse_request_json


def test_a_plain_object_parses() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"h\\u00e9 \\"[{"}],"temperature":0.5,"n":1}'
    assert parse_request_json(body) == {
        "model": "m",
        "messages": [{"role": "user", "content": 'hé "[{'}],
        "temperature": 0.5,
        "n": 1,
    }


def test_a_bom_is_ignored() -> None:
    assert parse_request_json(b'\xef\xbb\xbf{"a":1}') == {"a": 1}


def test_nesting_up_to_the_limit_parses() -> None:
    body = b'{"a":' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert isinstance(parse_request_json(body)["a"], list)
    deeper = b'{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
    with pytest.raises(RequestJsonError):
        parse_request_json(deeper)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}", "nests deeper"),
        (b"[" * 100_000, "nests deeper"),
        (b'{"a":' + b'{"b":' * 5000 + b"1" + b"}" * 5001, "nests deeper"),
        (b'{"n":' + b"9" * 100_000 + b"}", "longer than"),
        (b'{"n":-' + b"9" * (MAX_NUMBER_DIGITS + 1) + b"}", "longer than"),
        (b'{"n":1' + b"0" * 5000 + b".5}", "longer than"),
        (b'{"n":1e999}', "out of range"),
        (b'{"n":NaN}', "invalid number"),
        (b'{"n":-Infinity}', "invalid number"),
        (b'{"model":"a","model":"b"}', "duplicate key"),
        (b'{"m":[{"x":1,"x":2}]}', "duplicate key"),
        (b'{"a":"\xff"}', "UTF-8"),
        (b'{"a":"\xed\xa0\x80"}', "UTF-8"),
        (b"\xff\xfe{\x00}\x00", "UTF-8"),
        (b"[]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"12", "JSON object"),
        (b"null", "JSON object"),
        (b"", "could not parse"),
        (b"{", "could not parse"),
        (b'{"a":1}{"b":2}', "could not parse"),
        (b"{'a':1}", "could not parse"),
        (b'{"a":"\\ud800"}', ""),
    ],
)
def test_pathological_bodies_are_refused(body: bytes, fragment: str) -> None:
    if fragment == "":
        # A lone surrogate escape is valid JSON text; it parses (the upstream decides).
        assert isinstance(parse_request_json(body), dict)
        return
    with pytest.raises(RequestJsonError) as info:
        parse_request_json(body)
    assert fragment in str(info.value)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = b'{"a":"' + b"[{" * 10_000 + b'\\"' + b'"}'
    assert parse_request_json(body)["a"].startswith("[{[{")
