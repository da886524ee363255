"""Limits A/B: the sidecar's CPU per request with limits on and off, same run.

One control plane, one fake upstream, and two ``keyplane sidecar`` processes on
the same core(s): one as shipped, leasing quota for the client key's limits
(requests and tokens per minute, and the tenant's requests per minute: three
buckets checked per request, tokens charged after each answer, usage reported
and leases applied in the background), one with ``--no-limits``. The limits are
far above the load, so every request is admitted by both: the figure is the
cost of enforcing, not of refusing. For each mix the two are loaded alternately
for ``--duration`` seconds, ``--rounds`` times, order rotating; each sidecar's
CPU seconds (from /proc/<pid>/stat) per request, and on/off as a ratio (the
issue asks within 10%).

    python -m bench.limits_overhead                 # 3 rounds x 5 s per case
    python -m bench.limits_overhead --smoke
"""

from __future__ import annotations

import sys

from bench._keyplane import TENANT, Admin
from bench._on_off import FeatureAB, chat_body, run
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import limits_pb2 as lpb


def set_limits(admin: Admin) -> None:
    """Limits far above the load on the client key (requests and tokens) and the tenant (requests)."""
    md = admin.metadata
    [client_key] = admin.stub.ListClientKeys(
        admin_pb2.ListClientKeysRequest(tenant=TENANT), metadata=md, timeout=30
    ).client_keys
    for limits in (
        lpb.Limits(tenant=TENANT, client_key_id=client_key.id, requests_per_minute=10**9, tokens_per_minute=10**12),
        lpb.Limits(tenant=TENANT, requests_per_minute=10**9),
    ):
        admin.stub.SetLimits(lpb.SetLimitsRequest(limits=limits), metadata=md, timeout=30)


LIMITS = FeatureAB(
    name="limits",
    off_flag="--no-limits",
    mixes=(("json", chat_body(False)), ("sse", chat_body(True))),
    configure=set_limits,
    settle=2.0,  # the first leases (one rebalance)
)


def main(argv: list[str] | None = None) -> int:
    return run(LIMITS, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
