"""``keyplane apply`` for limits: read the tenant's limits as the plan needs
them (by client key label) and carry out a limits action (``SetLimits`` or
``ClearLimits``, the client key's id looked up by label when it runs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import limits_pb2 as lpb
from keyplane_cli.admin_client import AdminClient, CliError
from keyplane_cli.config_limits import LimitsSpec
from keyplane_cli.config_plan import TENANT_WIDE_NAME, Action

__all__ = ["current_limits", "execute_limits"]


def current_limits(
    statuses: Sequence[lpb.LimitsStatus], labels: Mapping[str, str]
) -> tuple[tuple[str, LimitsSpec], ...]:
    out = []
    for status in statuses:
        limits = status.limits
        label = labels.get(limits.client_key_id, "") if limits.client_key_id else ""
        if limits.client_key_id and not label:
            continue  # of a client key that is gone
        spec = LimitsSpec(
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.daily_budget_micros,
            limits.monthly_budget_micros,
        )
        out.append((label, spec))
    return tuple(out)


def _client_key_id(client: AdminClient, tenant: str, label: str) -> str:
    if label == TENANT_WIDE_NAME:
        return ""
    for c in client.call("ListClientKeys", apb.ListClientKeysRequest(tenant=tenant)).client_keys:
        if c.label == label:
            return str(c.id)
    raise CliError(f"tenant {tenant}: no client key labelled {label!r} for its limits")


def execute_limits(client: AdminClient, action: Action) -> None:
    client_key_id = _client_key_id(client, action.tenant, action.name)
    if action.op == "delete":
        client.call("ClearLimits", lpb.ClearLimitsRequest(tenant=action.tenant, client_key_id=client_key_id))
        return
    spec = action.limits
    assert spec is not None
    limits = lpb.Limits(
        tenant=action.tenant,
        client_key_id=client_key_id,
        requests_per_minute=spec.requests_per_minute,
        tokens_per_minute=spec.tokens_per_minute,
        daily_budget_micros=spec.daily_budget_micros,
        monthly_budget_micros=spec.monthly_budget_micros,
    )
    client.call("SetLimits", lpb.SetLimitsRequest(limits=limits))
