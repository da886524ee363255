"""Limits in the declarative config, with ``keyplane apply`` / ``diff`` as a
user runs them against a real control plane on both stores: a tenant's and a
client key's limits are created (the key in the same apply), changed, shown
by ``keyplane limits show`` and pruned."""

from __future__ import annotations

import json

from tests.e2e.test_apply import Plane, _summary, plane  # noqa: F401  (the fixture)

CONFIG = """
tenants:
  - name: acme
    limits: {requests_per_minute: 6000, daily_budget: 0}
    client_keys:
      - label: app
        limits: {requests_per_minute: 600, tokens_per_minute: 90000}
      - batch
"""


async def test_limits_apply_diff_and_prune(plane: Plane) -> None:  # noqa: F811
    plane.file.write_text(CONFIG)
    assert _summary(await plane.plan(code=1)) == [
        ("create", "tenant", "acme", {}),
        ("create", "client_key", "app", {}),
        ("create", "client_key", "batch", {}),
        ("create", "limits", "(tenant)", {}),
        ("create", "limits", "app", {}),
    ]
    await plane.ok("apply", "-f", str(plane.file))
    assert await plane.plan(code=0) == []
    [app] = [c for c in await plane.listed("client-keys") if c["label"] == "app"]
    shown = json.loads(await plane.ok("limits", "show", "-t", "acme", "--all", "-o", "json"))
    by_key = {s["limits"].get("client_key_id", ""): s["limits"] for s in shown["statuses"]}
    assert by_key[""]["requests_per_minute"] == "6000"
    assert (by_key[app["id"]]["requests_per_minute"], by_key[app["id"]]["tokens_per_minute"]) == ("600", "90000")

    changed = CONFIG.replace("requests_per_minute: 600,", "requests_per_minute: 1200,")
    plane.file.write_text(changed)
    [(op, kind, name, changes)] = _summary(await plane.plan(code=1))
    assert (op, kind, name) == ("update", "limits", "app")
    assert changes == {"limits": {"from": "rpm 600, tpm 90000", "to": "rpm 1200, tpm 90000"}}
    await plane.ok("apply", "-f", str(plane.file))

    plane.file.write_text(changed.replace("    limits: {requests_per_minute: 6000, daily_budget: 0}\n", ""))
    assert _summary(await plane.plan("--prune", code=1)) == [("delete", "limits", "(tenant)", {})]
    await plane.ok("apply", "-f", str(plane.file), "--prune", "--yes")
    shown = json.loads(await plane.ok("limits", "show", "-t", "acme", "--all", "-o", "json"))
    assert [s["limits"].get("client_key_id", "") for s in shown["statuses"]] == [app["id"]]
