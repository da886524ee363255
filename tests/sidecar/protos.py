"""Builders for the watch-stream messages the sidecar consumes (its real input)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.v1 import resources_pb2, sidecar_service_pb2

OPENAI = resources_pb2.PROVIDER_OPENAI
GEMINI = resources_pb2.PROVIDER_GEMINI
ANTHROPIC = resources_pb2.PROVIDER_ANTHROPIC
AZURE = resources_pb2.PROVIDER_AZURE_OPENAI
COMPATIBLE = resources_pb2.PROVIDER_OPENAI_COMPATIBLE
VLLM = resources_pb2.PROVIDER_VLLM
ENDPOINT_CHAT_COMPLETIONS = resources_pb2.ENDPOINT_CHAT_COMPLETIONS
ACTIVE = resources_pb2.KEY_STATUS_ACTIVE
DISABLED = resources_pb2.KEY_STATUS_DISABLED
REVOKED = resources_pb2.KEY_STATUS_REVOKED
HEALTHY = resources_pb2.HEALTH_STATE_HEALTHY
COOLDOWN = resources_pb2.HEALTH_STATE_COOLDOWN
UNHEALTHY = resources_pb2.HEALTH_STATE_UNHEALTHY
DEGRADED = resources_pb2.HEALTH_STATE_DEGRADED


def pkey(
    id: str,
    secret: str,
    *,
    provider: resources_pb2.Provider.ValueType = OPENAI,
    base_url: str = "",
    status: resources_pb2.KeyStatus.ValueType = ACTIVE,
    weight: int = 1,
    allowed_models: Sequence[str] = (),
) -> sidecar_service_pb2.SidecarProviderKey:
    return sidecar_service_pb2.SidecarProviderKey(
        id=id,
        provider=provider,
        base_url=base_url,
        secret=secret,
        status=status,
        weight=weight,
        allowed_models=list(allowed_models),
        label=f"label-{id}",
    )


def target(
    upstream_model: str,
    *,
    provider: resources_pb2.Provider.ValueType = OPENAI,
    priority: int = 0,
    weight: int = 1,
    node_urls: Sequence[str] = (),
    api_version: str = "",
    deployment: str = "",
    endpoints: Sequence[resources_pb2.Endpoint.ValueType] = (),
) -> resources_pb2.RouteTarget:
    return resources_pb2.RouteTarget(
        provider=provider,
        upstream_model=upstream_model,
        priority=priority,
        weight=weight,
        node_urls=list(node_urls),
        api_version=api_version,
        deployment=deployment,
        endpoints=list(endpoints),
    )


def route(id: str, public_model: str, *targets: resources_pb2.RouteTarget, tenant: str = "") -> resources_pb2.Route:
    return resources_pb2.Route(id=id, tenant=tenant, public_model=public_model, targets=list(targets))


def client_key(id: str, token: str) -> sidecar_service_pb2.SidecarClientKey:
    return sidecar_service_pb2.SidecarClientKey(id=id, token_sha256=hashlib.sha256(token.encode()).digest())


def _timestamp(epoch: float | None) -> Timestamp | None:
    if epoch is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(epoch * 1e9))
    return ts


def key_health(
    key_id: str,
    model: str = "",
    state: resources_pb2.HealthState.ValueType = UNHEALTHY,
    *,
    until: float | None = None,
    reason: str = "401 invalid_api_key",
) -> resources_pb2.KeyHealth:
    return resources_pb2.KeyHealth(key_id=key_id, model=model, state=state, until=_timestamp(until), reason=reason)


def provider_health(
    provider: resources_pb2.Provider.ValueType,
    model: str,
    state: resources_pb2.HealthState.ValueType = DEGRADED,
    *,
    until: float | None = None,
    reason: str = "503 failed end to end",
) -> resources_pb2.ProviderHealth:
    return resources_pb2.ProviderHealth(
        provider=provider, model=model, state=state, until=_timestamp(until), reason=reason
    )


def tenant_state(
    tenant: str,
    *,
    keys: Sequence[sidecar_service_pb2.SidecarProviderKey] = (),
    routes: Sequence[resources_pb2.Route] = (),
    client_keys: Sequence[sidecar_service_pb2.SidecarClientKey] = (),
    key_health: Sequence[resources_pb2.KeyHealth] = (),
    provider_health: Sequence[resources_pb2.ProviderHealth] = (),
) -> sidecar_service_pb2.TenantState:
    return sidecar_service_pb2.TenantState(
        tenant=tenant,
        keys=list(keys),
        routes=list(routes),
        client_keys=list(client_keys),
        key_health=list(key_health),
        provider_health=list(provider_health),
    )


def snapshot(version: int, *tenants: sidecar_service_pb2.TenantState) -> sidecar_service_pb2.WatchResponse:
    return sidecar_service_pb2.WatchResponse(
        version=version, snapshot=sidecar_service_pb2.Snapshot(tenants=list(tenants))
    )


def delta(*changes: sidecar_service_pb2.Change) -> sidecar_service_pb2.WatchResponse:
    version = max((c.version for c in changes), default=0)
    return sidecar_service_pb2.WatchResponse(version=version, delta=sidecar_service_pb2.Delta(changes=list(changes)))


def key_put(version: int, tenant: str, key: sidecar_service_pb2.SidecarProviderKey) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, key_put=key)


def key_deleted(version: int, tenant: str, key_id: str) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, key_deleted=key_id)


def route_put(version: int, tenant: str, r: resources_pb2.Route) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, route_put=r)


def route_deleted(version: int, tenant: str, route_id: str) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, route_deleted=route_id)


def client_key_put(version: int, tenant: str, ck: sidecar_service_pb2.SidecarClientKey) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, client_key_put=ck)


def client_key_deleted(version: int, tenant: str, ck_id: str) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, client_key_deleted=ck_id)


def tenant_deleted(version: int, tenant: str) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, tenant_deleted=True)


def key_health_put(version: int, tenant: str, kh: resources_pb2.KeyHealth) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, key_health=kh)


def provider_health_put(version: int, tenant: str, ph: resources_pb2.ProviderHealth) -> sidecar_service_pb2.Change:
    return sidecar_service_pb2.Change(version=version, tenant=tenant, provider_health=ph)
