"""Domain types shared by the control plane, the store and the sidecar.

Plain frozen dataclasses with no I/O. The store persists them, the control
plane converts them to and from protobuf messages (``keyplane.convert``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "AccessToken",
    "ChangeOp",
    "ChangeRecord",
    "ClientKey",
    "EntityKind",
    "HealthState",
    "KeyHealth",
    "KeyStatus",
    "Provider",
    "ProviderHealth",
    "ProviderKey",
    "Route",
    "RouteTarget",
    "Tenant",
    "TokenKind",
    "key_health_entity_id",
    "provider_health_entity_id",
    "split_health_entity_id",
]


class Provider(enum.StrEnum):
    """Upstream API family. The value is the name users type."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    AZURE_OPENAI = "azure_openai"
    GEMINI = "gemini"
    OPENROUTER = "openrouter"
    OPENAI_COMPATIBLE = "openai_compatible"
    VLLM = "vllm"


class KeyStatus(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    created_at: datetime
    # Every mutable object carries a revision: 1 when created, +1 on every
    # update; the admin API shows it as an opaque etag. The store assigns it.
    revision: int = 1


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """A provider key as stored: the secret only as AES-GCM ciphertext."""

    id: str
    tenant: str
    provider: Provider
    label: str
    base_url: str
    status: KeyStatus
    weight: int
    allowed_models: tuple[str, ...]
    secret_ciphertext: bytes
    fingerprint: str
    last4: str
    created_at: datetime
    updated_at: datetime
    revision: int = 1


@dataclass(frozen=True, slots=True)
class RouteTarget:
    provider: Provider
    upstream_model: str
    priority: int = 0
    weight: int = 1
    node_urls: tuple[str, ...] = ()
    # Azure OpenAI classic deployments: the api-version (empty: the v1 API) and
    # the deployment name in the URL (empty: upstream_model).
    api_version: str = ""
    deployment: str = ""
    # The endpoints it serves, by name ("chat_completions", "embeddings"...: the proto
    # enum's names without ENDPOINT_, lower case); empty means its provider's default.
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    tenant: str
    public_model: str
    targets: tuple[RouteTarget, ...]
    created_at: datetime
    updated_at: datetime
    revision: int = 1


@dataclass(frozen=True, slots=True)
class ClientKey:
    """An app's bearer token at the sidecar, stored only as its SHA-256."""

    id: str
    tenant: str
    label: str
    prefix: str
    token_sha256: bytes
    created_at: datetime
    revision: int = 1


class HealthState(enum.StrEnum):
    """Learnt from upstream outcomes; separate from the admin-set KeyStatus."""

    HEALTHY = "healthy"
    # Skipped until ``until``, then one probe is let through (half-open).
    COOLDOWN = "cooldown"
    # Credential failure: skipped for every model until an admin resets it.
    UNHEALTHY = "unhealthy"
    # Provider only: failing end to end; its targets are tried last.
    DEGRADED = "degraded"
    # Key-wide only: out of credits or quota; skipped for every model until
    # ``until``, then probed by the control plane (success restores it).
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class KeyHealth:
    """Learnt health of a key: key-wide when ``model`` is empty, else per model.
    Only non-healthy entries are stored; absence means healthy."""

    tenant: str
    key_id: str
    model: str
    state: HealthState
    until: datetime | None
    reason: str
    updated_at: datetime

    @property
    def entity_id(self) -> str:
        return key_health_entity_id(self.key_id, self.model)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """End-to-end health of a provider for one model within a tenant."""

    tenant: str
    provider: Provider
    model: str
    state: HealthState
    until: datetime | None
    reason: str
    updated_at: datetime

    @property
    def entity_id(self) -> str:
        return provider_health_entity_id(self.provider, self.model)


def key_health_entity_id(key_id: str, model: str) -> str:
    """Change-log entity id of a key health entry: ``<key id>/<model>``."""
    return f"{key_id}/{model}"


def provider_health_entity_id(provider: Provider, model: str) -> str:
    """Change-log entity id of a provider health entry: ``<provider>/<model>``."""
    return f"{provider.value}/{model}"


def split_health_entity_id(entity_id: str) -> tuple[str, str]:
    """Inverse of the two functions above: (key id or provider, model)."""
    head, _, model = entity_id.partition("/")
    return head, model


class EntityKind(enum.StrEnum):
    TENANT = "tenant"
    PROVIDER_KEY = "provider_key"
    ROUTE = "route"
    CLIENT_KEY = "client_key"
    KEY_HEALTH = "key_health"
    PROVIDER_HEALTH = "provider_health"
    # API tokens are global: their change rows carry tenant "" (no tenant's
    # snapshot changes; the hub feeds them to the token registry).
    ADMIN_TOKEN = "admin_token"
    SIDECAR_TOKEN = "sidecar_token"
    # Affinity (keyplane.affinity): a node, its learnt health, a binding
    # (entity id ``<client key id>/<public model>``, logged only when moved
    # or deleted).
    NODE = "node"
    NODE_HEALTH = "node_health"
    BINDING = "binding"


class ChangeOp(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One row of the change log: every write gets a new, larger version."""

    version: int
    tenant: str
    kind: EntityKind
    entity_id: str
    op: ChangeOp
    created_at: datetime = field(compare=False)


class TokenKind(enum.StrEnum):
    """Who an API token authenticates: an admin or a sidecar."""

    ADMIN = "admin"
    SIDECAR = "sidecar"

    @property
    def entity_kind(self) -> EntityKind:
        return EntityKind.ADMIN_TOKEN if self is TokenKind.ADMIN else EntityKind.SIDECAR_TOKEN


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An admin or sidecar token managed through the admin API, stored only
    as its SHA-256. ``tenants`` is a sidecar token's scope (None: every
    tenant, including future ones); always None for an admin token. A revoked
    token (``revoked_at`` set) authenticates nothing and stays listed."""

    id: str
    kind: TokenKind
    label: str
    prefix: str
    token_sha256: bytes
    tenants: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None = None
    revision: int = 1

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None
