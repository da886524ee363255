"""The sidecar's in-memory, versioned copy of what the control plane streams.

Writes (``apply``) are rare and rebuild small immutable per-tenant views;
reads on the request path (``authenticate``, ``route``, ``keys``) are dict
hits. Everything runs on one event loop, so no locks are needed: a request
holding a view keeps a consistent picture even if a delta lands meanwhile.

Health is kept beside the views, per tenant (``sidecar.health.TenantHealth``):
the control plane's pushed verdicts (snapshot ``key_health`` /
``provider_health`` and ``Change.key_health`` / ``provider_health``) and this
sidecar's own findings. A key that becomes ACTIVE again (re-enabled, or its
secret rotated) starts afresh in the local book.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from keyplane.domain import Provider
from keyplane.health.machine import HealthChange, HealthPolicy
from keyplane.v1 import sidecar_service_pb2

from .bindings import Binding, BindingCache
from .health import TenantHealth
from .model import Key, Route, key_from_proto, key_health_change, provider_health_change, route_from_proto
from .nodes import TenantNodes

__all__ = ["SidecarState", "TenantView"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _TenantData:
    """The mutable source of truth for one tenant, keyed as the stream keys it."""

    keys: dict[str, Key] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)  # by route id
    client_keys: dict[str, bytes] = field(default_factory=dict)  # id -> token SHA-256


@dataclass(frozen=True, slots=True)
class TenantView:
    """What requests read for one tenant; replaced, never mutated, on change."""

    routes: dict[str, Route]  # by public model
    active_keys: dict[Provider, tuple[Key, ...]]
    models: tuple[str, ...]
    # (provider, upstream model) -> usable keys; filled lazily, dies with the view.
    _usable: dict[tuple[Provider, str], tuple[Key, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, data: _TenantData) -> TenantView:
        routes = {r.public_model: r for r in data.routes.values()}
        by_provider: dict[Provider, list[Key]] = {}
        for key in sorted(data.keys.values(), key=lambda k: k.id):
            if key.active:
                by_provider.setdefault(key.provider, []).append(key)
        return cls(
            routes=routes,
            active_keys={p: tuple(ks) for p, ks in by_provider.items()},
            models=tuple(sorted(routes)),
        )

    def usable_keys(self, provider: Provider, upstream_model: str) -> tuple[Key, ...]:
        cache_key = (provider, upstream_model)
        found = self._usable.get(cache_key)
        if found is None:
            found = tuple(k for k in self.active_keys.get(provider, ()) if k.allows(upstream_model))
            self._usable[cache_key] = found
        return found


_EMPTY_VIEW = TenantView(routes={}, active_keys={}, models=())

# Client tokens recently authenticated, so that the same token is not hashed on
# every request. Bounded; emptied whenever the client keys change.
_AUTH_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class _ClientEntry:
    tenant: str
    digest: bytes
    # The client key's id (what usage is reported under; never the token).
    id: str = ""


class SidecarState:
    """Versioned snapshot of the watched tenants, fed by ``apply``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        health_policy: HealthPolicy | None = None,
    ) -> None:
        self._clock = clock
        # Health verdicts carry epoch times (they cross machines).
        self.wall_clock = wall_clock
        self._health_policy = health_policy if health_policy is not None else HealthPolicy()
        self._health: dict[str, TenantHealth] = {}
        self._data: dict[str, _TenantData] = {}
        self._views: dict[str, TenantView] = {}
        self._clients: dict[bytes, _ClientEntry] = {}
        # token -> its client key, for tokens that authenticated (never for rejected ones).
        self._recent_tokens: dict[str, _ClientEntry] = {}
        # Self-hosted nodes per tenant (``sidecar.nodes``) and the affinity bindings this
        # sidecar used (``sidecar.bindings``), kept current by the watch stream.
        self._nodes: dict[str, TenantNodes] = {}
        self.bindings = BindingCache()
        self._version = 0
        self._ready = False
        self._connected = False
        self._last_update: float | None = None

    # --- what the watch stream drives -------------------------------------------------

    def apply(self, resp: sidecar_service_pb2.WatchResponse) -> None:
        """Apply one watch message: a snapshot replaces everything, a delta patches."""
        kind = resp.WhichOneof("payload")
        if kind == "snapshot":
            self._apply_snapshot(resp.snapshot)
            self._version = resp.version
            self._ready = True
        elif kind == "delta":
            self._apply_delta(resp.delta)
            self._version = max(self._version, resp.version)
        else:
            _log.warning("ignoring watch message without payload (version %d)", resp.version)
            return
        self._last_update = self._clock()

    def set_connected(self, connected: bool) -> None:
        """The watch client says whether a live stream currently feeds this state."""
        if self._connected and not connected:
            # The last moment we knew we were in sync.
            self._last_update = self._clock()
        self._connected = connected

    def _apply_snapshot(self, snapshot: sidecar_service_pb2.Snapshot) -> None:
        data: dict[str, _TenantData] = {}
        pushed: dict[str, list[HealthChange]] = {}
        for ts in snapshot.tenants:
            td = data.setdefault(ts.tenant, _TenantData())
            for k in ts.keys:
                key = key_from_proto(k)
                if key is not None:
                    td.keys[key.id] = key
            for r in ts.routes:
                td.routes[r.id] = route_from_proto(r)
            for ck in ts.client_keys:
                td.client_keys[ck.id] = bytes(ck.token_sha256)
            changes = pushed.setdefault(ts.tenant, [])
            for kh in ts.key_health:
                change = key_health_change(kh)
                if change is not None:
                    changes.append(change)
            for ph in ts.provider_health:
                change = provider_health_change(ph)
                if change is not None:
                    changes.append(change)
        now = self.wall_clock()
        health: dict[str, TenantHealth] = {}
        for tenant, td in data.items():
            th = self._health.get(tenant) or TenantHealth(tenant, self._health_policy)
            old = self._data.get(tenant)
            for key in td.keys.values():
                if old is not None and _revived(old.keys.get(key.id), key):
                    th.reset_key(key.id)
            if old is not None:
                for key_id in old.keys.keys() - td.keys.keys():
                    th.forget_key(key_id)
            th.replace_pushed(pushed.get(tenant, ()), now)
            health[tenant] = th
        self._health = health
        self._data = data
        self._views = {name: TenantView.build(td) for name, td in data.items()}
        self._rebuild_clients()
        nodes: dict[str, TenantNodes] = {}
        for ts in snapshot.tenants:
            tn = nodes[ts.tenant] = TenantNodes()
            tn.replace(ts.nodes, ts.node_health)
        self._nodes = nodes
        # Moves may have been missed: every binding is asked for again (one RPC each).
        self.bindings = BindingCache(self.bindings.max_entries)

    def _apply_delta(self, delta: sidecar_service_pb2.Delta) -> None:
        touched: set[str] = set()
        clients_changed = False
        for change in delta.changes:
            if change.version and change.version <= self._version:
                continue  # already held (resume overlap)
            tenant = change.tenant
            which = change.WhichOneof("change")
            if which == "tenant_deleted":
                self._data.pop(tenant, None)
                self._views.pop(tenant, None)
                self._health.pop(tenant, None)
                self._nodes.pop(tenant, None)
                self.bindings.drop_tenant(tenant)
                touched.discard(tenant)
                clients_changed = True
                continue
            if which in ("key_health", "provider_health"):
                # Health alone never changes what the views hold.
                pushed = (
                    key_health_change(change.key_health)
                    if which == "key_health"
                    else provider_health_change(change.provider_health)
                )
                if pushed is not None:
                    self.health(tenant).apply_pushed(pushed)
                continue
            if which in ("node_put", "node_health", "binding_put", "binding_deleted"):
                self._apply_affinity_change(change, which)
                continue
            td = self._data.setdefault(tenant, _TenantData())
            touched.add(tenant)
            if which == "key_put":
                key = key_from_proto(change.key_put)
                if key is None:
                    td.keys.pop(change.key_put.id, None)
                else:
                    if _revived(td.keys.get(key.id), key):
                        self.health(tenant).reset_key(key.id)
                    td.keys[key.id] = key
            elif which == "key_deleted":
                td.keys.pop(change.key_deleted, None)
                health = self._health.get(tenant)
                if health is not None:
                    health.forget_key(change.key_deleted)
            elif which == "route_put":
                route = route_from_proto(change.route_put)
                td.routes[route.id] = route
            elif which == "route_deleted":
                td.routes.pop(change.route_deleted, None)
            elif which == "client_key_put":
                td.client_keys[change.client_key_put.id] = bytes(change.client_key_put.token_sha256)
                clients_changed = True
            elif which == "client_key_deleted":
                td.client_keys.pop(change.client_key_deleted, None)
                self.bindings.drop_client(tenant, change.client_key_deleted)
                clients_changed = True
            else:
                _log.warning("ignoring unknown change kind at version %d", change.version)
        for tenant in touched:
            self._views[tenant] = TenantView.build(self._data[tenant])
        if clients_changed:
            self._rebuild_clients()

    def _apply_affinity_change(self, change: sidecar_service_pb2.Change, which: str) -> None:
        tenant = change.tenant
        if which == "node_put":
            self.nodes(tenant).put(change.node_put)
        elif which == "node_health":
            self.nodes(tenant).apply_health(change.node_health)
        elif which == "binding_put":
            b = change.binding_put
            key = (tenant, b.client_key_id, b.public_model)
            self.bindings.update(key, Binding(b.node_id, b.expire_time.ToNanoseconds() / 1e9))
        else:
            ref = change.binding_deleted
            self.bindings.drop((tenant, ref.client_key_id, ref.public_model))

    def _rebuild_clients(self) -> None:
        clients: dict[bytes, _ClientEntry] = {}
        for tenant, td in self._data.items():
            for key_id, digest in td.client_keys.items():
                clients[digest] = _ClientEntry(tenant=tenant, digest=digest, id=key_id)
        self._clients = clients
        self._recent_tokens = {}

    # --- what requests read ----------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def is_ready(self) -> bool:
        """True once a full snapshot has been applied."""
        return self._ready

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_update(self) -> float | None:
        """Monotonic time of the last applied message or of the last disconnect."""
        return self._last_update

    def age(self) -> float | None:
        """Seconds since the state was last known to be in sync; 0 while a stream is live."""
        if self._last_update is None:
            return None
        if self._connected:
            return 0.0
        return max(0.0, self._clock() - self._last_update)

    def authenticate(self, token: str) -> str | None:
        """The tenant owning this client token, or None.

        A token that authenticated is remembered (at most ``_AUTH_CACHE_SIZE``,
        forgotten when client keys change) so that it is not hashed again. The
        memo only ever holds valid tokens, so a miss means "hash and compare in
        constant time" exactly as before, and a lookup can only find a token
        equal to the one given: dict lookups compare strings only on a full
        match of their (per-process randomised) hash, which leaks nothing about
        how close a guess is.
        """
        entry = self._client(token)
        return None if entry is None else entry.tenant

    def identify(self, token: str) -> tuple[str, str] | None:
        """(tenant, client key id) of this client token, or None (as ``authenticate``)."""
        entry = self._client(token)
        return None if entry is None else (entry.tenant, entry.id)

    def client_key_id(self, token: str | None) -> str:
        """The id of the client key ``token`` is ("" if none): after ``authenticate``, a dict lookup."""
        entry = self._client(token) if token else None
        return "" if entry is None else entry.id

    def _client(self, token: str) -> _ClientEntry | None:
        if not token:
            return None
        recent = self._recent_tokens
        found = recent.get(token)
        if found is not None:
            return found
        digest = hashlib.sha256(token.encode()).digest()
        entry = self._clients.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        if len(recent) >= _AUTH_CACHE_SIZE:
            recent.clear()
        recent[token] = entry
        return entry

    def nodes_of(self, tenant: str) -> TenantNodes | None:
        """The tenant's nodes when it has any (the request path's test: one dict get)."""
        found = self._nodes.get(tenant)
        return found if found else None

    def nodes(self, tenant: str) -> TenantNodes:
        """The tenant's self-hosted nodes (created empty on first use)."""
        found = self._nodes.get(tenant)
        if found is None:
            found = self._nodes[tenant] = TenantNodes()
        return found

    def tenant(self, tenant: str) -> TenantView:
        return self._views.get(tenant, _EMPTY_VIEW)

    def tenants(self) -> tuple[str, ...]:
        return tuple(sorted(self._views))

    def route(self, tenant: str, public_model: str) -> Route | None:
        return self.tenant(tenant).routes.get(public_model)

    def keys(self, tenant: str, provider: Provider, upstream_model: str | None = None) -> tuple[Key, ...]:
        """Active keys of ``provider``; with ``upstream_model``, only those allowed to serve it."""
        view = self.tenant(tenant)
        if upstream_model is None:
            return view.active_keys.get(provider, ())
        return view.usable_keys(provider, upstream_model)

    def models(self, tenant: str) -> tuple[str, ...]:
        return self.tenant(tenant).models

    def has_inactive_key(self, tenant: str, provider: Provider, upstream_model: str) -> bool:
        """Whether the tenant holds a disabled or revoked key of ``provider`` for the model
        (scans the tenant's keys: for the answer when nothing can serve, not the hot path)."""
        data = self._data.get(tenant)
        if data is None:
            return False
        return any(k.provider is provider and not k.active and k.allows(upstream_model) for k in data.keys.values())

    def health(self, tenant: str) -> TenantHealth:
        """The tenant's pushed and local health (created empty on first use)."""
        found = self._health.get(tenant)
        if found is None:
            found = self._health[tenant] = TenantHealth(tenant, self._health_policy)
        return found


def _revived(old: Key | None, new: Key) -> bool:
    """Whether ``new`` makes a known key usable afresh: re-enabled, or its secret rotated."""
    if old is None or not new.active:
        return False
    return not old.active or old.secret != new.secret
