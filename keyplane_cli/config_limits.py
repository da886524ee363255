"""Limits in the declarative config (``keyplane apply``): what a tenant's
``limits`` and each client key's ``limits`` ask for, and the actions that make
the control plane's limits match. Client keys are named by label; their ids
are looked up when the action runs (a key the same apply creates has none
before)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["LimitsSpec", "limits_actions", "limits_text"]


@dataclass(frozen=True)
class LimitsSpec:
    """Zero: no limit of that kind. Budgets in micro-dollars (the file says dollars)."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    daily_budget_micros: int = 0
    monthly_budget_micros: int = 0


LimitsOp = Literal["create", "update", "delete"]
LimitsStep = tuple[LimitsOp, str, LimitsSpec, tuple[tuple[str, str, str], ...]]


def limits_text(spec: LimitsSpec) -> str:
    parts = [
        f"{name} {value}"
        for name, value in (
            ("rpm", spec.requests_per_minute),
            ("tpm", spec.tokens_per_minute),
            ("daily micro-USD", spec.daily_budget_micros),
            ("monthly micro-USD", spec.monthly_budget_micros),
        )
        if value
    ]
    return ", ".join(parts) or "none"


def limits_actions(
    tenant: str,
    wanted: Sequence[tuple[str, LimitsSpec]],
    current: Sequence[tuple[str, LimitsSpec]],
    prune: bool,
) -> list[LimitsStep]:
    """(op, client key label or "" for the tenant, limits, changes) to apply."""
    have = dict(current)
    out: list[LimitsStep] = []
    for label, spec in wanted:
        old = have.get(label)
        if old is None:
            out.append(("create", label, spec, ()))
        elif old != spec:
            out.append(("update", label, spec, (("limits", limits_text(old), limits_text(spec)),)))
    if prune:
        named = {label for label, _ in wanted}
        out += [("delete", label, spec, ()) for label, spec in current if label not in named]
    return out
