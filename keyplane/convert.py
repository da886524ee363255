"""Domain <-> protobuf conversion.

Pure functions, no validation beyond what a conversion needs: the control
plane validates requests in ``control_plane.validation`` first.

The admin ``ProviderKey`` message never carries a secret (only the
fingerprint and last 4 characters); ``sidecar_key_to_proto`` is the one
place a decrypted secret goes into a message, for the sidecar watch stream.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.domain import ClientKey, KeyStatus, Provider, ProviderKey, Route, RouteTarget, Tenant
from keyplane.v1 import resources_pb2, sidecar_service_pb2

__all__ = [
    "client_key_to_proto",
    "datetime_from_timestamp",
    "key_status_from_proto",
    "key_status_to_proto",
    "provider_from_proto",
    "provider_key_to_proto",
    "provider_to_proto",
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


# resources -------------------------------------------------------------------
def tenant_to_proto(tenant: Tenant) -> resources_pb2.Tenant:
    return resources_pb2.Tenant(name=tenant.name, create_time=timestamp_from_datetime(tenant.created_at))


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
    )


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
    )


def route_to_proto(route: Route) -> resources_pb2.Route:
    return resources_pb2.Route(
        id=route.id,
        tenant=route.tenant,
        public_model=route.public_model,
        targets=[route_target_to_proto(t) for t in route.targets],
        create_time=timestamp_from_datetime(route.created_at),
        update_time=timestamp_from_datetime(route.updated_at),
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
    )


def client_key_to_proto(client_key: ClientKey) -> resources_pb2.ClientKey:
    """The admin view: the prefix only, never the token or its hash."""
    return resources_pb2.ClientKey(
        id=client_key.id,
        tenant=client_key.tenant,
        label=client_key.label,
        prefix=client_key.prefix,
        create_time=timestamp_from_datetime(client_key.created_at),
    )


def sidecar_client_key_to_proto(client_key: ClientKey) -> sidecar_service_pb2.SidecarClientKey:
    return sidecar_service_pb2.SidecarClientKey(id=client_key.id, token_sha256=client_key.token_sha256)
