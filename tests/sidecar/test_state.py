"""SidecarState driven by real WatchResponse messages."""

from __future__ import annotations

from keyplane.domain import Provider
from keyplane.v1 import resources_pb2, sidecar_service_pb2
from sidecar.state import SidecarState

from . import protos as p


def base_snapshot(version: int = 5) -> sidecar_service_pb2.WatchResponse:
    return p.snapshot(
        version,
        p.tenant_state(
            "acme",
            keys=[
                p.pkey("k1", "sk-1"),
                p.pkey("k2", "sk-2", allowed_models=["gpt-4o"]),
                p.pkey("k3", "sk-3", status=p.DISABLED),
                p.pkey("k4", "sk-4", status=p.REVOKED),
                p.pkey("a1", "sk-a", provider=p.ANTHROPIC),
                # An unknown provider is unusable: dropped.
                p.pkey("bad", "sk-x", provider=resources_pb2.Provider.ValueType(99)),
            ],
            routes=[p.route("r1", "fast", p.target("gpt-4o-mini")), p.route("r2", "smart", p.target("gpt-4o"))],
            client_keys=[p.client_key("c1", "tok-acme")],
        ),
        p.tenant_state("globex", client_keys=[p.client_key("c2", "tok-globex")]),
    )


def ids(keys: tuple[object, ...]) -> list[str]:
    return [k.id for k in keys]  # type: ignore[attr-defined]


def test_snapshot_populates_everything() -> None:
    state = SidecarState()
    assert not state.is_ready and state.version == 0 and state.last_update is None
    state.apply(base_snapshot())
    assert state.is_ready and state.version == 5
    assert state.tenants() == ("acme", "globex")
    assert state.authenticate("tok-acme") == "acme"
    assert state.authenticate("tok-globex") == "globex"
    assert state.authenticate("tok-nobody") is None
    assert state.authenticate("") is None
    assert state.models("acme") == ("fast", "smart")
    assert state.models("globex") == ()
    assert state.models("unknown") == ()
    route = state.route("acme", "fast")
    assert route is not None and route.targets[0].upstream_model == "gpt-4o-mini"
    assert state.route("globex", "fast") is None
    # Only ACTIVE keys, filtered by the allow-list.
    assert ids(state.keys("acme", Provider.OPENAI)) == ["k1", "k2"]
    assert ids(state.keys("acme", Provider.OPENAI, "gpt-4o-mini")) == ["k1"]
    assert ids(state.keys("acme", Provider.OPENAI, "gpt-4o")) == ["k1", "k2"]
    assert ids(state.keys("acme", Provider.ANTHROPIC, "claude")) == ["a1"]
    assert state.keys("globex", Provider.OPENAI, "gpt-4o") == ()


def test_secrets_stay_out_of_reprs() -> None:
    state = SidecarState()
    state.apply(base_snapshot())
    assert "sk-1" not in repr(state.keys("acme", Provider.OPENAI))


def test_a_new_snapshot_replaces_everything() -> None:
    state = SidecarState()
    state.apply(base_snapshot())
    state.apply(p.snapshot(9, p.tenant_state("initech", client_keys=[p.client_key("c9", "tok-init")])))
    assert state.version == 9
    assert state.tenants() == ("initech",)
    assert state.authenticate("tok-acme") is None
    assert state.authenticate("tok-init") == "initech"


def test_delta_changes_apply_in_order() -> None:
    state = SidecarState()
    state.apply(base_snapshot())
    state.apply(
        p.delta(
            p.key_put(6, "acme", p.pkey("k3", "sk-3")),  # re-enabled
            p.key_deleted(7, "acme", "k1"),
            p.route_put(8, "acme", p.route("r1", "fast-renamed", p.target("gpt-4o-mini"))),
            p.route_deleted(9, "acme", "r2"),
            p.client_key_put(10, "acme", p.client_key("c3", "tok-acme-2")),
            p.client_key_deleted(11, "acme", "c1"),
            p.tenant_deleted(12, "globex"),
        )
    )
    assert state.version == 12
    assert ids(state.keys("acme", Provider.OPENAI, "gpt-4o-mini")) == ["k3"]
    assert state.models("acme") == ("fast-renamed",)
    assert state.authenticate("tok-acme") is None
    assert state.authenticate("tok-acme-2") == "acme"
    assert state.authenticate("tok-globex") is None
    assert state.tenants() == ("acme",)


def test_delta_skips_changes_already_held() -> None:
    state = SidecarState()
    state.apply(base_snapshot(version=5))
    state.apply(p.delta(p.key_deleted(4, "acme", "k1"), p.key_deleted(5, "acme", "k2")))
    assert ids(state.keys("acme", Provider.OPENAI)) == ["k1", "k2"]
    assert state.version == 5


def test_delta_creates_a_new_tenant() -> None:
    state = SidecarState()
    state.apply(base_snapshot())
    state.apply(
        p.delta(
            p.client_key_put(6, "newco", p.client_key("n1", "tok-new")),
            p.route_put(7, "newco", p.route("nr", "m", p.target("x"))),
        )
    )
    assert state.authenticate("tok-new") == "newco"
    assert state.models("newco") == ("m",)


def test_views_held_by_a_request_do_not_change() -> None:
    state = SidecarState()
    state.apply(base_snapshot())
    view = state.tenant("acme")
    state.apply(p.delta(p.key_deleted(6, "acme", "k1")))
    assert ids(view.usable_keys(Provider.OPENAI, "gpt-4o-mini")) == ["k1"]
    assert state.keys("acme", Provider.OPENAI, "gpt-4o-mini") == ()


def test_age_and_connection() -> None:
    now = [100.0]
    state = SidecarState(clock=lambda: now[0])
    assert state.age() is None
    state.apply(base_snapshot())
    now[0] = 130.0
    assert state.age() == 30.0
    state.set_connected(True)
    assert state.age() == 0.0 and state.connected
    now[0] = 500.0
    state.set_connected(False)
    now[0] = 510.0
    assert state.age() == 10.0
