"""Planning one request: its attempts over a route's targets and the tenant's keys, as health sees them now.

One plan for every caller: the request handlers (``sidecar.chat``,
``sidecar.anthropic_messages``), which record why each key was left out, and
the rescue's replan (``sidecar.rescue_plan``), which does not. Keys that
cannot serve (unhealthy, exhausted, cooling down) are left out, targets of a
degraded provider come last (``sidecar.router.plan_attempts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .router import Attempt, plan_attempts

if TYPE_CHECKING:
    from .health import TenantHealth
    from .model import Key, Route, Target
    from .router import Balancer
    from .state import SidecarState

__all__ = ["PlanApp", "keys_of", "plan_for"]


class PlanApp(Protocol):
    """What planning needs of the app (``SidecarApp``)."""

    state: SidecarState
    balancer: Balancer
    max_attempts: int


def keys_of(state: SidecarState, tenant: str) -> Callable[[Target], tuple[Key, ...]]:
    """The tenant's active keys that may serve a target."""
    return lambda t: state.keys(tenant, t.provider, t.upstream_model)


def plan_for(
    app: PlanApp,
    health: TenantHealth,
    tenant: str,
    route: Route,
    excluded: dict[str, str] | None = None,
) -> list[Attempt]:
    """The attempts of one request to ``route`` (narrowed to the endpoint's targets), at most
    ``app.max_attempts``; each key left out is recorded in ``excluded`` (key id -> why), if given."""
    now = app.state.wall_clock()
    if excluded is None:

        def usable(target: Target, key: Key) -> bool:
            return health.key_usable(key.id, target.upstream_model, now)

    else:

        def usable(target: Target, key: Key) -> bool:
            why = health.key_block_reason(key.id, target.upstream_model, now)
            if why is None:
                return True
            excluded.setdefault(key.id, why)
            return False

    return plan_attempts(
        tenant,
        route,
        keys_of(app.state, tenant),
        app.balancer,
        limit=app.max_attempts,
        usable=usable,
        demoted=lambda t: health.provider_degraded(t.provider, t.upstream_model, now),
    )
