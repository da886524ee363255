"""Planning declarative config: desired vs current state -> actions (pure, table-tested)."""

from __future__ import annotations

import pytest

from keyplane.crypto import fingerprint
from keyplane_cli.config_plan import (
    CurrentClientKey,
    CurrentKey,
    CurrentRoute,
    CurrentTenant,
    KeySpec,
    PlanError,
    RouteSpec,
    TargetSpec,
    TenantSpec,
    keyless_targets,
    plan,
)

SECRET = "sk-plan-0123456789abcdef"
GPT = TargetSpec("openai", "gpt-4o")
MINI = TargetSpec("openai", "gpt-4o-mini", priority=1, weight=3)

KEY = KeySpec("openai", "main", weight=2, allowed_models=("gpt-4o",), secret=SECRET, secret_ref="env:K")
HAVE_KEY = CurrentKey("pk_1", "e1", "openai", "main", "", 2, ("gpt-4o",), "active", fingerprint(SECRET))
ROUTE = RouteSpec("chat", (GPT, MINI))
HAVE_ROUTE = CurrentRoute("rt_1", "e2", "chat", (GPT, MINI))
WANT = TenantSpec("acme", (KEY,), (ROUTE,), ("app",))
HAVE = CurrentTenant("acme", (HAVE_KEY,), (HAVE_ROUTE,), (CurrentClientKey("ck_1", "app"),))


def _summary(wanted: list[TenantSpec], current: dict[str, CurrentTenant], **flags: bool) -> list[tuple[str, ...]]:
    return [(a.op, a.kind, a.tenant, a.name, *a.fields) for a in plan(wanted, current, **flags)]


CASES: list[tuple[str, list[TenantSpec], dict[str, CurrentTenant], dict[str, bool], list[tuple[str, ...]]]] = [
    ("in sync", [WANT], {"acme": HAVE}, {}, []),
    ("in sync, prune", [WANT], {"acme": HAVE}, {"prune": True, "prune_tenants": True}, []),
    (
        "everything new, in dependency order",
        [WANT],
        {},
        {},
        [
            ("create", "tenant", "acme", "acme"),
            ("create", "provider_key", "acme", "main"),
            ("create", "route", "acme", "chat"),
            ("create", "client_key", "acme", "app"),
        ],
    ),
    (
        "weight and models changed: only those fields",
        [TenantSpec("acme", (KeySpec("openai", "main", weight=5, secret=SECRET),), (ROUTE,), ("app",))],
        {"acme": HAVE},
        {},
        [("update", "provider_key", "acme", "main", "weight", "allowed_models")],
    ),
    (
        "another secret: rotate",
        [TenantSpec("acme", (KeySpec("openai", "main", "", 2, ("gpt-4o",), secret="sk-new-0123456789"),), (ROUTE,))],
        {"acme": HAVE},
        {},
        [("update", "provider_key", "acme", "main", "secret")],
    ),
    (
        "no secret in the file (vllm): never rotates",
        [TenantSpec("acme", (KeySpec("openai", "main", "", 2, ("gpt-4o",), secret=None),), (ROUTE,))],
        {"acme": HAVE},
        {},
        [],
    ),
    (
        "status and base_url",
        [TenantSpec("acme", (KeySpec("openai", "main", "https://x.test", 2, ("gpt-4o",), "disabled", SECRET),))],
        {"acme": HAVE},
        {},
        [("update", "provider_key", "acme", "main", "base_url", "status")],
    ),
    (
        "targets reordered is a change",
        [TenantSpec("acme", (KEY,), (RouteSpec("chat", (MINI, GPT)),), ("app",))],
        {"acme": HAVE},
        {},
        [("update", "route", "acme", "chat", "targets")],
    ),
    (
        "without prune nothing is deleted",
        [TenantSpec("acme")],
        {"acme": HAVE, "other": CurrentTenant("other")},
        {},
        [],
    ),
    (
        "prune deletes routes before keys, tenants only with prune_tenants",
        [TenantSpec("acme")],
        {"acme": HAVE, "other": CurrentTenant("other")},
        {"prune": True},
        [
            ("delete", "route", "acme", "chat"),
            ("delete", "provider_key", "acme", "main"),
            ("delete", "client_key", "acme", "app"),
        ],
    ),
    (
        "prune_tenants",
        [WANT],
        {"acme": HAVE, "other": CurrentTenant("other")},
        {"prune_tenants": True},
        [("delete", "tenant", "other", "other")],
    ),
    (
        "existing client keys are never changed; missing ones created",
        [TenantSpec("acme", (KEY,), (ROUTE,), ("app", "batch"))],
        {"acme": HAVE},
        {},
        [("create", "client_key", "acme", "batch")],
    ),
]


@pytest.mark.parametrize(("wanted", "current", "flags", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(
    wanted: list[TenantSpec],
    current: dict[str, CurrentTenant],
    flags: dict[str, bool],
    expected: list[tuple[str, ...]],
) -> None:
    assert _summary(wanted, current, **flags) == expected


def test_updates_carry_the_etag_id_and_readable_changes_without_secrets() -> None:
    wanted = [TenantSpec("acme", (KeySpec("openai", "main", "", 7, ("gpt-4o",), secret="sk-new-0123456789"),))]
    (action,) = plan(wanted, {"acme": HAVE})
    assert (action.id, action.etag) == ("pk_1", "e1")
    assert action.changes == (
        ("weight", "2", "7"),
        ("secret", f"fingerprint {fingerprint(SECRET)}", f"fingerprint {fingerprint('sk-new-0123456789')}"),
    )
    assert "sk-new" not in repr(action)
    (route_action,) = plan([TenantSpec("acme", (KEY,), (RouteSpec("chat", (GPT,)),))], {"acme": HAVE})
    assert (route_action.id, route_action.etag) == ("rt_1", "e2")
    assert route_action.changes == (("targets", "openai:gpt-4o@0*1 openai:gpt-4o-mini@1*3", "openai:gpt-4o@0*1"),)


def test_a_changed_provider_is_refused() -> None:
    with pytest.raises(PlanError, match=r"key 'main': the provider cannot change \(openai -> anthropic\)"):
        plan([TenantSpec("acme", (KeySpec("anthropic", "main", secret=SECRET),))], {"acme": HAVE})


VLLM_NODES = TargetSpec("vllm", "llama", node_urls=("http://10.0.0.1:8000",))
ANTHROPIC = TargetSpec("anthropic", "claude")
KEYLESS: list[tuple[str, TenantSpec, CurrentTenant | None, bool, list[str]]] = [
    ("every provider has a key", WANT, HAVE, False, []),
    ("vllm with nodes needs none", TenantSpec("acme", (), (RouteSpec("m", (VLLM_NODES,)),)), None, False, []),
    (
        "a disabled key is no key",
        TenantSpec("acme", (KeySpec("openai", "main", status="disabled"),), (ROUTE,)),
        None,
        False,
        ["chat -> openai:gpt-4o", "chat -> openai:gpt-4o-mini"],
    ),
    ("an existing key the file does not name counts", TenantSpec("acme", (), (ROUTE,)), HAVE, False, []),
    (
        "unless it is pruned",
        TenantSpec("acme", (), (RouteSpec("chat", (GPT, ANTHROPIC)),)),
        HAVE,
        True,
        ["chat -> openai:gpt-4o", "chat -> anthropic:claude"],
    ),
]


@pytest.mark.parametrize(
    ("tenant", "current", "prune", "expected"), [c[1:] for c in KEYLESS], ids=[c[0] for c in KEYLESS]
)
def test_keyless_targets(tenant: TenantSpec, current: CurrentTenant | None, prune: bool, expected: list[str]) -> None:
    assert keyless_targets(tenant, current, prune=prune) == expected
