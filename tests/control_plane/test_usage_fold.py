"""``UsageFolder.fold`` (pure, no I/O): every outcome is an attempt; only an outcome
not ``superseded`` (the app request's last attempt) counts a request, failed when
that attempt failed; an old sidecar's outcomes (never superseded) are a request each."""

from __future__ import annotations

from control_plane.usage import UsageFolder
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from keyplane.v1 import usage_pb2 as upb

NOW = 1_700_000_040.0
MINUTE = 1_700_000_040 // 60 * 60
# Indexes of a folded row's counters (control_plane.usage).
REQ, FAILED, EST, METERED, ATT = 0, 1, 2, 3, 9


def outcome(
    key_id: str,
    cls: int = spb.OUTCOME_CLASS_SUCCESS,
    *,
    superseded: bool = False,
    usage: upb.Usage | None = None,
) -> spb.Outcome:
    message = spb.Outcome(
        tenant="acme",
        key_id=key_id,
        provider=rpb.PROVIDER_OPENAI,
        model="gpt-4o-mini",
        outcome_class=cls,  # type: ignore[arg-type]
        client_key_id="ck_1",
        public_model="gpt",
        superseded=superseded,
    )
    if usage is not None:
        message.usage.CopyFrom(usage)
    message.time.FromSeconds(int(NOW))
    return message


def folded(*outcomes: spb.Outcome) -> dict[str, list[int]]:
    folder = UsageFolder(clock=lambda: NOW)
    folder.fold(outcomes)
    assert folder.folded == len(outcomes)
    rows, _ = folder.take()
    assert {k[0] for k in rows} <= {MINUTE}
    return {key[4]: row for key, row in rows.items()}


def counts(row: list[int]) -> tuple[int, int, int]:
    return row[REQ], row[FAILED], row[ATT]


def test_a_failover_is_one_request_in_the_last_keys_row_and_two_attempts() -> None:
    rows = folded(
        outcome("pk_a", spb.OUTCOME_CLASS_RATE_LIMITED, superseded=True),
        outcome("pk_b", usage=upb.Usage(input_tokens=10, output_tokens=2)),
    )
    assert counts(rows["pk_a"]) == (0, 0, 1)
    assert counts(rows["pk_b"]) == (1, 0, 1)
    assert rows["pk_b"][METERED] == 1 and rows["pk_a"][METERED] == 0


def test_a_request_whose_every_attempt_failed_is_one_failed_request() -> None:
    rows = folded(
        outcome("pk_a", spb.OUTCOME_CLASS_UPSTREAM_ERROR, superseded=True),
        outcome("pk_b", spb.OUTCOME_CLASS_RATE_LIMITED, superseded=True),
        outcome("pk_a", spb.OUTCOME_CLASS_UPSTREAM_ERROR),
    )
    assert counts(rows["pk_a"]) == (1, 1, 2)
    assert counts(rows["pk_b"]) == (0, 0, 1)
    assert sum(r[REQ] for r in rows.values()) == 1 and sum(r[ATT] for r in rows.values()) == 3


def test_outcomes_of_an_old_sidecar_are_a_request_each() -> None:
    rows = folded(
        outcome("pk_a", spb.OUTCOME_CLASS_RATE_LIMITED),
        outcome("pk_a", spb.OUTCOME_CLASS_SUCCESS),
        outcome("pk_a", spb.OUTCOME_CLASS_STREAM_BROKEN),
    )
    assert counts(rows["pk_a"]) == (3, 2, 3)


def test_usage_of_a_superseded_attempt_still_counts() -> None:
    """A superseded attempt's usage (tokens, estimates) is the attempt's: it is kept."""
    estimated = upb.Usage(input_tokens=7, output_tokens=3, estimated=True)
    rows = folded(outcome("pk_a", spb.OUTCOME_CLASS_STREAM_BROKEN, superseded=True, usage=estimated))
    row = rows["pk_a"]
    assert counts(row) == (0, 0, 1)
    assert row[EST] == 1 and row[METERED] == 1
