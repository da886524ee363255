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


def _azure(base_url: str, *, api_version: str = "", deployment: str = "") -> Attempt:
    a = attempt(Provider.AZURE_OPENAI, base_url=base_url)
    t = Target(
        provider=Provider.AZURE_OPENAI,
        upstream_model="gpt-4o",
        priority=0,
        weight=1,
        node_urls=(),
        api_version=api_version,
        deployment=deployment,
    )
    return Attempt(target=t, key=a.key)


@pytest.mark.parametrize(
    ("a", "url"),
    [
        # The v1 API: a v1 base URL as the openai SDK takes it, or the bare resource endpoint.
        (_azure("https://res.openai.azure.com/openai/v1/"), "https://res.openai.azure.com/openai/v1/chat/completions"),
        (_azure("https://res.openai.azure.com"), "https://res.openai.azure.com/openai/v1/chat/completions"),
        # Classic deployments: the deployment (default: the upstream model) and api-version in the URL,
        # whichever form the key's base URL has.
        (
            _azure("https://res.openai.azure.com", api_version="2024-10-21", deployment="gpt4o-prod"),
            "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
        ),
        (
            _azure("https://res.openai.azure.com/openai/v1", api_version="2025-04-01-preview"),
            "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2025-04-01-preview",
        ),
        (
            _azure("https://res.openai.azure.com/openai/", api_version="2024-10-21"),
            "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        ),
    ],
)
def test_azure_request_shapes(a: Attempt, url: str) -> None:
    req = build_request(a, {"authorization": "Bearer kp-client"})
    assert req.url == url
    assert req.headers == {"content-type": "application/json", "api-key": "sk-test"}
    # Every endpoint the same way, its path in place of /chat/completions.
    embeddings = build_request(a, {}, "/embeddings")
    assert embeddings.url == url.replace("/chat/completions", "/embeddings")
