"""Declarative config, planned: the state a file asks for against the state
the control plane has, as a list of actions. Pure: no I/O, no gRPC.

Identities: a tenant by name; a provider key by label; a route by public
model; a client key by label. A provider key's secret is compared by
fingerprint only (the API never returns secrets), so a key is rotated only
when the referenced secret differs from the stored one. Client keys are only
ever created (their tokens cannot be read back) or, when pruning, deleted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from keyplane.crypto import fingerprint
from keyplane_cli.config_limits import LimitsSpec, limits_actions

__all__ = [
    "TENANT_WIDE_NAME",
    "Action",
    "CurrentClientKey",
    "CurrentKey",
    "CurrentRoute",
    "CurrentTenant",
    "KeySpec",
    "LimitsSpec",
    "PlanError",
    "PriceSpec",
    "RouteSpec",
    "TargetSpec",
    "TenantSpec",
    "keyless_targets",
    "plan",
    "target_text",
]

# How a plan names a tenant's own limits (client keys are named by label).
TENANT_WIDE_NAME = "(tenant)"

Op = Literal["create", "update", "delete"]
Kind = Literal["tenant", "provider_key", "route", "client_key", "price", "limits"]


class PlanError(Exception):
    """The file asks for something the API cannot do (e.g. change a key's provider)."""


@dataclass(frozen=True)
class TargetSpec:
    provider: str
    model: str
    priority: int = 0
    weight: int = 1
    node_urls: tuple[str, ...] = ()
    # Endpoint names; empty: the provider's default.
    endpoints: tuple[str, ...] = ()
    # Azure OpenAI classic deployments.
    api_version: str = ""
    deployment: str = ""


def target_text(target: TargetSpec) -> str:
    """``provider:model@priority*weight[+endpoint,...][=node,...][?api-version=V&deployment=D]``,
    the CLI's target syntax."""
    endpoints = ("+" + ",".join(target.endpoints)) if target.endpoints else ""
    nodes = ("=" + ",".join(target.node_urls)) if target.node_urls else ""
    azure = f"?api-version={target.api_version}" if target.api_version else ""
    if target.deployment:
        azure += f"{'&' if azure else '?'}deployment={target.deployment}"
    return f"{target.provider}:{target.model}@{target.priority}*{target.weight}{endpoints}{nodes}{azure}"


@dataclass(frozen=True)
class KeySpec:
    """A provider key as the file asks for it. ``secret`` is the resolved
    value of its reference (None: no secret, vllm only); ``secret_ref``
    (``env:VAR`` / ``file:PATH``) is what plans show instead."""

    provider: str
    label: str
    base_url: str = ""
    weight: int = 1
    allowed_models: tuple[str, ...] = ()
    status: str = "active"
    secret: str | None = field(default=None, repr=False)
    secret_ref: str = ""


@dataclass(frozen=True)
class RouteSpec:
    model: str
    targets: tuple[TargetSpec, ...]


@dataclass(frozen=True)
class PriceSpec:
    """A price in micro-dollars per million tokens (the file says dollars); also what the API has."""

    provider: str
    model: str
    input: int
    cached_input: int
    output: int


@dataclass(frozen=True)
class TenantSpec:
    name: str
    keys: tuple[KeySpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    client_keys: tuple[str, ...] = ()
    prices: tuple[PriceSpec, ...] = ()
    # (client key label, or "" for the tenant as a whole) -> its limits.
    limits: tuple[tuple[str, LimitsSpec], ...] = ()


@dataclass(frozen=True)
class CurrentKey:
    id: str
    etag: str
    provider: str
    label: str
    base_url: str
    weight: int
    allowed_models: tuple[str, ...]
    status: str
    fingerprint: str


@dataclass(frozen=True)
class CurrentRoute:
    id: str
    etag: str
    model: str
    targets: tuple[TargetSpec, ...]


@dataclass(frozen=True)
class CurrentClientKey:
    id: str
    label: str


@dataclass(frozen=True)
class CurrentTenant:
    name: str
    keys: tuple[CurrentKey, ...] = ()
    routes: tuple[CurrentRoute, ...] = ()
    client_keys: tuple[CurrentClientKey, ...] = ()
    prices: tuple[PriceSpec, ...] = ()
    limits: tuple[tuple[str, LimitsSpec], ...] = ()


@dataclass(frozen=True)
class Action:
    """One change. ``changes`` holds (field, from, to) for the plan's
    readers; secrets appear only as their fingerprints."""

    op: Op
    kind: Kind
    tenant: str
    name: str
    id: str = ""
    etag: str = ""
    fields: tuple[str, ...] = ()
    changes: tuple[tuple[str, str, str], ...] = ()
    key: KeySpec | None = None
    route: RouteSpec | None = None
    price: PriceSpec | None = None
    limits: LimitsSpec | None = None


_KEY_FIELDS = ("base_url", "weight", "allowed_models", "status")


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "*"
    if value == "":
        return "(default)"
    return str(value)


def _key_actions(tenant: str, wanted: Sequence[KeySpec], current: Sequence[CurrentKey], prune: bool) -> list[Action]:
    by_label = {k.label: k for k in current}
    actions: list[Action] = []
    for spec in wanted:
        have = by_label.get(spec.label)
        if have is None:
            actions.append(Action("create", "provider_key", tenant, spec.label, key=spec))
            continue
        if have.provider != spec.provider:
            raise PlanError(
                f"tenant {tenant!r}, key {spec.label!r}: the provider cannot change ({have.provider} -> "
                f"{spec.provider}); give the new key another label (and --prune the old one)"
            )
        changes: list[tuple[str, str, str]] = []
        for name in _KEY_FIELDS:
            old, new = getattr(have, name), getattr(spec, name)
            if old != new:
                changes.append((name, _show(old), _show(new)))
        if spec.secret is not None and fingerprint(spec.secret) != have.fingerprint:
            changes.append(("secret", f"fingerprint {have.fingerprint}", f"fingerprint {fingerprint(spec.secret)}"))
        if changes:
            actions.append(
                Action(
                    "update",
                    "provider_key",
                    tenant,
                    spec.label,
                    id=have.id,
                    etag=have.etag,
                    fields=tuple(c[0] for c in changes),
                    changes=tuple(changes),
                    key=spec,
                )
            )
    if prune:
        named = {k.label for k in wanted}
        actions += [Action("delete", "provider_key", tenant, k.label, id=k.id) for k in current if k.label not in named]
    return actions


def _route_actions(
    tenant: str, wanted: Sequence[RouteSpec], current: Sequence[CurrentRoute], prune: bool
) -> list[Action]:
    by_model = {r.model: r for r in current}
    actions: list[Action] = []
    for spec in wanted:
        have = by_model.get(spec.model)
        if have is None:
            actions.append(Action("create", "route", tenant, spec.model, route=spec))
        elif have.targets != spec.targets:
            change = ("targets", " ".join(map(target_text, have.targets)), " ".join(map(target_text, spec.targets)))
            actions.append(
                Action(
                    "update",
                    "route",
                    tenant,
                    spec.model,
                    id=have.id,
                    etag=have.etag,
                    fields=("targets",),
                    changes=(change,),
                    route=spec,
                )
            )
    if prune:
        named = {r.model for r in wanted}
        actions += [Action("delete", "route", tenant, r.model, id=r.id) for r in current if r.model not in named]
    return actions


def _client_key_actions(
    tenant: str, wanted: Sequence[str], current: Sequence[CurrentClientKey], prune: bool
) -> list[Action]:
    have = {c.label for c in current}
    actions = [Action("create", "client_key", tenant, label) for label in wanted if label not in have]
    if prune:
        named = set(wanted)
        actions += [Action("delete", "client_key", tenant, c.label, id=c.id) for c in current if c.label not in named]
    return actions


def _price_text(price: PriceSpec) -> str:
    return f"in {price.input}, cached {price.cached_input}, out {price.output} micro-USD/M"


def _price_actions(tenant: str, wanted: Sequence[PriceSpec], current: Sequence[PriceSpec], prune: bool) -> list[Action]:
    have = {(p.provider, p.model): p for p in current}
    actions: list[Action] = []
    for spec in wanted:
        name = f"{spec.provider}:{spec.model}"
        old = have.get((spec.provider, spec.model))
        if old is None:
            actions.append(Action("create", "price", tenant, name, price=spec))
        elif old != spec:
            change = ("price", _price_text(old), _price_text(spec))
            actions.append(Action("update", "price", tenant, name, fields=("price",), changes=(change,), price=spec))
    if prune:
        named = {(p.provider, p.model) for p in wanted}
        actions += [
            Action("delete", "price", tenant, f"{p.provider}:{p.model}", price=p)
            for p in current
            if (p.provider, p.model) not in named
        ]
    return actions


_ORDER: dict[tuple[Op, Kind], int] = {
    ("create", "tenant"): 0,
    ("create", "provider_key"): 1,
    ("update", "provider_key"): 1,
    ("create", "route"): 2,
    ("update", "route"): 2,
    ("create", "client_key"): 3,
    ("create", "price"): 3,
    ("update", "price"): 3,
    ("delete", "price"): 4,
    ("create", "limits"): 4,
    ("update", "limits"): 4,
    ("delete", "limits"): 4,
    ("delete", "route"): 4,
    ("delete", "provider_key"): 5,
    ("delete", "client_key"): 6,
    ("delete", "tenant"): 7,
}


def plan(
    wanted: Sequence[TenantSpec],
    current: Mapping[str, CurrentTenant],
    *,
    prune: bool = False,
    prune_tenants: bool = False,
) -> list[Action]:
    """The actions that make ``current`` (every existing tenant by name; the
    contents of those the file names) what ``wanted`` asks for. ``prune``
    deletes keys, routes and client keys of the named tenants that the file
    does not name; ``prune_tenants`` deletes tenants the file does not name.
    Order: create tenants, keys, routes, client keys; then delete routes
    (before the keys they use), keys, client keys, tenants."""
    actions: list[Action] = []
    for tenant in wanted:
        have = current.get(tenant.name)
        if have is None:
            actions.append(Action("create", "tenant", tenant.name, tenant.name))
            have = CurrentTenant(tenant.name)
        actions += _key_actions(tenant.name, tenant.keys, have.keys, prune)
        actions += _route_actions(tenant.name, tenant.routes, have.routes, prune)
        actions += _client_key_actions(tenant.name, tenant.client_keys, have.client_keys, prune)
        actions += _price_actions(tenant.name, tenant.prices, have.prices, prune)
        actions += [
            Action(
                op, "limits", tenant.name, label or TENANT_WIDE_NAME, fields=("limits",), changes=changes, limits=spec
            )
            for op, label, spec, changes in limits_actions(tenant.name, tenant.limits, have.limits, prune)
        ]
    if prune_tenants:
        named = {t.name for t in wanted}
        actions += [Action("delete", "tenant", name, name) for name in sorted(current) if name not in named]
    # Stable: within a step, the file's order.
    return sorted(actions, key=lambda a: _ORDER[(a.op, a.kind)])


def keyless_targets(tenant: TenantSpec, current: CurrentTenant | None, *, prune: bool) -> list[str]:
    """The route targets (``model -> provider:upstream``) whose provider will
    have no active key in the tenant once applied: requests routed to them
    get 503 no_usable_key. A vllm target with nodes needs no key. Keys the
    file does not name count unless they are pruned."""
    active = {k.provider for k in tenant.keys if k.status == "active"}
    if current is not None and not prune:
        named = {k.label for k in tenant.keys}
        active |= {k.provider for k in current.keys if k.label not in named and k.status == "active"}
    return [
        f"{route.model} -> {t.provider}:{t.model}"
        for route in tenant.routes
        for t in route.targets
        if t.provider not in active and not (t.provider == "vllm" and t.node_urls)
    ]
