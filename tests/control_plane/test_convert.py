"""Domain <-> protobuf conversion."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import pytest

from keyplane import convert
from keyplane.crypto import SecretBox, fingerprint, last4
from keyplane.domain import (
    ClientKey,
    HealthState,
    KeyHealth,
    KeyStatus,
    Provider,
    ProviderHealth,
    ProviderKey,
    Route,
    RouteTarget,
    Tenant,
)
from keyplane.health import Classification, ErrorClass, HealthChange, KeyScope, Outcome, ProviderScope, Verdict
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb

NOW = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
SECRET = "sk-convert-SECRET-abcdefgh"


def test_enums_round_trip_and_reject_unknown() -> None:
    for provider in Provider:
        assert convert.provider_from_proto(convert.provider_to_proto(provider)) is provider
    for status in KeyStatus:
        assert convert.key_status_from_proto(convert.key_status_to_proto(status)) is status
    assert convert.provider_from_proto(rpb.PROVIDER_UNSPECIFIED) is None
    assert convert.provider_from_proto(99) is None
    assert convert.key_status_from_proto(rpb.KEY_STATUS_UNSPECIFIED) is None
    assert convert.provider_to_proto(Provider.VLLM) == rpb.PROVIDER_VLLM
    # Every proto enum value (but UNSPECIFIED) has a domain twin.
    assert len(rpb.Provider.values()) == len(Provider) + 1
    assert len(rpb.KeyStatus.values()) == len(KeyStatus) + 1


def test_timestamps() -> None:
    ts = convert.timestamp_from_datetime(NOW)
    assert convert.datetime_from_timestamp(ts) == NOW
    plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
    assert convert.timestamp_from_datetime(plus_two) == ts
    assert convert.timestamp_from_datetime(NOW.replace(tzinfo=None)) == ts
    assert convert.datetime_from_timestamp(ts).tzinfo is UTC


def test_provider_key_admin_view_has_no_secret_and_sidecar_view_has_it() -> None:
    box = SecretBox(os.urandom(32))
    key = ProviderKey(
        id="pk_1",
        tenant="acme",
        provider=Provider.ANTHROPIC,
        label="main",
        base_url="https://api.anthropic.com",
        status=KeyStatus.DISABLED,
        weight=3,
        allowed_models=("claude-3",),
        secret_ciphertext=box.seal(SECRET, associated_data="pk_1"),
        fingerprint=fingerprint(SECRET),
        last4=last4(SECRET),
        created_at=NOW,
        updated_at=NOW + timedelta(seconds=1),
    )
    admin = convert.provider_key_to_proto(key)
    assert SECRET.encode() not in admin.SerializeToString()
    assert key.secret_ciphertext not in admin.SerializeToString()
    assert (admin.provider, admin.status, admin.last4) == (rpb.PROVIDER_ANTHROPIC, rpb.KEY_STATUS_DISABLED, "efgh")
    assert convert.datetime_from_timestamp(admin.update_time) == key.updated_at

    sidecar = convert.sidecar_key_to_proto(key, box.open(key.secret_ciphertext, associated_data=key.id))
    assert sidecar.secret == SECRET
    assert (sidecar.id, sidecar.label, list(sidecar.allowed_models)) == ("pk_1", "main", ["claude-3"])


def test_route_round_trip() -> None:
    route = Route(
        id="rt_1",
        tenant="acme",
        public_model="chat",
        targets=(
            RouteTarget(Provider.OPENAI, "gpt-4o", priority=0, weight=2),
            RouteTarget(Provider.VLLM, "llama", priority=1, weight=1, node_urls=("http://a", "http://b")),
        ),
        created_at=NOW,
        updated_at=NOW,
    )
    assert convert.route_from_proto(convert.route_to_proto(route)) == route
    with pytest.raises(ValueError, match="no known provider"):
        convert.route_target_from_proto(rpb.RouteTarget(upstream_model="x"))


def test_tenant_and_client_keys() -> None:
    assert convert.tenant_to_proto(Tenant("acme", NOW)).name == "acme"
    ck = ClientKey("ck_1", "acme", "app", "kp-abcdefg", b"\x07" * 32, NOW)
    admin = convert.client_key_to_proto(ck)
    assert (admin.id, admin.prefix) == ("ck_1", "kp-abcdefg")
    assert b"\x07" * 32 not in admin.SerializeToString()
    assert convert.sidecar_client_key_to_proto(ck).token_sha256 == b"\x07" * 32


def test_health_enums_round_trip() -> None:
    for state in HealthState:
        assert convert.health_state_from_proto(convert.health_state_to_proto(state)) is state
    for error_class in ErrorClass:
        assert convert.error_class_from_proto(convert.error_class_to_proto(error_class)) is error_class
    assert convert.health_state_from_proto(rpb.HEALTH_STATE_UNSPECIFIED) is None
    assert convert.error_class_from_proto(spb.OUTCOME_CLASS_UNSPECIFIED) is None
    assert len(rpb.HealthState.values()) == len(HealthState) + 1
    assert len(spb.OutcomeClass.values()) == len(ErrorClass) + 1


def test_health_changes_through_records_and_messages() -> None:
    until = NOW.timestamp() + 30
    changes = [
        HealthChange(KeyScope("pk_1", ""), Verdict(HealthState.UNHEALTHY, None, "401 invalid_api_key")),
        HealthChange(KeyScope("pk_1", "gpt-4o"), Verdict(HealthState.COOLDOWN, until, "429 rate limited")),
        HealthChange(ProviderScope(Provider.GEMINI, "gemini-2.0"), Verdict(HealthState.DEGRADED, until, "503")),
        HealthChange(KeyScope("pk_2", "m"), Verdict(HealthState.HEALTHY, None, "")),
    ]
    for change in changes:
        record = convert.health_record("acme", change, updated_at=NOW)
        assert record.tenant == "acme" and record.updated_at == NOW
        assert isinstance(record, KeyHealth if isinstance(change.scope, KeyScope) else ProviderHealth)
        assert convert.health_change_from_record(record) == change
        message = convert.health_change_to_proto(change, updated_at=NOW)
        assert convert.health_change_from_proto(message) == change
        assert message.HasField("until") is (change.verdict.until is not None)
        assert convert.datetime_from_timestamp(message.update_time) == NOW
    key_record = convert.health_record("acme", changes[1], updated_at=NOW)
    assert isinstance(key_record, KeyHealth)
    assert key_record.until == datetime.fromtimestamp(until, tz=UTC)
    assert convert.key_health_from_proto("acme", convert.key_health_to_proto(key_record)) == key_record
    with pytest.raises(ValueError):
        convert.health_change_from_proto(rpb.KeyHealth(key_id="pk_1"))  # no state
    with pytest.raises(ValueError):
        convert.health_change_from_proto(rpb.ProviderHealth(model="m", state=rpb.HEALTH_STATE_DEGRADED))


def test_outcomes_round_trip_and_are_bounded() -> None:
    outcome = Outcome(
        key_id="pk_1",
        provider=Provider.ANTHROPIC,
        model="claude",
        classification=Classification(ErrorClass.RATE_LIMITED, 429, "429 rate limited", 2.5),
        provider_final=True,
        recovered=False,
    )
    message = convert.outcome_to_proto("acme", outcome, latency_ms=40, request_id="r1", time=NOW)
    assert message.tenant == "acme" and message.outcome_class == spb.OUTCOME_CLASS_RATE_LIMITED
    assert message.retry_after.ToNanoseconds() == 2_500_000_000
    assert convert.outcome_from_proto(message) == outcome

    message.retry_after.FromSeconds(10**6)
    message.reason = "x\n" * 500
    parsed = convert.outcome_from_proto(message)
    assert parsed.classification.retry_after == convert.MAX_RETRY_AFTER
    assert len(parsed.classification.reason) <= convert.MAX_REASON_CHARS
    assert "\n" not in parsed.classification.reason
    message.ClearField("retry_after")
    message.reason = ""
    assert convert.outcome_from_proto(message).classification == Classification(
        ErrorClass.RATE_LIMITED, 429, "429 rate_limited", None
    )
    for broken in (
        spb.Outcome(key_id="pk_1", model="m", provider=rpb.PROVIDER_OPENAI),
        spb.Outcome(key_id="pk_1", model="m", outcome_class=spb.OUTCOME_CLASS_SUCCESS),
        spb.Outcome(model="m", provider=rpb.PROVIDER_OPENAI, outcome_class=spb.OUTCOME_CLASS_SUCCESS),
        spb.Outcome(key_id="pk_1", provider=rpb.PROVIDER_OPENAI, outcome_class=spb.OUTCOME_CLASS_SUCCESS),
    ):
        with pytest.raises(ValueError):
            convert.outcome_from_proto(broken)


def test_etags_are_revisions_and_reject_anything_else() -> None:
    assert convert.etag_from_revision(1) == "r1"
    for revision in (1, 2, 41, 10**17):
        assert convert.revision_from_etag(convert.etag_from_revision(revision)) == revision
    for bad in ("", "r", "r0", "1", "x1", "r-1", "r1.0", "r 1", "r\u0661", "r" + "9" * 19, 'W/"r1"'):
        with pytest.raises(ValueError, match="not an etag this API returned"):
            convert.revision_from_etag(bad)
