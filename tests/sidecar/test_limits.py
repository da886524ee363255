"""sidecar.limits: admission from the leases held, by table (clock injected)."""

from __future__ import annotations

import json

from keyplane.v1 import limits_pb2 as lpb
from sidecar.limits import Limiter

W = 6000
T0 = 600_000  # a window start


class Clock:
    def __init__(self) -> None:
        self.ms = T0 + 100
        self.mono = 0.0


def lease(client_key_id: str, granted: int, *, fallback: int = 0, exhausted: bool = False) -> lpb.QuotaLease:
    return lpb.QuotaLease(
        bucket=lpb.QuotaBucket(tenant="acme", client_key_id=client_key_id, kind=lpb.QUOTA_KIND_REQUESTS),
        limit=100,
        window_ms=W,
        window_start_ms=T0,
        granted=granted,
        fallback=fallback,
        exhausted=exhausted,
    )


def limiter(clock: Clock, *leases: lpb.QuotaLease, fail_open: bool = False) -> Limiter:
    lim = Limiter(fail_open=fail_open, stale_after=5.0, clock_ms=lambda: clock.ms, monotonic=lambda: clock.mono)
    lim.apply(lpb.StreamQuotaResponse(leases=leases, complete=True))
    return lim


def test_no_lease_no_limit() -> None:
    clock = Clock()
    lim = limiter(clock)
    assert not lim.limited
    assert all(lim.admit("acme", "ck_1") is None for _ in range(1000))


def test_the_client_key_lease_refuses_with_an_openai_shaped_429() -> None:
    clock = Clock()
    lim = limiter(clock, lease("ck_1", 2))
    assert lim.admit("acme", "ck_1") is None
    assert lim.admit("acme", "ck_1") is None
    refused = lim.admit("acme", "ck_1")
    assert refused is not None and refused.status == 429
    error = json.loads(refused.body)["error"]
    assert error["code"] == "client_rate_limit_exceeded" and error["type"] == "requests"
    assert "this client key" in error["message"]
    headers = dict(refused.headers)
    assert headers[b"retry-after"] == b"1" and headers[b"retry-after-ms"] == b"1000"
    assert lim.admit("acme", "ck_other") is None  # another key: not limited
    [usage] = lim.report()
    assert (usage.used, usage.demanded, usage.window_start_ms) == (2, 3, T0)


def test_a_spent_fleet_says_retry_at_the_next_window() -> None:
    clock = Clock()
    lim = limiter(clock, lease("ck_1", 0, exhausted=True))
    refused = lim.admit("acme", "ck_1")
    assert refused is not None
    assert dict(refused.headers)[b"retry-after-ms"] == str(W - 100).encode()


def test_the_tenant_limit_refuses_and_gives_the_key_its_count_back() -> None:
    clock = Clock()
    lim = limiter(clock, lease("ck_1", 10), lease("", 1))
    assert lim.admit("acme", "ck_1") is None
    refused = lim.admit("acme", "ck_1")
    assert refused is not None and "this tenant" in json.loads(refused.body)["error"]["message"]
    by_bucket = {u.bucket.client_key_id: (u.used, u.demanded) for u in lim.report()}
    assert by_bucket == {"ck_1": (1, 2), "": (1, 2)}
    assert lim.admit("acme", "ck_2") is not None  # every key of the tenant


def test_fail_static_keeps_the_fallback_and_fail_open_admits_once_stale() -> None:
    for fail_open, admitted in ((False, 3), (True, 50)):
        clock = Clock()
        lim = limiter(clock, lease("ck_1", 1, fallback=3), fail_open=fail_open)
        clock.ms = T0 + 5 * W + 1  # windows later, no lease since
        clock.mono = 60.0
        assert sum(lim.admit("acme", "ck_1") is None for _ in range(50)) == admitted


def test_a_complete_set_without_a_bucket_lifts_its_limit() -> None:
    clock = Clock()
    lim = limiter(clock, lease("ck_1", 0))
    assert lim.admit("acme", "ck_1") is not None
    lim.apply(lpb.StreamQuotaResponse(leases=[], complete=True))
    assert lim.admit("acme", "ck_1") is None


def test_tokens_are_charged_after_the_answer_and_refuse_once_spent() -> None:
    clock = Clock()
    tokens = lease("ck_1", 100)
    tokens.bucket.kind = lpb.QUOTA_KIND_TOKENS
    lim = limiter(clock, tokens)
    assert lim.admit("acme", "ck_1") is None
    lim.charge_tokens("acme", "ck_1", 90)
    assert lim.admit("acme", "ck_1") is None  # 10 left: admitted, its size is unknown yet
    lim.charge_tokens("acme", "ck_1", 40)
    refused = lim.admit("acme", "ck_1")
    assert refused is not None
    error = json.loads(refused.body)["error"]
    assert (error["type"], error["code"]) == ("tokens", "client_rate_limit_exceeded")
    [usage] = lim.report()
    # 130 used; the demand counts what a refused request would have used (the running average).
    assert usage.used == 130 and usage.demanded > 130
