"""What the request path reads: frozen views of keys and routes.

Built once from the watch stream's protobuf messages, so the hot path never
touches protobuf objects and secrets never show up in a repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from keyplane.convert import health_state_from_proto, provider_from_proto, provider_to_proto
from keyplane.domain import Provider
from keyplane.health.machine import HealthChange, KeyScope, ProviderScope, Verdict
from keyplane.v1 import resources_pb2, sidecar_service_pb2

from .endpoints import DEFAULT_ENDPOINTS, endpoints_from_proto, with_served

__all__ = [
    "Key",
    "Route",
    "Target",
    "key_from_proto",
    "key_health_change",
    "provider_from_proto",
    "provider_health_change",
    "provider_to_proto",
    "route_from_proto",
    "with_endpoints",
]


def _verdict(state: int, until: Timestamp, has_until: bool, reason: str) -> Verdict | None:
    health = health_state_from_proto(state)
    if health is None:
        return None
    return Verdict(state=health, until=until.ToNanoseconds() / 1e9 if has_until else None, reason=reason)


def key_health_change(msg: resources_pb2.KeyHealth) -> HealthChange | None:
    """The pushed verdict as the health book takes it; None for an unknown state."""
    verdict = _verdict(msg.state, msg.until, msg.HasField("until"), msg.reason)
    if verdict is None or not msg.key_id:
        return None
    return HealthChange(scope=KeyScope(msg.key_id, msg.model), verdict=verdict)


def provider_health_change(msg: resources_pb2.ProviderHealth) -> HealthChange | None:
    """The pushed verdict as the health book takes it; None for an unknown provider or state."""
    provider = provider_from_proto(msg.provider)
    verdict = _verdict(msg.state, msg.until, msg.HasField("until"), msg.reason)
    if provider is None or verdict is None:
        return None
    return HealthChange(scope=ProviderScope(provider, msg.model), verdict=verdict)


@dataclass(frozen=True, slots=True)
class Key:
    """A provider key as the sidecar uses it. ``secret`` is kept out of repr."""

    id: str
    provider: Provider
    base_url: str
    secret: str = field(repr=False)
    active: bool
    weight: int
    # Empty means every model.
    allowed_models: frozenset[str]
    label: str

    def allows(self, upstream_model: str) -> bool:
        return not self.allowed_models or upstream_model in self.allowed_models


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    upstream_model: str
    priority: int
    weight: int
    node_urls: tuple[str, ...]
    # Azure OpenAI classic deployments (``sidecar.upstream.request``): empty for the v1 API.
    api_version: str = ""
    deployment: str = ""
    # Names of the endpoints it serves (``sidecar.endpoints``); the provider's default when unset.
    endpoints: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    public_model: str
    targets: tuple[Target, ...]
    # Endpoint name -> this route with only the targets serving it (itself when all do);
    # an endpoint no target serves is absent. Built once with the route.
    by_endpoint: dict[str, Route] = field(default_factory=dict, compare=False, repr=False)

    def for_endpoint(self, name: str) -> Route | None:
        """The route as an endpoint sees it, or None when no target serves it."""
        return self.by_endpoint.get(name)


def key_from_proto(msg: sidecar_service_pb2.SidecarProviderKey) -> Key | None:
    """None when the key's provider is unknown to this build (it can never be used)."""
    provider = provider_from_proto(msg.provider)
    if provider is None:
        return None
    return Key(
        id=msg.id,
        provider=provider,
        base_url=msg.base_url,
        secret=msg.secret,
        active=msg.status == resources_pb2.KEY_STATUS_ACTIVE,
        weight=msg.weight,
        allowed_models=frozenset(msg.allowed_models),
        label=msg.label,
    )


def route_from_proto(msg: resources_pb2.Route) -> Route:
    """Targets with a provider this build does not know are dropped."""
    targets: list[Target] = []
    for t in msg.targets:
        provider = provider_from_proto(t.provider)
        if provider is None:
            continue
        targets.append(
            Target(
                provider=provider,
                upstream_model=t.upstream_model,
                priority=t.priority,
                weight=t.weight,
                node_urls=tuple(t.node_urls),
                api_version=t.api_version,
                deployment=t.deployment,
                endpoints=endpoints_from_proto(t.endpoints, provider),
            )
        )
    return with_endpoints(Route(id=msg.id, public_model=msg.public_model, targets=tuple(targets)))


def with_endpoints(route: Route) -> Route:
    """``route`` with its ``by_endpoint`` filled in (a target without endpoints serves its provider's default)."""
    served: dict[str, list[Target]] = {}
    for target in route.targets:
        for name in with_served(target.endpoints or DEFAULT_ENDPOINTS.get(target.provider, frozenset())):
            served.setdefault(name, []).append(target)
    by = route.by_endpoint
    by.clear()
    for name, targets in served.items():
        by[name] = route if len(targets) == len(route.targets) else Route(route.id, route.public_model, tuple(targets))
    return route
