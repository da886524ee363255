"""Outcome reports encoded straight to protobuf wire bytes.

Each attempt's outcome is encoded when the request queues it, and a batch is
then only a join of bytes. (Built in the reporter's batch task instead, a
batch of a hundred held the sidecar's event loop for 0.3-0.4 ms, and the one
or two requests in flight then paid all of it: the p99 cost of reporting, see
docs/benchmarks.md.) Filling ``Outcome`` messages field by field through the
protobuf runtime costs about 3-4 us an outcome; here about a third of that:

- the fields many attempts share (tenant, key, provider, model, class, status,
  reason, the recovered/final flags) are serialized once by protobuf per
  distinct combination and cached;
- the attempt's own fields (latency, request id, start time, retry-after,
  whether a later attempt superseded it) are
  appended in protobuf's wire format (a message's encoding may list fields in
  any order, and parsers merge them);
- the attempt's usage (``Outcome.usage``, a ``Usage`` message of varints) is
  appended the same way;
- a batch is the concatenation of its outcomes, each framed as the repeated
  field 1 of ``ReportOutcomesRequest``, plus its other fields, sent as bytes.

Values outside what the short path encodes (a negative time or duration)
go through the protobuf runtime instead. Tests compare every encoding with
the runtime's.
"""

from __future__ import annotations

from collections.abc import Iterable

from keyplane import convert
from keyplane.v1 import sidecar_service_pb2

from .model import provider_to_proto
from .proxy import AttemptRecord
from .usage import Usage

__all__ = ["OutcomeEncoder", "batch_request", "fill_outcome", "frame_outcome", "outcome_to_proto", "varint"]

# Wire tags (field number << 3 | wire type) of the fields written here.
_TAG_LATENCY_MS = b"\x38"  # Outcome.latency_ms = 7, varint
_TAG_RETRY_AFTER = b"\x52"  # Outcome.retry_after = 10, length-delimited
_TAG_REQUEST_ID = b"\x5a"  # Outcome.request_id = 11, length-delimited
_TAG_TIME = b"\x62"  # Outcome.time = 12, length-delimited
_TAG_SECONDS = b"\x08"  # Timestamp/Duration.seconds = 1, varint
_TAG_NANOS = b"\x10"  # Timestamp/Duration.nanos = 2, varint
_TAG_OUTCOMES = b"\x0a"  # ReportOutcomesRequest.outcomes = 1, length-delimited
_TAG_SIDECAR_ID = b"\x12"  # ReportOutcomesRequest.sidecar_id = 2, length-delimited
_TAG_DROPPED = b"\x18"  # ReportOutcomesRequest.dropped = 3, varint
_TAG_USAGE = b"\x8a\x01"  # Outcome.usage = 17, length-delimited
_SUPERSEDED = b"\x90\x01\x01"  # Outcome.superseded = 18 (varint), true
# Usage's fields 1-5 (token counts, varints) and 6 (estimated, a bool).
_USAGE_TAGS = (b"\x08", b"\x10", b"\x18", b"\x20", b"\x28")
_USAGE_ESTIMATED = b"\x30\x01"

_UINT32_MAX = 2**32 - 1
_INT64_MAX = 2**63 - 1
_ONE_BYTE = tuple(bytes((n,)) for n in range(128))
# Distinct shared-field combinations kept; past this the cache starts over.
_MAX_TEMPLATES = 4096


def fill_fixed(
    message: sidecar_service_pb2.Outcome,
    tenant: str,
    record: AttemptRecord,
    client_key_id: str = "",
    public_model: str = "",
) -> None:
    """The fields many attempts share: whose, which key and model, how it ended."""
    key = record.attempt.key
    if key is None:
        raise ValueError("a keyless attempt has no outcome to report")
    c = record.classification
    target = record.attempt.target
    message.tenant = tenant
    message.key_id = key.id
    message.provider = provider_to_proto(target.provider)
    message.model = target.upstream_model
    message.outcome_class = convert.error_class_to_proto(c.error_class)
    message.status_code = max(0, c.status)
    message.recovered = record.recovered
    message.provider_final = record.provider_final
    message.reason = c.reason[:200]
    node_id = _node_id(record)
    if node_id:
        message.node_id = node_id  # the control plane folds it into the node's health
    message.client_key_id = client_key_id
    message.public_model = public_model


def _node_id(record: AttemptRecord) -> str:
    """The id of the node an attempt went to (``sidecar.node_affinity.NodeAttempt``), or ""."""
    found: str = getattr(record.attempt, "node_id", "")
    return found


def fill_varying(message: sidecar_service_pb2.Outcome, record: AttemptRecord, request_id: str) -> None:
    """The fields of this one attempt: when, how long, which request, whether another followed."""
    message.latency_ms = min(record.latency_ms, 2**32 - 1)
    message.request_id = request_id
    if record.superseded:
        message.superseded = True
    started = record.started
    seconds = int(started // 1)
    stamp = message.time
    stamp.seconds = seconds
    stamp.nanos = min(round((started - seconds) * 1e9), 999_999_999)
    retry_after = record.classification.retry_after
    if retry_after is not None:
        message.retry_after.FromNanoseconds(int(retry_after * 1e9))
    usage = record.usage
    if usage is not None:
        u = message.usage
        u.input_tokens = usage.input_tokens
        u.cached_input_tokens = usage.cached_input_tokens
        u.cache_write_input_tokens = usage.cache_write_input_tokens
        u.output_tokens = usage.output_tokens
        u.reasoning_tokens = usage.reasoning_tokens
        u.estimated = usage.estimated
        if not message.HasField("usage"):  # all zero: still say that usage was read
            u.SetInParent()


def fill_outcome(
    message: sidecar_service_pb2.Outcome,
    tenant: str,
    record: AttemptRecord,
    request_id: str,
    client_key_id: str = "",
    public_model: str = "",
) -> None:
    """Write the report of one keyed attempt into ``message`` (field by field, in place)."""
    fill_fixed(message, tenant, record, client_key_id, public_model)
    fill_varying(message, record, request_id)


def outcome_to_proto(
    tenant: str, record: AttemptRecord, request_id: str, client_key_id: str = "", public_model: str = ""
) -> sidecar_service_pb2.Outcome | None:
    """The report for one attempt; None for a keyless attempt (nothing to attribute it to)."""
    if record.attempt.key is None:
        return None
    message = sidecar_service_pb2.Outcome()
    fill_outcome(message, tenant, record, request_id, client_key_id, public_model)
    return message


def _usage_bytes(usage: Usage) -> bytes:
    """``Outcome.usage`` as wire bytes (zero counts left out, as protobuf does)."""
    body = b"".join(
        tag + varint(value)
        for tag, value in zip(
            _USAGE_TAGS,
            (
                usage.input_tokens,
                usage.cached_input_tokens,
                usage.cache_write_input_tokens,
                usage.output_tokens,
                usage.reasoning_tokens,
            ),
            strict=True,
        )
        if value
    )
    if usage.estimated:
        body += _USAGE_ESTIMATED
    return _TAG_USAGE + varint(len(body)) + body


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer (unrolled up to 5 bytes:
    every value the reports carry but ``dropped``)."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x20_0000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    if value < 0x1000_0000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14 & 0x7F | 0x80, value >> 21))
    if value < 0x8_0000_0000:
        return bytes(
            (
                value & 0x7F | 0x80,
                value >> 7 & 0x7F | 0x80,
                value >> 14 & 0x7F | 0x80,
                value >> 21 & 0x7F | 0x80,
                value >> 28,
            )
        )
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _seconds_nanos(seconds: int, nanos: int) -> bytes:
    """The body of a Timestamp or Duration (non-negative parts; zeros are left out)."""
    if seconds:
        if nanos:
            return _TAG_SECONDS + varint(seconds) + _TAG_NANOS + varint(nanos)
        return _TAG_SECONDS + varint(seconds)
    return _TAG_NANOS + varint(nanos) if nanos else b""


class OutcomeEncoder:
    """``Outcome`` wire bytes of keyed attempts; the same message ``fill_outcome`` writes."""

    __slots__ = ("_second", "_second_bytes", "_templates")

    def __init__(self) -> None:
        self._templates: dict[tuple[object, ...], bytes] = {}
        # The last start second seen and its encoding (consecutive attempts share it).
        self._second = 0
        self._second_bytes = b""

    def encode(
        self, tenant: str, record: AttemptRecord, request_id: str, client_key_id: str = "", public_model: str = ""
    ) -> bytes:
        key = record.attempt.key
        if key is None:
            raise ValueError("a keyless attempt has no outcome to report")
        c = record.classification
        target = record.attempt.target
        shape = (
            tenant,
            key.id,
            target.provider,
            target.upstream_model,
            c.error_class,
            c.status,
            c.reason,
            record.recovered,
            record.provider_final,
            client_key_id,
            public_model,
            _node_id(record),
        )
        template = self._templates.get(shape)
        if template is None:
            fixed = sidecar_service_pb2.Outcome()
            fill_fixed(fixed, tenant, record, client_key_id, public_model)
            template = fixed.SerializeToString()
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[shape] = template
        started = record.started
        seconds = int(started // 1)
        retry_after = c.retry_after
        retry_ns = 0 if retry_after is None else int(retry_after * 1e9)
        usage = record.usage
        if (
            started < 0
            or seconds > _INT64_MAX
            or retry_ns < 0
            or record.latency_ms < 0
            or (
                usage is not None
                and min(
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.cache_write_input_tokens,
                    usage.output_tokens,
                    usage.reasoning_tokens,
                )
                < 0
            )
        ):
            # Outside the short path: let protobuf encode it.
            message = sidecar_service_pb2.Outcome()
            fill_outcome(message, tenant, record, request_id, client_key_id, public_model)
            return message.SerializeToString()
        parts = [template]
        latency = min(record.latency_ms, _UINT32_MAX)
        if latency > 0:
            parts.append(_TAG_LATENCY_MS + varint(latency))
        if retry_after is not None:
            duration = _seconds_nanos(*divmod(retry_ns, 1_000_000_000))
            parts.append(_TAG_RETRY_AFTER + varint(len(duration)) + duration)
        if request_id:
            raw_id = request_id.encode()
            parts.append(_TAG_REQUEST_ID + varint(len(raw_id)) + raw_id)
        if seconds != self._second:
            self._second, self._second_bytes = seconds, _TAG_SECONDS + varint(seconds) if seconds else b""
        nanos = min(round((started - seconds) * 1e9), 999_999_999)
        stamp = self._second_bytes + _TAG_NANOS + varint(nanos) if nanos else self._second_bytes
        parts.append(_TAG_TIME + _ONE_BYTE[len(stamp)] + stamp)  # at most 1 + 10 + 1 + 5 bytes
        if usage is not None:
            parts.append(_usage_bytes(usage))
        if record.superseded:
            parts.append(_SUPERSEDED)
        return b"".join(parts)

    def __len__(self) -> int:
        return len(self._templates)


def frame_outcome(outcome: bytes) -> bytes:
    """An encoded ``Outcome`` as one element of ``ReportOutcomesRequest.outcomes``."""
    return _TAG_OUTCOMES + varint(len(outcome)) + outcome


def batch_request(framed: Iterable[bytes], sidecar_id: str, dropped: int) -> bytes:
    """A serialized ``ReportOutcomesRequest`` of outcomes passed through ``frame_outcome``."""
    tail = b""
    if sidecar_id:
        raw_id = sidecar_id.encode()
        tail = _TAG_SIDECAR_ID + varint(len(raw_id)) + raw_id
    if dropped:
        tail += _TAG_DROPPED + varint(dropped)
    return b"".join(framed) + tail
