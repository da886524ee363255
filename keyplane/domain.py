"""Domain types shared by the control plane, the store and the sidecar.

Plain frozen dataclasses with no I/O. The store persists them, the control
plane converts them to and from protobuf messages (``keyplane.convert``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "ChangeOp",
    "ChangeRecord",
    "ClientKey",
    "EntityKind",
    "KeyStatus",
    "Provider",
    "ProviderKey",
    "Route",
    "RouteTarget",
    "Tenant",
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


@dataclass(frozen=True, slots=True)
class RouteTarget:
    provider: Provider
    upstream_model: str
    priority: int = 0
    weight: int = 1
    node_urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    tenant: str
    public_model: str
    targets: tuple[RouteTarget, ...]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ClientKey:
    """An app's bearer token at the sidecar, stored only as its SHA-256."""

    id: str
    tenant: str
    label: str
    prefix: str
    token_sha256: bytes
    created_at: datetime


class EntityKind(enum.StrEnum):
    TENANT = "tenant"
    PROVIDER_KEY = "provider_key"
    ROUTE = "route"
    CLIENT_KEY = "client_key"


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
