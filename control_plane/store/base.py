"""The store contract. Implementations: ``sqlite.SqliteStore`` (embedded
default) and ``postgres.PostgresStore`` (production, several replicas).

Only the control plane talks to a store, never the request path. Every write
runs in one transaction together with one appended change-log row, so each
write gets a new, strictly larger version; the control plane reads the log
(``changes_since``) to keep its in-memory snapshot current.

Errors: ``keyplane.errors.NotFound`` for a missing tenant or object (including
a write naming an unknown tenant), ``AlreadyExists`` for a taken unique name
(tenant name; provider key label, route public_model and client key label,
each unique per tenant), ``Aborted`` when an update's ``expected_revision``
is not the object's revision any more, ``Unavailable`` when the database
cannot be reached. A failed write leaves nothing behind (no row, no
change-log entry).

Callers assign ids and timestamps; the store persists what it is given,
except ``revision``: the store sets it to 1 on create and adds 1 on every
update, in the same statement that writes the row. Updates write only the
columns they name (``ProviderKeyUpdate``, ``RouteUpdate``), so two
concurrent updates of different fields never undo each other; in
particular a secret rotation is never reverted by a field update, which
never writes the secret columns. With ``expected_revision`` an update is a
compare-and-set: ``UPDATE ... WHERE id = ? AND revision = ?``, one atomic
statement, never a read-then-check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from control_plane.store.fleet_records import (
    BindingFilter,
    FleetRecordsStore,
    SidecarAck,
    SidecarRecord,
    SidecarStream,
)
from control_plane.store.quota_records import QuotaClaim, QuotaClaimResult
from keyplane.affinity import (
    Binding,
    BindingKey,
    BindingResult,
    BindingView,
    NodeHealth,
    NodeState,
    SelfHostedNode,
)
from keyplane.domain import (
    AccessToken,
    ChangeRecord,
    ClientKey,
    KeyHealth,
    KeyStatus,
    Provider,
    ProviderHealth,
    ProviderKey,
    Route,
    RouteTarget,
    Tenant,
    TokenKind,
)
from keyplane.limit_set import LimitSet

if TYPE_CHECKING:
    from control_plane.usage_records import Price, UsageQuery, UsageRow, UsageTotals

__all__ = [
    "AuditEntry",
    "AuditEvent",
    "AuditQuery",
    "BindingFilter",
    "ChangeListener",
    "ProviderKeyUpdate",
    "QuotaClaim",
    "QuotaClaimResult",
    "RouteUpdate",
    "SealedSecret",
    "SecretRewrap",
    "SidecarAck",
    "SidecarRecord",
    "SidecarStream",
    "Store",
    "StoredSecret",
]


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """A provider secret as stored: AES-GCM ciphertext, fingerprint, last 4."""

    ciphertext: bytes
    fingerprint: str
    last4: str

    def __repr__(self) -> str:
        return f"SealedSecret(fingerprint={self.fingerprint!r})"


@dataclass(frozen=True, slots=True)
class ProviderKeyUpdate:
    """The columns one provider-key update writes (AIP-134 field mask): a
    field left None is not written. ``secret`` set is a rotation: only then
    are the secret columns (ciphertext, fingerprint, last4) written."""

    updated_at: datetime
    label: str | None = None
    status: KeyStatus | None = None
    weight: int | None = None
    allowed_models: tuple[str, ...] | None = None
    base_url: str | None = None
    secret: SealedSecret | None = None

    def columns(self) -> dict[str, Any]:
        """Column name -> domain value of everything this update writes
        (``revision`` aside, which the store bumps itself)."""
        columns: dict[str, Any] = {
            name: value
            for name, value in (
                ("label", self.label),
                ("status", self.status),
                ("weight", self.weight),
                ("allowed_models", self.allowed_models),
                ("base_url", self.base_url),
            )
            if value is not None
        }
        if self.secret is not None:
            columns["secret_ciphertext"] = self.secret.ciphertext
            columns["fingerprint"] = self.secret.fingerprint
            columns["last4"] = self.secret.last4
        columns["updated_at"] = self.updated_at
        return columns


@dataclass(frozen=True, slots=True)
class RouteUpdate:
    """The columns one route update writes; a field left None is not written."""

    updated_at: datetime
    public_model: str | None = None
    targets: tuple[RouteTarget, ...] | None = None

    def columns(self) -> dict[str, Any]:
        columns: dict[str, Any] = {
            name: value
            for name, value in (("public_model", self.public_model), ("targets", self.targets))
            if value is not None
        }
        columns["updated_at"] = self.updated_at
        return columns


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin write as the audit log records it: who (``caller``, an
    identity such as ``admin-token:bootstrap``, never a token), what (RPC
    ``method``, the resource, the names of the changed ``fields``, the new
    secret's ``fingerprint`` for a key creation or rotation; never a value
    or a secret), when, and the ``result`` ("ok" or a gRPC status name).

    The store writes it in the same transaction as the change it describes
    (a write method's ``audit=`` argument), so a change without its audit
    row cannot commit; ``append_audit`` writes one on its own (a failed
    attempt, which has no transaction to join)."""

    time: datetime
    caller: str
    method: str
    tenant: str
    resource_kind: str
    resource_id: str
    fields: tuple[str, ...] = ()
    fingerprint: str = ""
    result: str = "ok"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A stored ``AuditEntry`` with its id (larger ids were written later)."""

    id: int
    entry: AuditEntry


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A page of the audit log, newest first: events with id < ``before_id``
    (None: from the newest), matching every filter given, at most ``limit``.
    ``start`` is inclusive, ``end`` exclusive."""

    limit: int
    before_id: int | None = None
    tenant: str | None = None
    resource_kind: str | None = None
    resource_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """One provider key's sealed secret, as master-key rewrapping reads it."""

    tenant: str
    key_id: str
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"StoredSecret(tenant={self.tenant!r}, key_id={self.key_id!r})"


@dataclass(frozen=True, slots=True)
class SecretRewrap:
    """Replace one key's ciphertext by another sealing of the same secret,
    only if it is still ``old_ciphertext`` (compare-and-set)."""

    tenant: str
    key_id: str
    old_ciphertext: bytes
    new_ciphertext: bytes

    def __repr__(self) -> str:
        return f"SecretRewrap(tenant={self.tenant!r}, key_id={self.key_id!r})"


# Called with the newest version after another process wrote a change.
ChangeListener = Callable[[int], Awaitable[None]]


class Store(FleetRecordsStore, Protocol):
    async def migrate(self) -> None:
        """Create or upgrade the schema (versioned migrations; idempotent)."""

    async def close(self) -> None: ...

    # tenants ---------------------------------------------------------------
    async def create_tenant(self, tenant: Tenant, *, audit: AuditEntry | None = None) -> Tenant: ...

    async def get_tenant(self, name: str) -> Tenant: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def delete_tenant(self, name: str, *, audit: AuditEntry | None = None) -> None:
        """Delete the tenant and everything it owns; logs one TENANT/DELETE change."""

    # provider keys ---------------------------------------------------------
    async def create_provider_key(self, key: ProviderKey, *, audit: AuditEntry | None = None) -> ProviderKey: ...

    async def get_provider_key(self, tenant: str, key_id: str) -> ProviderKey: ...

    async def list_provider_keys(self, tenant: str) -> list[ProviderKey]:
        """Keys of one tenant ordered by creation; NotFound if no such tenant."""

    async def update_provider_key(
        self,
        tenant: str,
        key_id: str,
        update: ProviderKeyUpdate,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> ProviderKey:
        """Write the columns ``update`` names, ``revision + 1``, and nothing
        else; returns the key as stored. With ``expected_revision``: Aborted
        unless the key's revision is still that (compare-and-set)."""

    async def delete_provider_key(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> None: ...

    # routes ----------------------------------------------------------------
    async def create_route(self, route: Route, *, audit: AuditEntry | None = None) -> Route: ...

    async def get_route(self, tenant: str, route_id: str) -> Route: ...

    async def list_routes(self, tenant: str) -> list[Route]: ...

    async def update_route(
        self,
        tenant: str,
        route_id: str,
        update: RouteUpdate,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> Route:
        """Like ``update_provider_key``: only the named columns, revision + 1."""

    async def delete_route(self, tenant: str, route_id: str, *, audit: AuditEntry | None = None) -> None: ...

    # client keys -----------------------------------------------------------
    async def create_client_key(self, client_key: ClientKey, *, audit: AuditEntry | None = None) -> ClientKey: ...

    async def get_client_key(self, tenant: str, client_key_id: str) -> ClientKey: ...

    async def list_client_keys(self, tenant: str) -> list[ClientKey]: ...

    async def delete_client_key(self, tenant: str, client_key_id: str, *, audit: AuditEntry | None = None) -> None: ...

    # learnt health ---------------------------------------------------------
    # Written by the control plane when health *changes* (never per request).
    # Only non-healthy entries are kept: putting a HEALTHY entry deletes the
    # row. Each call that changes something appends one change row with kind
    # KEY_HEALTH / PROVIDER_HEALTH and entity id ``KeyHealth.entity_id`` /
    # ``ProviderHealth.entity_id``; a call that changes nothing (HEALTHY for an
    # absent row, or the same state, until and reason as the stored row, whose
    # updated_at is then kept) appends nothing and returns None. Returns the
    # new version. Key health rows go when their key or tenant goes (no change
    # row then: the key's own DELETE change implies it). The getters return
    # None for an absent entry, also of an unknown key or tenant.
    async def put_key_health(self, health: KeyHealth) -> int | None:
        """NotFound if the key does not exist in the tenant."""

    async def get_key_health(self, tenant: str, key_id: str, model: str) -> KeyHealth | None: ...

    async def list_key_health(self, tenant: str) -> list[KeyHealth]:
        """Non-healthy entries of a tenant ordered by key id then model; NotFound if no such tenant."""

    async def clear_key_health(self, tenant: str, key_id: str, *, audit: AuditEntry | None = None) -> list[int]:
        """Delete every entry of one key (key-wide and per model) and log the
        reset: one change row (op DELETE) for the key-wide entry whether or
        not it existed, then one per deleted per-model entry, in model order;
        returns their versions (never empty). The key-wide row is what makes
        the reset reach the sidecars, which read a key-wide HEALTHY as "forget
        everything learnt about this key", including findings that never
        reached the store. NotFound if the key does not exist in the tenant."""

    async def put_provider_health(self, health: ProviderHealth) -> int | None:
        """NotFound if the tenant does not exist."""

    async def get_provider_health(self, tenant: str, provider: Provider, model: str) -> ProviderHealth | None: ...

    async def list_provider_health(self, tenant: str) -> list[ProviderHealth]:
        """Non-healthy entries of a tenant ordered by provider then model; NotFound if no such tenant."""

    # affinity: nodes, node health, bindings (control_plane/store/_nodes.py,
    # _bindings.py, which document each method). Never log a client key id
    # together with a public model above debug level.
    async def sync_route_nodes(
        self, tenant: str, route_id: str, pool: Sequence[tuple[str, str]], now: datetime
    ) -> list[int]: ...

    async def add_node(
        self, node: SelfHostedNode, *, audit: AuditEntry | None = None
    ) -> tuple[SelfHostedNode, int | None]: ...

    async def set_node_state(
        self,
        tenant: str,
        node_id: str,
        state: NodeState,
        now: datetime,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> tuple[SelfHostedNode, int, int | None]: ...

    async def get_node(self, tenant: str, node_id: str) -> SelfHostedNode: ...

    async def list_nodes(
        self, tenant: str, route_id: str = "", *, include_removed: bool = False
    ) -> list[SelfHostedNode]: ...

    async def put_node_health(self, health: NodeHealth) -> int | None: ...

    async def get_node_health(self, tenant: str, node_id: str) -> NodeHealth | None: ...

    async def list_node_health(self, tenant: str) -> list[NodeHealth]: ...

    async def find_binding(self, key: BindingKey) -> BindingView | None: ...

    async def claim_binding(
        self, key: BindingKey, keep: frozenset[str], candidate: str, now: datetime, expires_at: datetime
    ) -> tuple[Binding, BindingResult]: ...

    async def refresh_bindings(
        self, refs: Sequence[tuple[BindingKey, str]], now: datetime, expires_at: datetime
    ) -> tuple[int, list[Binding], list[tuple[BindingKey, str]]]: ...

    async def list_bindings(
        self, where: BindingFilter, *, after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[Binding]: ...

    async def delete_bindings(
        self, where: BindingFilter, *, audit: AuditEntry | None = None
    ) -> tuple[int, int | None]: ...

    async def count_bindings(self, tenant: str, now: datetime) -> dict[str, int]: ...

    async def sweep_bindings(self, now: datetime, limit: int = 1000) -> int: ...

    # API tokens (admin and sidecar) ------------------------------------------
    # Global, not per tenant: each write appends one change row with kind
    # ADMIN_TOKEN / SIDECAR_TOKEN, op PUT, the token id, and tenant "". Only
    # the SHA-256 of a token is stored. Tokens are never deleted: a revoked
    # one stays listed with its ``revoked_at``.
    async def create_token(self, token: AccessToken, *, audit: AuditEntry | None = None) -> AccessToken:
        """AlreadyExists for a taken id (or, never in practice, token hash)."""

    async def get_token(self, kind: TokenKind, token_id: str) -> AccessToken:
        """NotFound unless a token of this kind has this id."""

    async def list_tokens(self, kind: TokenKind) -> list[AccessToken]:
        """Every token of one kind, revoked ones included, ordered by creation."""

    async def revoke_token(
        self,
        kind: TokenKind,
        token_id: str,
        revoked_at: datetime,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> AccessToken:
        """Set ``revoked_at`` and ``revision + 1`` and log the change; returns
        the token as stored. Revoking a revoked token changes and logs nothing
        (its audit event is still written) and returns it as it is. With ``expected_revision``: Aborted unless
        the token's revision is still that."""

    # change log ------------------------------------------------------------
    async def latest_version(self) -> int:
        """The version of the newest change (0 when the log is empty)."""

    async def changes_since(self, version: int, limit: int = 1000) -> list[ChangeRecord]:
        """Changes with version > ``version``, oldest first, at most ``limit``."""

    # leases ----------------------------------------------------------------
    def try_lease(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Hold the exclusive lease ``name`` for the block, across every
        control-plane replica on this store: yields True when it is held,
        False at once (no waiting) when another holder has it. For background
        work that one replica should do at a time (a key's recovery probe).
        Postgres: a session advisory lock on a pooled connection, released on
        exit (or by Postgres when the connection dies). SQLite has one writer
        process: the lease lives in its memory."""
        ...

    async def listen_changes(self, listener: ChangeListener) -> None:
        """Call ``listener`` whenever another process writes (Postgres
        LISTEN/NOTIFY). The SQLite store has one writer and may do nothing."""

    # audit log -------------------------------------------------------------
    # Every write method above except the learnt-health ones the aggregator
    # calls takes ``audit``: written in the write's own transaction, before
    # its change-log row; if it cannot be written the write fails and leaves
    # nothing behind.
    async def append_audit(self, entry: AuditEntry) -> int:
        """Write one audit event in its own transaction (a failed attempt);
        returns its id."""

    async def list_audit_events(self, query: AuditQuery) -> list[AuditEvent]:
        """Events matching ``query``, newest (largest id) first."""

    # limits: not in the change log (sidecars learn them through their leases)
    async def put_limits(self, limits: LimitSet, *, audit: AuditEntry | None = None) -> LimitSet:
        """Create or replace the limits of (tenant, client key; '' for the
        tenant); NotFound for an unknown tenant or client key."""

    async def get_limits(self, tenant: str, client_key_id: str) -> LimitSet | None: ...

    async def list_limits(self, tenant: str | None = None) -> list[LimitSet]:
        """Of one tenant, or of every tenant when None; only of client keys that exist."""

    async def delete_limits(self, tenant: str, client_key_id: str, *, audit: AuditEntry | None = None) -> bool:
        """False when none were set."""

    # master-key rewrapping -------------------------------------------------
    async def list_sealed_secrets(self, after: str = "", limit: int = 100) -> list[StoredSecret]:
        """The sealed secrets of every tenant's provider keys with an id
        greater than ``after``, ordered by key id, at most ``limit``."""

    async def rewrap_secrets(self, rewraps: Sequence[SecretRewrap], audit: AuditEntry | None = None) -> list[str]:
        """Re-encrypt in one transaction: each key's ``secret_ciphertext``
        becomes ``new_ciphertext`` where it still is ``old_ciphertext``
        (``UPDATE ... WHERE tenant = ? AND id = ? AND secret_ciphertext = ?``);
        a key rotated or deleted meanwhile is left alone. Writes nothing
        else: not the revision, not updated_at, no change-log row (the
        plaintext is the same, so sidecars must not see a change) but the
        ``audit`` row, when the batch rewrote anything. Returns the ids of
        the keys rewritten."""

    # usage and prices (``control_plane.usage``) -------------------------------
    async def put_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add each row's counters to its stored rollup row, in one transaction."""

    async def query_usage(self, query: UsageQuery) -> list[tuple[dict[str, str], int | None, UsageTotals]]:
        """Summed rollups: (values of the grouped dimensions, bucket start or None, totals)."""

    async def sweep_usage(self, before_minute: int) -> int:
        """Delete rollups of minutes before ``before_minute``; returns how many."""

    async def put_price(self, price: Price, *, audit: AuditEntry | None = None) -> Price:
        """Create or replace a price (NotFound for an unknown tenant)."""

    async def list_prices(self, tenant: str | None) -> list[Price]:
        """A tenant's prices (every tenant's for None)."""

    async def delete_price(
        self, tenant: str, provider: Provider, model: str, *, audit: AuditEntry | None = None
    ) -> None:
        """NotFound when there is no such price."""
