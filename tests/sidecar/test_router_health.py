"""Health-aware planning, still pure: the router only sees predicates."""

from __future__ import annotations

from keyplane.domain import Provider
from sidecar.model import Key, Route
from sidecar.router import Balancer, plan_attempts

from .test_router import key, target


def _plan(route: Route, keys: dict[Provider, list[Key]], **kwargs: object) -> list[tuple[str, str, str | None]]:
    plan = plan_attempts(
        "acme",
        route,
        lambda t: keys.get(t.provider, []),
        Balancer(),
        **kwargs,  # type: ignore[arg-type]
    )
    return [(a.target.provider.value, a.target.upstream_model, a.key.id if a.key else None) for a in plan]


def test_unusable_keys_are_left_out_per_model() -> None:
    route = Route("r", "chat", (target("model-a"), target("model-b", priority=1)))
    keys = {Provider.OPENAI: [key("k1", weight=5), key("k2")]}
    plan = _plan(route, keys, usable=lambda t, k: not (k.id == "k1" and t.upstream_model == "model-a"))
    assert plan == [("openai", "model-a", "k2"), ("openai", "model-b", "k1"), ("openai", "model-b", "k2")]


def test_a_target_without_usable_keys_is_skipped() -> None:
    route = Route("r", "chat", (target("gpt"), target("claude", Provider.ANTHROPIC, priority=1)))
    keys = {Provider.OPENAI: [key("o1")], Provider.ANTHROPIC: [key("a1", provider=Provider.ANTHROPIC)]}
    assert _plan(route, keys, usable=lambda t, k: k.provider is not Provider.OPENAI) == [("anthropic", "claude", "a1")]


def test_degraded_providers_move_last_but_stay() -> None:
    route = Route(
        "r",
        "chat",
        (
            target("gpt", priority=0),
            target("claude", Provider.ANTHROPIC, priority=1),
            target("gemini-flash", Provider.GEMINI, priority=2),
        ),
    )
    keys = {
        Provider.OPENAI: [key("o1")],
        Provider.ANTHROPIC: [key("a1", provider=Provider.ANTHROPIC)],
        Provider.GEMINI: [key("g1", provider=Provider.GEMINI)],
    }
    plan = _plan(route, keys, demoted=lambda t: t.provider in (Provider.OPENAI, Provider.ANTHROPIC))
    assert plan == [("gemini", "gemini-flash", "g1"), ("openai", "gpt", "o1"), ("anthropic", "claude", "a1")]
    # Nothing degraded: priority order.
    assert [p for p, _, _ in _plan(route, keys, demoted=lambda t: False)] == ["openai", "anthropic", "gemini"]


def test_vllm_nodes_are_not_tried_keyless_when_every_key_is_out() -> None:
    vllm = target("llama", Provider.VLLM)
    vllm = type(vllm)(provider=vllm.provider, upstream_model="llama", priority=0, weight=1, node_urls=("http://n1/v1",))
    route = Route("r", "llama", (vllm,))
    keys = {Provider.VLLM: [key("v1", provider=Provider.VLLM)]}
    assert _plan(route, keys, usable=lambda t, k: False) == []
    assert _plan(route, keys) == [("vllm", "llama", "v1")]
