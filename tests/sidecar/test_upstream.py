"""URL and header rules per provider (pure)."""

from __future__ import annotations

import pytest

from keyplane.domain import Provider
from sidecar.model import Key, Target
from sidecar.router import Attempt
from sidecar.upstream import UpstreamConfigError, build_request


def attempt(provider: Provider, *, base_url: str = "", secret: str = "sk-test", node: str | None = None) -> Attempt:
    k = Key(
        id="k",
        provider=provider,
        base_url=base_url,
        secret=secret,
        active=True,
        weight=1,
        allowed_models=frozenset(),
        label="k",
    )
    t = Target(provider=provider, upstream_model="m", priority=0, weight=1, node_urls=(node,) if node else ())
    return Attempt(target=t, key=k, node_url=node)


@pytest.mark.parametrize(
    ("a", "url", "auth"),
    [
        (attempt(Provider.OPENAI), "https://api.openai.com/v1/chat/completions", ("authorization", "Bearer sk-test")),
        (
            attempt(Provider.ANTHROPIC),
            "https://api.anthropic.com/v1/chat/completions",
            ("authorization", "Bearer sk-test"),
        ),
        (
            attempt(Provider.GEMINI),
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
            ("authorization", "Bearer sk-test"),
        ),
        (
            attempt(Provider.OPENROUTER),
            "https://openrouter.ai/api/v1/chat/completions",
            ("authorization", "Bearer sk-test"),
        ),
        (
            attempt(Provider.OPENAI, base_url="https://proxy.example/v1/"),
            "https://proxy.example/v1/chat/completions",
            ("authorization", "Bearer sk-test"),
        ),
        (
            attempt(Provider.OPENAI_COMPATIBLE, base_url="http://10.0.0.5:8080/v1"),
            "http://10.0.0.5:8080/v1/chat/completions",
            ("authorization", "Bearer sk-test"),
        ),
        (
            attempt(Provider.AZURE_OPENAI, base_url="https://res.openai.azure.com/openai/v1"),
            "https://res.openai.azure.com/openai/v1/chat/completions",
            ("api-key", "sk-test"),
        ),
        (
            attempt(Provider.VLLM, secret="", node="http://gpu-1:8000/v1"),
            "http://gpu-1:8000/v1/chat/completions",
            None,
        ),
        (
            attempt(Provider.VLLM, secret="vllm-token", node="http://gpu-1:8000/v1"),
            "http://gpu-1:8000/v1/chat/completions",
            ("authorization", "Bearer vllm-token"),
        ),
    ],
)
def test_build_request(a: Attempt, url: str, auth: tuple[str, str] | None) -> None:
    app_headers = {
        "authorization": "Bearer kp-client",
        "accept": "application/json",
        "user-agent": "ua/1",
        "cookie": "c",
    }
    req = build_request(a, app_headers)
    assert req.url == url
    expected = {"content-type": "application/json", "accept": "application/json", "user-agent": "ua/1"}
    if auth is not None:
        expected[auth[0]] = auth[1]
    assert req.headers == expected
    assert "sk-test" not in repr(req)


@pytest.mark.parametrize("provider", [Provider.OPENAI_COMPATIBLE, Provider.AZURE_OPENAI, Provider.VLLM])
def test_providers_without_a_default_need_a_base_url(provider: Provider) -> None:
    with pytest.raises(UpstreamConfigError) as exc:
        build_request(attempt(provider), {})
    assert "sk-test" not in str(exc.value)
