"""The recovery probe's pure parts: which request it sends for a key, and
what each kind of answer does to the bench."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.recovery_probe import RecoveryProbeConfig, decide, plan_probe
from keyplane.domain import HealthState, KeyHealth, Provider
from keyplane.health import Classification, ErrorClass, HealthPolicy
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb

SECRET = "sk-plan-0123456789abcdef"


def key(
    provider: int = rpb.PROVIDER_OPENAI, base_url: str = "", allowed: tuple[str, ...] = ()
) -> spb.SidecarProviderKey:
    return spb.SidecarProviderKey(
        id="pk_1",
        provider=provider,  # type: ignore[arg-type]
        base_url=base_url,
        secret=SECRET,
        status=rpb.KEY_STATUS_ACTIVE,
        allowed_models=list(allowed),
    )


def route(public: str, *targets: tuple[int, str, int], nodes: tuple[str, ...] = ()) -> rpb.Route:
    return rpb.Route(
        public_model=public,
        targets=[
            rpb.RouteTarget(provider=p, upstream_model=m, priority=prio, node_urls=list(nodes))  # type: ignore[arg-type]
            for p, m, prio in targets
        ],
    )


def test_completion_for_the_first_allowed_model_at_the_default_base_url() -> None:
    plan = plan_probe(key(allowed=("gpt-4o-mini", "gpt-4o")), [], "completion")
    assert plan is not None
    assert (plan.method, plan.url) == ("POST", "https://api.openai.com/v1/chat/completions")
    assert plan.headers["authorization"] == f"Bearer {SECRET}"
    assert plan.json == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    assert SECRET not in repr(plan)


def test_completion_for_the_first_route_target_of_the_keys_provider() -> None:
    routes = [
        route("zeta", (rpb.PROVIDER_ANTHROPIC, "claude-z", 0)),
        route("alpha", (rpb.PROVIDER_OPENAI, "gpt-late", 2), (rpb.PROVIDER_ANTHROPIC, "claude-a", 1)),
    ]
    plan = plan_probe(key(rpb.PROVIDER_ANTHROPIC), routes, "completion")
    assert plan is not None and plan.json is not None
    assert plan.url == "https://api.anthropic.com/v1/chat/completions"
    assert plan.json["model"] == "claude-a"


def test_azure_sends_its_api_key_header_and_models_probe_and_fallbacks() -> None:
    plan = plan_probe(key(rpb.PROVIDER_AZURE_OPENAI, "https://r.openai.azure.com/openai/v1/"), [], "models")
    assert plan is not None
    assert (plan.method, plan.url, plan.json) == ("GET", "https://r.openai.azure.com/openai/v1/models", None)
    assert plan.headers["api-key"] == SECRET and "authorization" not in plan.headers
    # No model known: a completion probe falls back to the model list.
    fallback = plan_probe(key(rpb.PROVIDER_OPENAI_COMPATIBLE, "http://llm.internal/v1"), [], "completion")
    assert fallback is not None and fallback.method == "GET"
    # vLLM keys without a base URL use the first node of their route.
    vllm = plan_probe(
        key(rpb.PROVIDER_VLLM),
        [route("m", (rpb.PROVIDER_VLLM, "llama", 0), nodes=("http://n1:8000/v1",))],
        "completion",
    )
    assert vllm is not None and vllm.url == "http://n1:8000/v1/chat/completions"
    assert plan_probe(key(rpb.PROVIDER_OPENAI_COMPATIBLE), [], "completion") is None  # no base URL at all


NOW = 1_700_000_000.0
POLICY = HealthPolicy(exhausted_bench=300.0, exhausted_max_bench=3600.0)
BENCHED = KeyHealth(
    "acme",
    "pk_1",
    "",
    HealthState.EXHAUSTED,
    datetime.fromtimestamp(NOW, UTC),
    "402 insufficient balance: Insufficient Balance",
    datetime.fromtimestamp(NOW - 600.0, UTC),
)


@pytest.mark.parametrize(
    ("error_class", "outcome", "state", "bench", "reason"),
    [
        (ErrorClass.SUCCESS, "restored", HealthState.HEALTHY, None, "recovery probe succeeded"),
        (ErrorClass.RATE_LIMITED, "restored", HealthState.HEALTHY, None, "recovery probe succeeded"),
        (ErrorClass.EXHAUSTED, "extended", HealthState.EXHAUSTED, 1200.0, "probe said"),
        (ErrorClass.CREDENTIAL, "credential", HealthState.UNHEALTHY, None, "probe said"),
        (ErrorClass.UPSTREAM_ERROR, "inconclusive", HealthState.EXHAUSTED, 300.0, BENCHED.reason),
        (ErrorClass.CLIENT_ERROR, "inconclusive", HealthState.EXHAUSTED, 300.0, BENCHED.reason),
    ],
)
def test_what_each_answer_does(
    error_class: ErrorClass, outcome: str, state: HealthState, bench: float | None, reason: str
) -> None:
    got_outcome, record = decide(Classification(error_class, 0, "probe said"), BENCHED, NOW, POLICY)
    assert (got_outcome, record.state, record.reason, record.model) == (outcome, state, reason, "")
    if bench is None:
        assert record.until is None
    else:
        assert record.until == datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=bench)
    assert record.updated_at == datetime.fromtimestamp(NOW, UTC)


def test_config_bounds() -> None:
    assert RecoveryProbeConfig().kind(Provider.OPENAI) == "completion"
    for bad in ({"interval": 0}, {"timeout": -1.0}, {"lead": -1.0}, {"concurrency": 0}):
        with pytest.raises(ValueError):
            RecoveryProbeConfig(**bad)
