"""The reporter's wire encoding against the protobuf runtime's (pure, no servers)."""

from __future__ import annotations

import random

import pytest

from keyplane.domain import Provider
from keyplane.health.classify import Classification, ErrorClass, classify_exception, classify_response
from keyplane.v1 import sidecar_service_pb2 as pb
from sidecar.model import Target
from sidecar.outcome_wire import OutcomeEncoder, batch_request, frame_outcome, outcome_to_proto, varint
from sidecar.proxy import AttemptRecord
from sidecar.router import Attempt
from sidecar.usage import Usage

from .test_router import key

SUCCESS = classify_response(200, {}, b"", now=0.0)
LIMITED = classify_response(429, {"retry-after": "7"}, b'{"error":{"code":"rate_limit_exceeded"}}', now=0.0)
TARGETS = (
    Target(Provider.OPENAI, "gpt-4o-mini", 0, 1, ()),
    Target(Provider.GEMINI, "gemini-2.0-flash", 0, 1, ()),
    Target(Provider.AZURE_OPENAI, "gpt-4o", 1, 2, ()),
)
USAGES = (
    Usage(),  # read, all zero: still present
    Usage(input_tokens=9, output_tokens=6),
    Usage(input_tokens=120_000, cached_input_tokens=100_000, output_tokens=2**33, reasoning_tokens=900),
    Usage(input_tokens=50, cached_input_tokens=10, cache_write_input_tokens=30, output_tokens=1),
    Usage(input_tokens=3, output_tokens=12, estimated=True),
)
CLASSES = (
    SUCCESS,
    LIMITED,
    classify_exception("timeout"),
    classify_response(401, {}, b'{"error":{"code":"invalid_api_key"}}', now=0.0),
    Classification(ErrorClass.RATE_LIMITED, 429, "429 rate_limited", retry_after=0.0),
    Classification(ErrorClass.RATE_LIMITED, 429, "429 rate_limited", retry_after=1.5),
    Classification(ErrorClass.UPSTREAM_ERROR, 503, "r\u00e9sum\u00e9 " + "x" * 300),
)


def record(target: Target, key_id: str, classification: Classification, **overrides: object) -> AttemptRecord:
    fields: dict[str, object] = {
        "attempt": Attempt(target=target, key=key(key_id, provider=target.provider)),
        "classification": classification,
        "started": 1_700_000_000.125,
        "latency_ms": 12,
        "outcome": "2xx",
        "provider_final": True,
        "recovered": False,
    }
    fields.update(overrides)
    return AttemptRecord(**fields)  # type: ignore[arg-type]


def decoded(data: bytes) -> pb.Outcome:
    return pb.Outcome.FromString(data)


def expected(
    tenant: str, rec: AttemptRecord, request_id: str, client_key: str = "", public_model: str = ""
) -> pb.Outcome:
    message = outcome_to_proto(tenant, rec, request_id, client_key, public_model)
    assert message is not None
    return message


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63 - 1, 2**64 - 1])
def test_varint_matches_protobuf(value: int) -> None:
    encoded = b"\x18" + varint(value)
    # Protobuf reads our field back as the value...
    assert pb.ReportOutcomesRequest.FromString(encoded).dropped == value
    # ...and writes the same bytes, except that proto3 leaves a zero out.
    assert pb.ReportOutcomesRequest(dropped=value).SerializeToString() == (b"" if value == 0 else encoded)


def test_encoded_outcomes_equal_the_field_by_field_message() -> None:
    """Many shapes, each encoded several times (the cached shared part is reused)."""
    encoder = OutcomeEncoder()
    rng = random.Random(7)
    for n in range(600):
        rec = record(
            rng.choice(TARGETS),
            rng.choice(["pk_1", "pk_2", "pk_\u00e9"]),
            rng.choice(CLASSES),
            started=rng.choice([0.0, 0.5, 1_700_000_000.0, 1_700_000_000.999_999_9999, rng.uniform(0, 4e9)]),
            latency_ms=rng.choice([0, 1, 127, 128, 90_000, 2**40]),
            provider_final=rng.random() < 0.5,
            recovered=rng.random() < 0.3,
            usage=rng.choice([None, *USAGES]),
            superseded=rng.random() < 0.4,
        )
        tenant = rng.choice(["acme", "globex"])
        request_id = rng.choice(["", f"req-{n}", "0123456789abcdef0123456789abcdef"])
        client_key = rng.choice(["", "ck_1", "ck_\u00e9"])
        public_model = rng.choice(["", "gpt", "m\u00e9"])
        got = decoded(encoder.encode(tenant, rec, request_id, client_key, public_model))
        assert got == expected(tenant, rec, request_id, client_key, public_model), (n, rec)
        assert got.HasField("time")
        assert got.HasField("retry_after") == (rec.classification.retry_after is not None)
        assert got.HasField("usage") == (rec.usage is not None)
        assert got.superseded == rec.superseded
    assert 0 < len(encoder) <= len(TARGETS) * 3 * len(CLASSES) * 2 * 2 * 2 * 3 * 3


@pytest.mark.parametrize("usage", USAGES)
def test_usage_bytes_equal_protobufs(usage: Usage) -> None:
    """The hand-written usage field is byte for byte what protobuf writes."""
    rec = record(TARGETS[0], "pk_1", SUCCESS, usage=usage, latency_ms=0)
    plain = OutcomeEncoder().encode("acme", record(TARGETS[0], "pk_1", SUCCESS, latency_ms=0), "r")
    with_usage = OutcomeEncoder().encode("acme", rec, "r")
    assert with_usage.startswith(plain)
    message = expected("acme", rec, "r")
    assert with_usage[len(plain) :] == pb.Outcome(usage=message.usage).SerializeToString()


@pytest.mark.parametrize("usage", [None, *USAGES[1:3]])
def test_superseded_bytes_equal_protobufs(usage: Usage | None) -> None:
    """Outcome.superseded (field 18) is appended as protobuf writes it, after the usage;
    the shared part cached for the attempt's shape is the same either way."""
    encoder = OutcomeEncoder()
    last = record(TARGETS[0], "pk_1", LIMITED, usage=usage)
    earlier = record(TARGETS[0], "pk_1", LIMITED, usage=usage, superseded=True)
    plain = encoder.encode("acme", last, "r", "ck_1", "gpt")
    marked = encoder.encode("acme", earlier, "r", "ck_1", "gpt")
    assert len(encoder) == 1
    assert marked == plain + pb.Outcome(superseded=True).SerializeToString() == plain + b"\x90\x01\x01"
    got = decoded(marked)
    assert got.superseded and not decoded(plain).superseded
    assert got == expected("acme", earlier, "r", "ck_1", "gpt")
    # The protobuf runtime's own encoding of the same message parses to the same.
    assert decoded(expected("acme", earlier, "r", "ck_1", "gpt").SerializeToString()) == got
    # Off the short path (a negative start) too.
    odd = record(TARGETS[1], "pk_2", SUCCESS, started=-1.25, superseded=True)
    assert decoded(encoder.encode("acme", odd, "r")) == expected("acme", odd, "r")
    assert expected("acme", odd, "r").superseded


def test_retry_after_and_time_parts() -> None:
    encoder = OutcomeEncoder()
    got = decoded(encoder.encode("acme", record(TARGETS[0], "pk_1", LIMITED, started=1_700_000_000.25), "r"))
    assert got.retry_after.seconds == 7 and got.retry_after.nanos == 0
    assert got.time.ToNanoseconds() == 1_700_000_000_250_000_000
    zero = decoded(encoder.encode("acme", record(TARGETS[0], "pk_1", CLASSES[4]), "r"))
    assert zero.HasField("retry_after") and zero.retry_after.ToNanoseconds() == 0


def test_values_off_the_short_path_still_match() -> None:
    """A negative retry-after or start time is encoded by the protobuf runtime."""
    encoder = OutcomeEncoder()
    odd = Classification(ErrorClass.RATE_LIMITED, 429, "429", retry_after=-2.5)
    for rec in (record(TARGETS[0], "pk_1", odd), record(TARGETS[1], "pk_2", SUCCESS, started=-1.25)):
        assert decoded(encoder.encode("acme", rec, "r")) == expected("acme", rec, "r")


def test_keyless_attempt_is_refused() -> None:
    keyless = AttemptRecord(
        attempt=Attempt(target=TARGETS[0], key=None),
        classification=SUCCESS,
        started=1.0,
        latency_ms=1,
        outcome="2xx",
        provider_final=True,
    )
    with pytest.raises(ValueError):
        OutcomeEncoder().encode("acme", keyless, "r")


def test_batch_request_parses_to_the_same_request() -> None:
    encoder = OutcomeEncoder()
    records = [record(TARGETS[n % 3], f"pk_{n % 2}", CLASSES[n % len(CLASSES)], latency_ms=n) for n in range(40)]
    encoded = [frame_outcome(encoder.encode("acme", rec, f"req-{n}")) for n, rec in enumerate(records)]
    parsed = pb.ReportOutcomesRequest.FromString(batch_request(encoded, "sc-\u00e9-1", 300))
    want = pb.ReportOutcomesRequest(
        outcomes=[expected("acme", rec, f"req-{n}") for n, rec in enumerate(records)],
        sidecar_id="sc-\u00e9-1",
        dropped=300,
    )
    assert parsed == want
    empty = pb.ReportOutcomesRequest.FromString(batch_request([], "", 0))
    assert empty == pb.ReportOutcomesRequest()
    assert batch_request([], "", 0) == b""
