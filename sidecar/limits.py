"""Limits at the sidecar: admit or refuse a request from the local leases,
with no call to anyone (the leases arrive over ``StreamQuota``,
``sidecar.quota_client``).

A request is counted against its client key's requests-per-minute bucket and
its tenant's, before the upstream call; it is admitted only if every bucket
that has a lease has room (a refusal by one gives back what the other took).
Tokens per minute are known only once the answer is read: a request is
admitted while any of the lease is left, and its tokens are charged when its
usage is known (``charge_tokens``), so a window can be passed by what the
requests in flight at that moment use.
A bucket without a lease is not limited. When leases stop arriving the
sidecar keeps enforcing them (fail-static: each new window gets the lease's
``fallback``, its share of the limit by recent demand); with ``fail_open``
it admits everything once its leases are ``stale_after`` seconds old.

Spend budgets are charged at the prices that come with the leases (the
``PriceBook`` of ``sidecar.pricing``, shared with the app's cost counter).

The request path costs one dict lookup when no limit is set, two bucket
checks (integer arithmetic) otherwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from keyplane.pricing import micros_rounded_up
from keyplane.quota import Lease, LocalQuota
from keyplane.v1 import limits_pb2 as lpb

from .errors import ErrorResponse
from .pricing import PriceBook
from .usage import Usage

__all__ = ["Limiter", "budget_exceeded", "client_rate_limited"]

BucketKey = tuple[str, str, int]
_REQUESTS = lpb.QUOTA_KIND_REQUESTS
_TOKENS = lpb.QUOTA_KIND_TOKENS
_SPEND = (lpb.QUOTA_KIND_SPEND_DAY, lpb.QUOTA_KIND_SPEND_MONTH)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def client_rate_limited(
    retry_after_ms: int, *, tenant_wide: bool, limit: int, window_ms: int, what: str = "requests"
) -> ErrorResponse:
    """429 for a request over a keyplane limit: OpenAI's rate-limit shape
    (``type`` "requests" or "tokens") with our own code
    (``client_rate_limit_exceeded``, never the provider's ``rate_limit_exceeded``),
    ``Retry-After`` and ``retry-after-ms``."""
    whose = "this tenant" if tenant_wide else "this client key"
    seconds = retry_after_ms / 1000
    per = "minute" if window_ms == 60_000 else f"{window_ms / 1000:g} s"
    message = (
        f"Rate limit reached for {whose}: {limit} {what} per {per} (a keyplane limit, not the provider's). "
        f"Please try again in {seconds:.3g}s."
    )
    body = json.dumps(
        {"error": {"message": message, "type": what, "param": None, "code": "client_rate_limit_exceeded"}},
        separators=(",", ":"),
    ).encode()
    headers = (
        (b"retry-after", str(max(1, math.ceil(seconds))).encode()),
        (b"retry-after-ms", str(retry_after_ms).encode()),
    )
    return ErrorResponse(429, body, headers)


def budget_exceeded(retry_after_ms: int, *, tenant_wide: bool, budget_micros: int, monthly: bool) -> ErrorResponse:
    """A spent budget: 429 with ``x-should-retry: false`` and code ``budget_exceeded``
    (docs/usage-and-limits.md says why 429 and not 402); Retry-After: when it resets."""
    whose = "this tenant" if tenant_wide else "this client key"
    period = "month (UTC)" if monthly else "day (UTC)"
    seconds = retry_after_ms / 1000
    message = (
        f"The spend budget of {whose} for this {period} (${budget_micros / 1_000_000:,.2f}, a keyplane budget) "
        f"is spent; it resets in {seconds:,.0f}s."
    )
    body = json.dumps(
        {"error": {"message": message, "type": "budget_exceeded", "param": None, "code": "budget_exceeded"}},
        separators=(",", ":"),
    ).encode()
    headers = (
        (b"retry-after", str(max(1, math.ceil(seconds))).encode()),
        (b"retry-after-ms", str(retry_after_ms).encode()),
        (b"x-should-retry", b"false"),
    )
    return ErrorResponse(429, body, headers)


class Limiter:
    def __init__(
        self,
        *,
        fail_open: bool = False,
        stale_after: float = 5.0,
        clock_ms: Callable[[], int] = _now_ms,
        monotonic: Callable[[], float] = time.monotonic,
        prices: PriceBook | None = None,
    ) -> None:
        self.fail_open = fail_open
        self._stale_after = stale_after
        self._clock_ms = clock_ms
        self._monotonic = monotonic
        self._quotas: dict[BucketKey, LocalQuota] = {}
        self._tokens_limited = False
        # Spend budgets (charged at the prices the control plane sends with the leases,
        # also the sidecar's cost counter's: ``sidecar.pricing``).
        self._spend_limited = False
        self.prices = prices if prices is not None else PriceBook()
        self._leased_at: float | None = None
        self.refused = 0

    @property
    def limited(self) -> bool:
        return bool(self._quotas)

    def stale(self) -> bool:
        """No lease arrived for ``stale_after`` seconds (the control plane is away)."""
        return self._leased_at is None or self._monotonic() - self._leased_at > self._stale_after

    def admit(self, tenant: str, client_key_id: str) -> ErrorResponse | None:
        """None to go ahead, else the 429 to answer. Counts the request."""
        quotas = self._quotas
        if not quotas:
            return None
        key_quota = quotas.get((tenant, client_key_id, _REQUESTS))
        tenant_quota = quotas.get((tenant, "", _REQUESTS))
        if key_quota is None and tenant_quota is None and not (self._tokens_limited or self._spend_limited):
            return None
        if self.fail_open and self.stale():
            return None
        now = self._clock_ms()
        if self._tokens_limited or self._spend_limited:
            refused = self._check_after_the_fact(tenant, client_key_id, now)
            if refused is not None:
                for quota in (key_quota, tenant_quota):
                    if quota is not None:
                        quota.demanded += 1
                return refused
        if key_quota is not None:
            wait = key_quota.take(now)
            if wait:
                if tenant_quota is not None:
                    tenant_quota.demanded += 1
                return self._refuse(key_quota, wait, tenant_wide=False)
        if tenant_quota is not None:
            wait = tenant_quota.take(now)
            if wait:
                if key_quota is not None:
                    key_quota.refund()
                return self._refuse(tenant_quota, wait, tenant_wide=True)
        return None

    def _check_after_the_fact(self, tenant: str, client_key_id: str, now: int) -> ErrorResponse | None:
        """The limits charged once the answer is known (tokens, spend): admitted while any is left."""
        quotas = self._quotas
        for kind in (_TOKENS, *_SPEND):
            for owner, tenant_wide in ((client_key_id, False), ("", True)):
                quota = quotas.get((tenant, owner, kind))
                if quota is not None and (wait := quota.check(now)):
                    if kind == _TOKENS:
                        return self._refuse(quota, wait, tenant_wide=tenant_wide, what="tokens")
                    self.refused += 1
                    return budget_exceeded(
                        wait, tenant_wide=tenant_wide, budget_micros=quota.lease.limit, monthly=kind != _SPEND[0]
                    )
        return None

    def charge_spend(self, tenant: str, client_key_id: str, provider: int, model: str, usage: Usage) -> None:
        """Charge a finished request's cost (its usage at the tenant's price) to
        the spend budgets of its client key and tenant; an unpriced model costs 0."""
        if not self._spend_limited:
            return
        picos = self.prices.cost_picos(tenant, provider, model, usage)
        if picos is None:
            return
        micros = micros_rounded_up(picos)  # never under-charged
        if micros <= 0:
            return
        now = self._clock_ms()
        for kind in _SPEND:
            for owner in (client_key_id, ""):
                quota = self._quotas.get((tenant, owner, kind))
                if quota is not None:
                    quota.charge(now, micros)

    def charge_tokens(self, tenant: str, client_key_id: str, tokens: int) -> None:
        """Count a finished request's tokens (usage read from its answer)."""
        if not self._tokens_limited or tokens <= 0:
            return
        now = self._clock_ms()
        for key in ((tenant, client_key_id, _TOKENS), (tenant, "", _TOKENS)):
            quota = self._quotas.get(key)
            if quota is not None:
                quota.charge(now, tokens)

    def _refuse(self, quota: LocalQuota, wait_ms: int, *, tenant_wide: bool, what: str = "requests") -> ErrorResponse:
        self.refused += 1
        return client_rate_limited(
            wait_ms, tenant_wide=tenant_wide, limit=quota.lease.limit, window_ms=quota.lease.window_ms, what=what
        )

    def apply(self, response: lpb.StreamQuotaResponse) -> None:
        """Take a lease message; with ``complete``, buckets it leaves out are no
        longer limited; with ``prices_included``, its prices replace the ones held."""
        now = self._clock_ms()
        seen: set[BucketKey] = set()
        for item in response.leases:
            key = (item.bucket.tenant, item.bucket.client_key_id, int(item.bucket.kind))
            seen.add(key)
            lease = Lease(
                limit=item.limit,
                window_ms=item.window_ms,  # 0: the calendar month (keyplane.quota.MONTH)
                window_start_ms=item.window_start_ms,
                granted=item.granted,
                next_granted=item.next_granted,
                fallback=item.fallback,
                exhausted=item.exhausted,
            )
            quota = self._quotas.get(key)
            if quota is None:
                self._quotas[key] = quota = LocalQuota(lease)
                quota.remaining(now)  # start its window from this lease
            else:
                quota.update(lease, now)
        if response.complete:
            for key in [k for k in self._quotas if k not in seen]:
                del self._quotas[key]
        self._tokens_limited = any(k[2] == _TOKENS for k in self._quotas)
        self._spend_limited = any(k[2] in _SPEND for k in self._quotas)
        if response.prices_included or response.prices:
            # The whole table in scope (a control plane from before ``prices_included``
            # sends the budgeted tenants' prices in every message, without it).
            self.prices.replace(response.prices)
        self._leased_at = self._monotonic()

    def report(self) -> list[lpb.QuotaUsage]:
        """Usage of every leased bucket since the last report."""
        now = self._clock_ms()
        out = []
        for (tenant, client_key_id, kind), quota in self._quotas.items():
            start, used, demanded = quota.report(now)
            out.append(
                lpb.QuotaUsage(
                    bucket=lpb.QuotaBucket(tenant=tenant, client_key_id=client_key_id, kind=kind),  # type: ignore[arg-type]
                    window_start_ms=start,
                    used=used,
                    demanded=demanded,
                )
            )
        return out
