"""The limits set on one client key or on a whole tenant (the domain object
behind ``keyplane.v1.Limits``), and the buckets they make."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["MAX_LIMIT", "LimitSet"]

# Upper bound of any one limit: far above any real rate or budget, and inside
# every store's signed 64-bit integer.
MAX_LIMIT = 2**62


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Zero means "no limit of that kind". ``client_key_id`` empty: tenant-wide."""

    tenant: str
    client_key_id: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    daily_budget_micros: int = 0
    monthly_budget_micros: int = 0
    updated_at: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.requests_per_minute or self.tokens_per_minute or self.daily_budget_micros or self.monthly_budget_micros
        )
