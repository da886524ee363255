"""What ``sidecar.rescue`` needs of one request, built from the app and the request.

Kept apart from the handler (``sidecar.chat``) so that the handler stays one
walk from the app's request to the relay; built only should no key be able to
serve (``functools.partial`` of ``rescue_for`` on the happy path).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Protocol

from .planning import PlanApp, plan_for
from .rescue import ProbeGate, Rescue

if TYPE_CHECKING:
    from keyplane.health.panic import PanicPolicy

    from .health import TenantHealth
    from .metrics import SidecarMetrics
    from .model import Route

__all__ = ["APP_TIMEOUT_HEADER", "RescueApp", "app_deadline", "rescue_for"]

# How long the app's SDK waits for an answer (the openai SDKs send it): no wait
# of the sidecar's (``sidecar.rescue``) outlasts it.
APP_TIMEOUT_HEADER = "x-stainless-read-timeout"


class RescueApp(PlanApp, Protocol):
    """What the rescue needs of the app (``SidecarApp``)."""

    metrics: SidecarMetrics
    request_timeout: float
    panic_policy: PanicPolicy
    probes: ProbeGate


def rescue_for(
    app: RescueApp,
    health: TenantHealth,
    tenant: str,
    model: str,
    route: Route,
    headers: dict[str, str],
    deadline: float,
) -> Rescue:
    """The request's ``Rescue``: ``route`` is the route narrowed to the endpoint's targets."""
    state = app.state
    return Rescue(
        tenant=tenant,
        model=model,
        route=route,
        health=health,
        gate=app.probes,
        policy=app.panic_policy,
        keys_for=lambda provider, upstream_model: state.keys(tenant, provider, upstream_model),
        has_inactive_key=lambda provider, upstream_model: state.has_inactive_key(tenant, provider, upstream_model),
        replan=functools.partial(plan_for, app, health, tenant, route),
        wait_until=app_deadline(headers, deadline, deadline - app.request_timeout),
        count=lambda action: app.metrics.rescues.labels(action).inc(),
    )


def app_deadline(headers: dict[str, str], deadline: float, started: float) -> float:
    """Loop time by which the app stops waiting (its SDK's read timeout from ``started``),
    else ``deadline``."""
    given = headers.get(APP_TIMEOUT_HEADER)
    if given is None:
        return deadline
    try:
        seconds = float(given)
    except ValueError:
        return deadline
    if not seconds > 0:  # also NaN
        return deadline
    return min(deadline, started + seconds)
