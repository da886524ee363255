"""Domain objects for store tests, with distinct, ordered timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def ts(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def tenant(name: str = "acme", n: int = 0) -> Tenant:
    return Tenant(name=name, created_at=ts(n))


def provider_key(key_id: str = "pk_1", *, tenant: str = "acme", label: str = "main", n: int = 0) -> ProviderKey:
    return ProviderKey(
        id=key_id,
        tenant=tenant,
        provider=Provider.OPENAI,
        label=label,
        base_url="https://api.openai.com/v1",
        status=KeyStatus.ACTIVE,
        weight=3,
        allowed_models=("gpt-4o", "gpt-4o-mini"),
        secret_ciphertext=b"\x01\x00\xffciphertext\x00",
        fingerprint="sha256:abcd",
        last4="wxyz",
        created_at=ts(n),
        updated_at=ts(n),
    )


def route(route_id: str = "rt_1", *, tenant: str = "acme", public_model: str = "chat", n: int = 0) -> Route:
    return Route(
        id=route_id,
        tenant=tenant,
        public_model=public_model,
        targets=(
            RouteTarget(Provider.OPENAI, "gpt-4o", priority=0, weight=2),
            RouteTarget(
                Provider.VLLM,
                "llama-3-70b",
                priority=1,
                weight=1,
                node_urls=("http://10.0.0.1:8000", "http://10.0.0.2:8000"),
            ),
            RouteTarget(Provider.AZURE_OPENAI, "gpt-4o", priority=2, api_version="2024-10-21", deployment="gpt4o-prod"),
        ),
        created_at=ts(n),
        updated_at=ts(n),
    )


def client_key(ck_id: str = "ck_1", *, tenant: str = "acme", label: str = "web", n: int = 0) -> ClientKey:
    return ClientKey(
        id=ck_id,
        tenant=tenant,
        label=label,
        prefix="kp_live_ab",
        token_sha256=bytes(range(32)),
        created_at=ts(n),
    )


def key_health(
    key_id: str = "pk_1",
    model: str = "",
    *,
    tenant: str = "acme",
    state: HealthState = HealthState.UNHEALTHY,
    until: datetime | None = None,
    reason: str = "401 invalid_api_key",
    n: int = 0,
) -> KeyHealth:
    return KeyHealth(
        tenant=tenant,
        key_id=key_id,
        model=model,
        state=state,
        until=until,
        reason=reason,
        updated_at=ts(n),
    )


def provider_health(
    provider: Provider = Provider.OPENAI,
    model: str = "gpt-4o",
    *,
    tenant: str = "acme",
    state: HealthState = HealthState.DEGRADED,
    until: datetime | None = ts(30),
    reason: str = "3 failures in 60s",
    n: int = 0,
) -> ProviderHealth:
    return ProviderHealth(
        tenant=tenant,
        provider=provider,
        model=model,
        state=state,
        until=until,
        reason=reason,
        updated_at=ts(n),
    )
