"""Domain <-> protobuf conversion.

Pure functions, no validation beyond what a conversion needs: the control
plane validates requests in ``control_plane.validation`` first.

The admin ``ProviderKey`` message never carries a secret (only the
fingerprint and last 4 characters); ``sidecar_key_to_proto`` is the one
place a decrypted secret goes into a message, for the sidecar watch stream.

Health travels in three shapes: ``keyplane.health`` values (``HealthChange``
with epoch-second ``until``; what the state machines use), domain records
(``KeyHealth`` / ``ProviderHealth`` with datetimes; what the store keeps) and
protobuf messages (what the wire carries). The functions at the end convert
between them; unset ``until`` means None everywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

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
from keyplane.health.classify import Classification, ErrorClass
from keyplane.health.machine import HealthChange, KeyScope, Outcome, ProviderScope, Verdict
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = [
    "client_key_to_proto",
    "datetime_from_epoch",
    "datetime_from_timestamp",
    "epoch_from_datetime",
    "error_class_from_proto",
    "error_class_to_proto",
    "etag_from_revision",
    "health_change_from_proto",
    "health_change_from_record",
    "health_change_to_proto",
    "health_record",
    "health_state_from_proto",
    "health_state_to_proto",
    "key_health_from_proto",
    "key_health_to_proto",
    "key_status_from_proto",
    "key_status_to_proto",
    "outcome_from_proto",
    "outcome_to_proto",
    "provider_from_proto",
    "provider_health_from_proto",
    "provider_health_to_proto",
    "provider_key_to_proto",
    "provider_to_proto",
    "revision_from_etag",
    "route_from_proto",
    "route_target_from_proto",
    "route_target_to_proto",
    "route_to_proto",
    "sidecar_client_key_to_proto",
    "sidecar_key_to_proto",
    "tenant_to_proto",
    "timestamp_from_datetime",
]

_PROVIDER_TO_PROTO: dict[Provider, resources_pb2.Provider.ValueType] = {
    Provider.OPENAI: resources_pb2.PROVIDER_OPENAI,
    Provider.ANTHROPIC: resources_pb2.PROVIDER_ANTHROPIC,
    Provider.AZURE_OPENAI: resources_pb2.PROVIDER_AZURE_OPENAI,
    Provider.GEMINI: resources_pb2.PROVIDER_GEMINI,
    Provider.OPENROUTER: resources_pb2.PROVIDER_OPENROUTER,
    Provider.OPENAI_COMPATIBLE: resources_pb2.PROVIDER_OPENAI_COMPATIBLE,
    Provider.VLLM: resources_pb2.PROVIDER_VLLM,
}
_PROVIDER_FROM_PROTO: dict[int, Provider] = {int(v): k for k, v in _PROVIDER_TO_PROTO.items()}

_STATUS_TO_PROTO: dict[KeyStatus, resources_pb2.KeyStatus.ValueType] = {
    KeyStatus.ACTIVE: resources_pb2.KEY_STATUS_ACTIVE,
    KeyStatus.DISABLED: resources_pb2.KEY_STATUS_DISABLED,
    KeyStatus.REVOKED: resources_pb2.KEY_STATUS_REVOKED,
}
_STATUS_FROM_PROTO: dict[int, KeyStatus] = {int(v): k for k, v in _STATUS_TO_PROTO.items()}

_HEALTH_TO_PROTO: dict[HealthState, resources_pb2.HealthState.ValueType] = {
    HealthState.HEALTHY: resources_pb2.HEALTH_STATE_HEALTHY,
    HealthState.COOLDOWN: resources_pb2.HEALTH_STATE_COOLDOWN,
    HealthState.UNHEALTHY: resources_pb2.HEALTH_STATE_UNHEALTHY,
    HealthState.DEGRADED: resources_pb2.HEALTH_STATE_DEGRADED,
    HealthState.EXHAUSTED: resources_pb2.HEALTH_STATE_EXHAUSTED,
}
_HEALTH_FROM_PROTO: dict[int, HealthState] = {int(v): k for k, v in _HEALTH_TO_PROTO.items()}

_CLASS_TO_PROTO: dict[ErrorClass, sidecar_service_pb2.OutcomeClass.ValueType] = {
    ErrorClass.SUCCESS: sidecar_service_pb2.OUTCOME_CLASS_SUCCESS,
    ErrorClass.CREDENTIAL: sidecar_service_pb2.OUTCOME_CLASS_CREDENTIAL,
    ErrorClass.RATE_LIMITED: sidecar_service_pb2.OUTCOME_CLASS_RATE_LIMITED,
    ErrorClass.UPSTREAM_ERROR: sidecar_service_pb2.OUTCOME_CLASS_UPSTREAM_ERROR,
    ErrorClass.CLIENT_ERROR: sidecar_service_pb2.OUTCOME_CLASS_CLIENT_ERROR,
    ErrorClass.STREAM_BROKEN: sidecar_service_pb2.OUTCOME_CLASS_STREAM_BROKEN,
    ErrorClass.EXHAUSTED: sidecar_service_pb2.OUTCOME_CLASS_EXHAUSTED,
}
_CLASS_FROM_PROTO: dict[int, ErrorClass] = {int(v): k for k, v in _CLASS_TO_PROTO.items()}

# Bounds on what a sidecar report may carry into health reasons and cooldowns.
MAX_REASON_CHARS = 200
MAX_RETRY_AFTER = 3600.0


# enums -----------------------------------------------------------------------
def provider_to_proto(provider: Provider) -> resources_pb2.Provider.ValueType:
    return _PROVIDER_TO_PROTO[provider]


def provider_from_proto(value: int) -> Provider | None:
    """The domain provider, or None for PROVIDER_UNSPECIFIED or an unknown number."""
    return _PROVIDER_FROM_PROTO.get(int(value))


def key_status_to_proto(status: KeyStatus) -> resources_pb2.KeyStatus.ValueType:
    return _STATUS_TO_PROTO[status]


def key_status_from_proto(value: int) -> KeyStatus | None:
    """The domain status, or None for KEY_STATUS_UNSPECIFIED or an unknown number."""
    return _STATUS_FROM_PROTO.get(int(value))


def health_state_to_proto(state: HealthState) -> resources_pb2.HealthState.ValueType:
    return _HEALTH_TO_PROTO[state]


def health_state_from_proto(value: int) -> HealthState | None:
    """The domain state, or None for HEALTH_STATE_UNSPECIFIED or an unknown number."""
    return _HEALTH_FROM_PROTO.get(int(value))


def error_class_to_proto(error_class: ErrorClass) -> sidecar_service_pb2.OutcomeClass.ValueType:
    return _CLASS_TO_PROTO[error_class]


def error_class_from_proto(value: int) -> ErrorClass | None:
    """The error class, or None for OUTCOME_CLASS_UNSPECIFIED or an unknown number."""
    return _CLASS_FROM_PROTO.get(int(value))


# time ------------------------------------------------------------------------
def timestamp_from_datetime(value: datetime) -> Timestamp:
    """A Timestamp for ``value``; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def datetime_from_timestamp(value: Timestamp) -> datetime:
    """An aware UTC datetime."""
    return value.ToDatetime(tzinfo=UTC)


def datetime_from_epoch(value: float) -> datetime:
    """An aware UTC datetime for epoch seconds."""
    return datetime.fromtimestamp(value, tz=UTC)


def epoch_from_datetime(value: datetime) -> float:
    """Epoch seconds; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# etags -----------------------------------------------------------------------
# An etag is the object's store revision as ``r<revision>``. Clients must
# treat it as opaque: compare it for equality and send it back, nothing else.
_ETAG_PREFIX = "r"


def etag_from_revision(revision: int) -> str:
    return f"{_ETAG_PREFIX}{revision}"


def revision_from_etag(etag: str) -> int:
    """The revision an etag stands for; ValueError when it is not one of ours."""
    digits = etag.removeprefix(_ETAG_PREFIX)
    if digits == etag or not digits.isascii() or not digits.isdigit() or len(digits) > 18 or int(digits) < 1:
        raise ValueError(f"etag {etag[:40]!r} is not an etag this API returned")
    return int(digits)


# resources -------------------------------------------------------------------
def tenant_to_proto(tenant: Tenant) -> resources_pb2.Tenant:
    return resources_pb2.Tenant(
        name=tenant.name,
        create_time=timestamp_from_datetime(tenant.created_at),
        etag=etag_from_revision(tenant.revision),
    )


def provider_key_to_proto(key: ProviderKey) -> resources_pb2.ProviderKey:
    """The admin view of a key: never the secret, only fingerprint and last4."""
    return resources_pb2.ProviderKey(
        id=key.id,
        tenant=key.tenant,
        provider=provider_to_proto(key.provider),
        label=key.label,
        base_url=key.base_url,
        status=key_status_to_proto(key.status),
        weight=key.weight,
        allowed_models=list(key.allowed_models),
        fingerprint=key.fingerprint,
        last4=key.last4,
        create_time=timestamp_from_datetime(key.created_at),
        update_time=timestamp_from_datetime(key.updated_at),
        etag=etag_from_revision(key.revision),
    )


def sidecar_key_to_proto(key: ProviderKey, secret: str) -> sidecar_service_pb2.SidecarProviderKey:
    """The sidecar view of a key, with its decrypted ``secret``."""
    return sidecar_service_pb2.SidecarProviderKey(
        id=key.id,
        provider=provider_to_proto(key.provider),
        base_url=key.base_url,
        secret=secret,
        status=key_status_to_proto(key.status),
        weight=key.weight,
        allowed_models=list(key.allowed_models),
        label=key.label,
    )


def route_target_to_proto(target: RouteTarget) -> resources_pb2.RouteTarget:
    return resources_pb2.RouteTarget(
        provider=provider_to_proto(target.provider),
        upstream_model=target.upstream_model,
        priority=target.priority,
        weight=target.weight,
        node_urls=list(target.node_urls),
        api_version=target.api_version,
        deployment=target.deployment,
        endpoints=[endpoint_to_proto(e) for e in target.endpoints],
    )


def endpoint_to_proto(name: str) -> resources_pb2.Endpoint.ValueType:
    """``"embeddings"`` -> ENDPOINT_EMBEDDINGS; ValueError for an unknown name."""
    return resources_pb2.Endpoint.Value("ENDPOINT_" + name.upper())


def endpoint_from_proto(value: int) -> str | None:
    """ENDPOINT_EMBEDDINGS -> ``"embeddings"``; None for unspecified or unknown values."""
    if value == resources_pb2.ENDPOINT_UNSPECIFIED:
        return None
    try:
        return resources_pb2.Endpoint.Name(value)[len("ENDPOINT_") :].lower()  # type: ignore[arg-type]
    except ValueError:
        return None


def endpoint_names() -> tuple[str, ...]:
    """Every endpoint name this build knows."""
    return tuple(n for v in resources_pb2.Endpoint.values() if (n := endpoint_from_proto(v)) is not None)


def route_target_from_proto(message: resources_pb2.RouteTarget) -> RouteTarget:
    """Raises ValueError for an unspecified or unknown provider."""
    provider = provider_from_proto(message.provider)
    if provider is None:
        raise ValueError(f"route target has no known provider (enum value {int(message.provider)})")
    return RouteTarget(
        provider=provider,
        upstream_model=message.upstream_model,
        priority=message.priority,
        weight=message.weight,
        node_urls=tuple(message.node_urls),
        api_version=message.api_version,
        deployment=message.deployment,
        endpoints=tuple(n for e in message.endpoints if (n := endpoint_from_proto(e)) is not None),
    )


def route_to_proto(route: Route) -> resources_pb2.Route:
    return resources_pb2.Route(
        id=route.id,
        tenant=route.tenant,
        public_model=route.public_model,
        targets=[route_target_to_proto(t) for t in route.targets],
        create_time=timestamp_from_datetime(route.created_at),
        update_time=timestamp_from_datetime(route.updated_at),
        etag=etag_from_revision(route.revision),
    )


def route_from_proto(message: resources_pb2.Route) -> Route:
    """Raises ValueError when a target has no known provider."""
    return Route(
        id=message.id,
        tenant=message.tenant,
        public_model=message.public_model,
        targets=tuple(route_target_from_proto(t) for t in message.targets),
        created_at=datetime_from_timestamp(message.create_time),
        updated_at=datetime_from_timestamp(message.update_time),
        revision=revision_from_etag(message.etag) if message.etag else 1,
    )


def client_key_to_proto(client_key: ClientKey) -> resources_pb2.ClientKey:
    """The admin view: the prefix only, never the token or its hash."""
    return resources_pb2.ClientKey(
        id=client_key.id,
        tenant=client_key.tenant,
        label=client_key.label,
        prefix=client_key.prefix,
        create_time=timestamp_from_datetime(client_key.created_at),
        etag=etag_from_revision(client_key.revision),
    )


def sidecar_client_key_to_proto(client_key: ClientKey) -> sidecar_service_pb2.SidecarClientKey:
    return sidecar_service_pb2.SidecarClientKey(id=client_key.id, token_sha256=client_key.token_sha256)


# learnt health ---------------------------------------------------------------
def key_health_to_proto(health: KeyHealth) -> resources_pb2.KeyHealth:
    message = resources_pb2.KeyHealth(
        key_id=health.key_id,
        model=health.model,
        state=health_state_to_proto(health.state),
        reason=health.reason,
        update_time=timestamp_from_datetime(health.updated_at),
    )
    if health.until is not None:
        message.until.CopyFrom(timestamp_from_datetime(health.until))
    return message


def key_health_from_proto(tenant: str, message: resources_pb2.KeyHealth) -> KeyHealth:
    """Raises ValueError for an unspecified or unknown state."""
    return KeyHealth(
        tenant=tenant,
        key_id=message.key_id,
        model=message.model,
        state=_health_state(message.state),
        until=datetime_from_timestamp(message.until) if message.HasField("until") else None,
        reason=message.reason,
        updated_at=datetime_from_timestamp(message.update_time),
    )


def provider_health_to_proto(health: ProviderHealth) -> resources_pb2.ProviderHealth:
    message = resources_pb2.ProviderHealth(
        provider=provider_to_proto(health.provider),
        model=health.model,
        state=health_state_to_proto(health.state),
        reason=health.reason,
        update_time=timestamp_from_datetime(health.updated_at),
    )
    if health.until is not None:
        message.until.CopyFrom(timestamp_from_datetime(health.until))
    return message


def provider_health_from_proto(tenant: str, message: resources_pb2.ProviderHealth) -> ProviderHealth:
    """Raises ValueError for an unknown provider or state."""
    provider = provider_from_proto(message.provider)
    if provider is None:
        raise ValueError(f"provider health has no known provider (enum value {int(message.provider)})")
    return ProviderHealth(
        tenant=tenant,
        provider=provider,
        model=message.model,
        state=_health_state(message.state),
        until=datetime_from_timestamp(message.until) if message.HasField("until") else None,
        reason=message.reason,
        updated_at=datetime_from_timestamp(message.update_time),
    )


def _health_state(value: int) -> HealthState:
    state = health_state_from_proto(value)
    if state is None:
        raise ValueError(f"health entry has no known state (enum value {int(value)})")
    return state


def health_record(tenant: str, change: HealthChange, *, updated_at: datetime) -> KeyHealth | ProviderHealth:
    """The store's record of a state-machine transition."""
    verdict = change.verdict
    until = datetime_from_epoch(verdict.until) if verdict.until is not None else None
    scope = change.scope
    if isinstance(scope, KeyScope):
        return KeyHealth(tenant, scope.key_id, scope.model, verdict.state, until, verdict.reason, updated_at)
    return ProviderHealth(tenant, scope.provider, scope.model, verdict.state, until, verdict.reason, updated_at)


def health_change_from_record(record: KeyHealth | ProviderHealth) -> HealthChange:
    until = epoch_from_datetime(record.until) if record.until is not None else None
    verdict = Verdict(state=record.state, until=until, reason=record.reason)
    if isinstance(record, KeyHealth):
        return HealthChange(KeyScope(record.key_id, record.model), verdict)
    return HealthChange(ProviderScope(record.provider, record.model), verdict)


def health_change_to_proto(
    change: HealthChange, *, updated_at: datetime
) -> resources_pb2.KeyHealth | resources_pb2.ProviderHealth:
    record = health_record("", change, updated_at=updated_at)
    if isinstance(record, KeyHealth):
        return key_health_to_proto(record)
    return provider_health_to_proto(record)


def health_change_from_proto(message: resources_pb2.KeyHealth | resources_pb2.ProviderHealth) -> HealthChange:
    """The state-machine view of a health message (what a sidecar applies to
    its book). Raises ValueError for an unknown state or provider."""
    if isinstance(message, resources_pb2.KeyHealth):
        return health_change_from_record(key_health_from_proto("", message))
    return health_change_from_record(provider_health_from_proto("", message))


def _clean_reason(text: str) -> str:
    """At most MAX_REASON_CHARS printable characters."""
    text = text[:MAX_REASON_CHARS]
    if text.isprintable():  # the usual case: nothing to replace
        return text.strip()
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def outcome_from_proto(message: sidecar_service_pb2.Outcome) -> Outcome:
    """The state-machine input for a reported outcome (the tenant is the
    caller's business). Raises ValueError when the class or provider is
    unspecified or unknown, or the key id or model is missing. The reason is
    cut to MAX_REASON_CHARS printable characters and retry_after clamped to
    [0, MAX_RETRY_AFTER]."""
    error_class = error_class_from_proto(message.outcome_class)
    if error_class is None:
        raise ValueError(f"outcome has no known class (enum value {int(message.outcome_class)})")
    provider = provider_from_proto(message.provider)
    if provider is None:
        raise ValueError(f"outcome has no known provider (enum value {int(message.provider)})")
    if not message.key_id or not message.model:
        raise ValueError("outcome needs a key_id and a model")
    retry_after: float | None = None
    if message.HasField("retry_after"):
        retry_after = min(max(message.retry_after.ToNanoseconds() / 1e9, 0.0), MAX_RETRY_AFTER)
    status = int(message.status_code)
    reason = _clean_reason(message.reason) or (f"{status} {error_class.value}" if status else error_class.value)
    return Outcome(
        key_id=message.key_id,
        provider=provider,
        model=message.model,
        classification=Classification(error_class, status, reason, retry_after),
        provider_final=message.provider_final,
        recovered=message.recovered,
    )


def outcome_to_proto(
    tenant: str,
    outcome: Outcome,
    *,
    latency_ms: int = 0,
    request_id: str = "",
    time: datetime | None = None,
) -> sidecar_service_pb2.Outcome:
    """The report of one attempt, as a sidecar sends it."""
    classification = outcome.classification
    message = sidecar_service_pb2.Outcome(
        tenant=tenant,
        key_id=outcome.key_id,
        provider=provider_to_proto(outcome.provider),
        model=outcome.model,
        outcome_class=error_class_to_proto(classification.error_class),
        status_code=max(0, classification.status),
        latency_ms=max(0, latency_ms),
        recovered=outcome.recovered,
        provider_final=outcome.provider_final,
        request_id=request_id,
        reason=classification.reason,
    )
    if classification.retry_after is not None:
        message.retry_after.FromNanoseconds(int(max(0.0, classification.retry_after) * 1e9))
    if time is not None:
        message.time.CopyFrom(timestamp_from_datetime(time))
    return message
