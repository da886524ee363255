"""A deterministic corpus of malformed HTTP requests for the edge fuzz test.

Every case is meant to be refused by the sidecar itself (4xx, or a close): broken
request lines and versions, bad header names and values, NULs, bad and conflicting
Content-Length / Transfer-Encoding, bad chunked framing, truncated bodies, slowloris
heads, oversized heads, unknown methods and paths, and pathological JSON bodies on
/v1/chat/completions with a valid client key. Requests with a well-formed body name
a model no route serves, so even one that slipped through would stop at 404.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .rawhttp import Piece

CHAT = b"/v1/chat/completions"
UNROUTED_MODEL = "no-such-model"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    pieces: tuple[Piece, ...]


def _case(name: str, data: bytes) -> Case:
    return Case(name, ((data, 0.0),))


def _chat(token: str, body: bytes, *, framing: bytes | None = None, extra: bytes = b"") -> bytes:
    if framing is None:
        framing = b"Content-Length: %d\r\n" % len(body)
    return (
        b"POST " + CHAT + b" HTTP/1.1\r\nHost: sidecar\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + framing + extra + b"\r\n" + body
    )


def _chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def _request_lines(rng: random.Random) -> list[Case]:
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE", b"BREW", b"G ET"]
    methods += [b"get", b"PO\x00ST", b"X" * 300, b"", b"\xff\xfe", b"MKCOL", b"PROPFIND", b"PRI"]
    targets = [CHAT, b"/nope", b"*", b"http://evil.example/x", b"", b"/%zz", b"/\x00", b"/a b", b"//", b"/v1/../etc"]
    targets += [b"/v1/chat/completions?x=\x01", b"/\xff\xfe", b"/v1/models/\x7f", b"/" + b"a" * 70_000, b"/v2/x"]
    versions = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x", b"HTTP/1", b"http/1.1", b""]
    versions += [b"HTTP/1.1 extra", b"HTTP/3", b"HTTP/1.01", b"HTTX/1.1", b"HTTP/-1.1"]
    combos = [(m, t, v) for m in methods for t in targets for v in versions]
    cases = []
    for m, t, v in rng.sample(combos, 170):
        line = b" ".join(x for x in (m, t, v) if x)
        cases.append(_case(f"line {line[:40]!r}", line + b"\r\nHost: x\r\n\r\n"))
    for raw in [
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /nope HTTP/1.1\n\n",
        b"GET /nope HTTP/1.1\rHost: x\r\r",
        b" GET /nope HTTP/1.1\r\n\r\n",
        b"GET  /nope  HTTP/1.1\r\n\r\n",
        b"GET\t/nope\tHTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"\x00" * 64,
        b"GET /nope HTTP/1.1\r\n" + b"\x00" * 32 + b"\r\n\r\n",
    ]:
        cases.append(_case(f"raw {raw[:30]!r}", raw))
    return cases


def _headers() -> list[Case]:
    bad_fields = [
        b"Bad Name: v",
        b"Bad\x00Name: v",
        b"Bad\x7fName: v",
        b"B\xe9d: v",
        b": empty-name",
        b"NoColon",
        b"X-Val: a\x00b",
        b"X-Val: a\rb",
        b"X-Val: a\x01b",
        b" Leading: space",
        b"X-Fold: a\r\n folded",
        b"X-Fold: a\r\n\tfolded",
        b"X" * 70_000 + b": v",
        b"X-Long: " + b"v" * 70_000,
        b"(X): v",
        b"X{}: v",
        b'X"Q": v',
        b"X-A : spaced-before-colon",
        b"Host: a\r\nHost: b",
        b"Content-Length: 0\r\nContent-Length: 0\r\nContent-Length: 1",
    ]
    cases = []
    for i, field in enumerate(bad_fields):
        for target in (CHAT, b"/nope"):
            data = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n" + field + b"\r\nContent-Length: 0\r\n\r\n"
            cases.append(_case(f"header {i} {target!r}", data))
    for count in (101, 150, 500, 5000):
        fields = b"".join(b"X-F%d: v\r\n" % n for n in range(count))
        cases.append(_case(f"{count} headers", b"GET /nope HTTP/1.1\r\n" + fields + b"\r\n"))
    for size in (65 * 1024, 200 * 1024, 2 * 1024 * 1024):
        cases.append(_case(f"{size}-byte head", b"GET /nope HTTP/1.1\r\nX-Big: " + b"b" * size + b"\r\n\r\n"))
    return cases


def _framing(token: str) -> list[Case]:
    body = json.dumps({"model": UNROUTED_MODEL, "messages": []}).encode()
    lengths = [b"-1", b"abc", b"1e3", b"99999999999999999999999", b"10, 20", b"+5", b"0x10", b" 5 5", b"", b"\x00"]
    lengths += [b"18446744073709551616", b"5\x00", b"1.5", b"%d" % (64 * 1024 * 1024), b"%d" % (2**63)]
    cases = []
    for value in lengths:
        for target in (CHAT, b"/nope"):
            data = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n" + body
            cases.append(_case(f"content-length {value[:20]!r} {target!r}", data))
    conflicts = [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Transfer-Encoding: gzip\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        b"Transfer-Encoding: xchunked\r\n",
        b"Transfer-Encoding : chunked\r\n",
        b"Transfer-Encoding:\tchunked\x0b\r\n",
    ]
    for i, framing in enumerate(conflicts):
        cases.append(_case(f"conflict {i}", _chat(token, _chunked(body), framing=framing)))
    chunked = b"Transfer-Encoding: chunked\r\n"
    bad_chunks = [
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"-1\r\nabc\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\nabc\r\n",
        b"3\r\nabcdef\r\n0\r\n\r\n",
        b"3\r\nabc0\r\n\r\n",
        b"3;ext=\x00\r\nabc\r\n0\r\n\r\n",
        b"3 ; bad ext\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\n0\n\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b"3\r\nabc\r\n0\r\nTrailer\x00: x\r\n\r\n",
        b"\r\n\r\n",
        b"+3\r\nabc\r\n0\r\n\r\n",
    ]
    for i, chunks in enumerate(bad_chunks):
        cases.append(_case(f"bad chunks {i}", _chat(token, chunks, framing=chunked)))
    # Truncated bodies: declared longer than sent, or a chunked body without its end.
    for cut in (0, 1, len(body) // 2, len(body) - 1):
        data = _chat(token, body, framing=b"Content-Length: %d\r\n" % len(body))
        cases.append(_case(f"truncated body at {cut}", data[: len(data) - len(body) + cut]))
    for cut in (5, 20, 40):
        data = _chat(token, _chunked(body), framing=chunked)
        cases.append(_case(f"truncated chunked body at {cut}", data[: len(data) - len(_chunked(body)) + cut]))
    return cases


def _slow() -> list[Case]:
    cases = []
    heads = [
        b"GET /nope HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\n",
        b"GET /no",
        b"G",
    ]
    for i, head in enumerate(heads):
        cases.append(_case(f"half a head {i}", head))
    for i in range(6):
        drip = [(b"GET /nope HTTP/1.1\r\n", 0.0)] + [(b"X-D%d-%d: v\r\n" % (i, n), 0.15) for n in range(20)]
        cases.append(Case(f"slowloris {i}", tuple(drip)))
    return cases


def _json_bodies(rng: random.Random) -> list[bytes]:
    pre = b'{"model":"' + UNROUTED_MODEL.encode() + b'","messages":[{"role":"user","content":"hi"}],"x":'
    bodies = []
    for depth in (129, 500, 1000, 5000, 100_000):
        bodies.append(pre + b"[" * depth + b"]" * depth + b"}")
        bodies.append(pre + b'{"a":' * depth + b"1" + b"}" * depth + b"}")
        bodies.append(b"[" * depth)
    for digits in (1001, 4301, 10_000, 100_000):
        bodies.append(pre + b"9" * digits + b"}")
        bodies.append(pre + b"-" + b"1" * digits + b"}")
        bodies.append(pre + b"1." + b"5" * digits + b"}")
    for token in (b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity", b"1e", b"01", b"--1", b"0x10", b".5"):
        bodies.append(pre + token + b"}")
    for raw in (b"\xff", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"):
        bodies.append(pre + b'"' + raw + b'"}')
        bodies.append(b'{"' + raw + b'":1}')
    bodies.append(b"\xff\xfe" + '{"model":"x"}'.encode("utf-16-le"))
    bodies.append(b"\xfe\xff" + '{"model":"x"}'.encode("utf-16-be"))
    bodies.append('{"model":"x"}'.encode("utf-32"))
    for dup in (
        b'{"model":"a","model":"b"}',
        pre + b'{"k":1,"k":2}}',
        b'{"messages":[],"messages":[]}',
        pre + b'[{"a":[{"b":1,"b":1}]}]}',
    ):
        bodies.append(dup)
    bodies += [b"[]", b'"text"', b"12", b"null", b"true", b"[{}]", b"", b" ", b"{", b"}", b'{"model"}', b"{'a':1}"]
    bodies += [b'{"a":1}{"b":2}', b'{"a":1} x', b'{"a":"\x00"}', b'{"a":"\\x41"}', b'{"a":"\\u12"}', b"\x00{}"]
    bodies += [b'{"model":1}', b'{"model":null}', b'{"model":""}', b'{"model":["gpt-4o-mini"]}']
    # Random mutations of a well-formed body (its model is unrouted: a valid mutant stops at 404).
    seed = json.dumps({"model": UNROUTED_MODEL, "messages": [{"role": "user", "content": "hello"}]}).encode()
    for _ in range(120):
        mutant = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(3)
            pos = rng.randrange(len(mutant))
            if op == 0:
                mutant[pos] = rng.randrange(256)
            elif op == 1:
                del mutant[pos]
            else:
                mutant.insert(pos, rng.choice(b'{}[]",:\\\x00\xff0e-'))
        bodies.append(bytes(mutant))
    return bodies


def corpus(token: str, *, seed: int = 11) -> list[Case]:
    """The whole corpus (several hundred cases), the same for a given seed."""
    rng = random.Random(seed)
    cases = _request_lines(rng) + _headers() + _framing(token) + _slow()
    for i, body in enumerate(_json_bodies(rng)):
        cases.append(_case(f"json {i} {body[:24]!r}", _chat(token, body)))
        if i % 3 == 0:
            chunked = _chat(token, _chunked(body, size=rng.randint(1, 64)), framing=b"Transfer-Encoding: chunked\r\n")
            cases.append(_case(f"json {i} chunked", chunked))
    return cases
