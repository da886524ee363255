"""Table-driven tests of the pure request validators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from control_plane import validation as v
from keyplane.domain import KeyStatus, Provider, RouteTarget
from keyplane.errors import InvalidArgument

SECRET = "sk-valid-SECRETVALUE-123"


def _ok(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


VALID: list[tuple[str, Callable[[], Any], Any]] = [
    ("tenant slug", lambda: v.validate_tenant_name("acme-01_x"), "acme-01_x"),
    ("tenant 63 chars", lambda: v.validate_tenant_name("a" * 63), "a" * 63),
    ("tenant digit first", lambda: v.validate_tenant_name("9lives"), "9lives"),
    ("provider", lambda: v.validate_provider(Provider.GEMINI), Provider.GEMINI),
    ("status", lambda: v.validate_key_status(KeyStatus.REVOKED), KeyStatus.REVOKED),
    ("secret", lambda: v.validate_secret(SECRET, Provider.OPENAI), SECRET),
    ("secret 4096", lambda: v.validate_secret("x" * 4096, Provider.OPENAI), "x" * 4096),
    ("vllm empty secret", lambda: v.validate_secret("", Provider.VLLM), ""),
    ("base_url default", lambda: v.validate_base_url("", Provider.OPENAI), ""),
    ("base_url vllm optional", lambda: v.validate_base_url("", Provider.VLLM), ""),
    (
        "base_url trailing slash",
        lambda: v.validate_base_url("https://x.openai.azure.com/openai/", Provider.AZURE_OPENAI),
        "https://x.openai.azure.com/openai",
    ),
    (
        "base_url http with port",
        lambda: v.validate_base_url("http://127.0.0.1:8000/v1", Provider.OPENAI_COMPATIBLE),
        "http://127.0.0.1:8000/v1",
    ),
    ("base_url ipv6", lambda: v.validate_url("http://[::1]:8000", field="u"), "http://[::1]:8000"),
    ("label", lambda: v.validate_label("Prod key #2 (EU)"), "Prod key #2 (EU)"),
    ("label 128", lambda: v.validate_label("l" * 128), "l" * 128),
    ("weight 0 -> 1", lambda: v.validate_weight(0), 1),
    ("weight 1000", lambda: v.validate_weight(1000), 1000),
    ("allowed models dedupe", lambda: v.validate_allowed_models(["a", "b", "a"]), ("a", "b")),
    ("allowed models empty", lambda: v.validate_allowed_models([]), ()),
    ("public model", lambda: v.validate_public_model("gpt-4o:latest/x"), "gpt-4o:latest/x"),
    ("id", lambda: v.validate_id("pk_abc"), "pk_abc"),
    (
        "vllm target",
        lambda: v.validate_route_target(
            0,
            provider=Provider.VLLM,
            upstream_model="llama",
            priority=2,
            weight=0,
            node_urls=["http://n1:8000/", "http://n1:8000", "http://n2:8000"],
        ),
        RouteTarget(Provider.VLLM, "llama", 2, 1, ("http://n1:8000", "http://n2:8000")),
    ),
    (
        "openai target",
        lambda: v.validate_route_target(
            1, provider=Provider.OPENAI, upstream_model="gpt-4o", priority=0, weight=5, node_urls=[]
        ),
        RouteTarget(Provider.OPENAI, "gpt-4o", 0, 5, ()),
    ),
]


@pytest.mark.parametrize(("case", "call", "expected"), VALID, ids=[c[0] for c in VALID])
def test_valid(case: str, call: Callable[[], Any], expected: Any) -> None:
    assert call() == expected


def _target(**overrides: Any) -> Callable[[], Any]:
    values: dict[str, Any] = {
        "provider": Provider.OPENAI,
        "upstream_model": "gpt-4o",
        "priority": 0,
        "weight": 1,
        "node_urls": [],
    }
    values.update(overrides)
    return lambda: v.validate_route_target(3, **values)


INVALID: list[tuple[str, Callable[[], Any], str]] = [
    ("tenant empty", lambda: v.validate_tenant_name(""), "tenant is required"),
    ("tenant upper", lambda: v.validate_tenant_name("Acme"), "tenant 'Acme' is not a valid tenant name"),
    ("tenant space", lambda: v.validate_tenant_name("a b"), "not a valid tenant name"),
    ("tenant leading dash", lambda: v.validate_tenant_name("-acme"), "starting with a letter or digit"),
    ("tenant 64 chars", lambda: v.validate_tenant_name("a" * 64), "1 to 63"),
    ("tenant trailing newline", lambda: v.validate_tenant_name("acme\n"), "not a valid tenant name"),
    ("tenant field name", lambda: v.validate_tenant_name("", field="name"), "name is required"),
    (
        "provider unspecified",
        lambda: v.validate_provider(None),
        "provider is required; one of: openai, anthropic, azure_openai, gemini, openrouter, openai_compatible, vllm",
    ),
    ("status unspecified", lambda: v.validate_key_status(None), "status is required; one of: active, disabled"),
    ("secret empty", lambda: v.validate_secret("", Provider.OPENAI), "secret is required for provider openai"),
    ("secret newline", lambda: v.validate_secret(SECRET + "\n", Provider.OPENAI), "trailing newline"),
    ("secret space", lambda: v.validate_secret("sk abc", Provider.ANTHROPIC), "must not contain whitespace"),
    ("secret control", lambda: v.validate_secret("sk\x00abc", Provider.GEMINI), "control characters"),
    ("secret too long", lambda: v.validate_secret("x" * 4097, Provider.OPENAI), "at most 4096"),
    (
        "base_url required compat",
        lambda: v.validate_base_url("", Provider.OPENAI_COMPATIBLE),
        "base_url is required for provider openai_compatible",
    ),
    (
        "base_url required azure",
        lambda: v.validate_base_url("", Provider.AZURE_OPENAI),
        "base_url is required for provider azure_openai",
    ),
    ("base_url relative", lambda: v.validate_base_url("api.openai.com/v1", Provider.OPENAI), "absolute http"),
    ("base_url ftp", lambda: v.validate_base_url("ftp://h/x", Provider.OPENAI), "absolute http"),
    ("base_url no host", lambda: v.validate_base_url("http:///v1", Provider.OPENAI), "must name a host"),
    ("base_url userinfo", lambda: v.validate_base_url("https://u:p@h/v1", Provider.OPENAI), "credentials"),
    ("base_url query", lambda: v.validate_base_url("https://h/v1?key=1", Provider.OPENAI), "query string"),
    ("base_url fragment", lambda: v.validate_base_url("https://h/v1#x", Provider.OPENAI), "fragment"),
    ("base_url bad port", lambda: v.validate_base_url("https://h:99999/", Provider.OPENAI), "not a valid URL"),
    ("base_url space", lambda: v.validate_base_url("https://h/ v1", Provider.OPENAI), "whitespace"),
    ("label empty", lambda: v.validate_label(""), "label is required"),
    ("label too long", lambda: v.validate_label("l" * 129), "at most 128"),
    ("label control", lambda: v.validate_label("a\tb"), "printable"),
    ("label padded", lambda: v.validate_label(" a "), "start or end with whitespace"),
    ("weight too big", lambda: v.validate_weight(1001), "weight must be between 1 and 1000"),
    ("weight negative", lambda: v.validate_weight(-1), "between 1 and 1000"),
    ("allowed model empty", lambda: v.validate_allowed_models(["a", ""]), "allowed_models[1] must not be empty"),
    ("public model empty", lambda: v.validate_public_model(""), "public_model is required"),
    ("public model space", lambda: v.validate_public_model("a b"), "whitespace"),
    ("public model too long", lambda: v.validate_public_model("m" * 257), "at most 256"),
    ("id empty", lambda: v.validate_id(""), "id is required"),
    ("id space", lambda: v.validate_id("pk 1"), "id is not a valid id"),
    ("target no provider", _target(provider=None), "targets[3].provider is required; one of: openai"),
    ("target no model", _target(upstream_model=""), "targets[3].upstream_model is required"),
    ("target vllm no nodes", _target(provider=Provider.VLLM), "targets[3].node_urls needs at least one"),
    (
        "target vllm bad node",
        _target(provider=Provider.VLLM, node_urls=["http://ok", "tcp://bad"]),
        "targets[3].node_urls[1] must be an absolute http",
    ),
    ("target nodes on openai", _target(node_urls=["http://n"]), "targets[3].node_urls is only for provider vllm"),
    ("target weight", _target(weight=5000), "targets[3].weight must be between 1 and 1000"),
    ("no targets", lambda: v.validate_route_targets([]), "at least one target"),
]


@pytest.mark.parametrize(("case", "call", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid(case: str, call: Callable[[], Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert message in str(info.value)


@pytest.mark.parametrize(
    "secret",
    ["sk-proj-SECRET with space", "sk-SECRET\n", "x" * 5000 + "SECRET", "sk-SECRET\x7f"],
)
def test_secret_never_in_message(secret: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        v.validate_secret(secret, Provider.OPENAI)
    assert "SECRET" not in str(info.value)
    assert "SECRET" not in repr(info.value)


def test_url_credentials_never_in_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        v.validate_url("https://user:hunter2@h.example/v1", field="base_url")
    assert "hunter2" not in str(info.value)
