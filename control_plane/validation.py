"""Request validation: pure functions that return the normalised value or
raise ``InvalidArgument`` with a message saying exactly what is wrong.

No message ever contains a secret (nor a URL, which could hold credentials).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from control_plane.url_policy import DEFAULT_URL_POLICY, UrlPolicy
from keyplane import convert
from keyplane.domain import KeyStatus, Provider, RouteTarget
from keyplane.errors import InvalidArgument

__all__ = [
    "DEFAULT_WEIGHT",
    "MAX_LABEL_CHARS",
    "MAX_PUBLIC_MODEL_CHARS",
    "MAX_SECRET_CHARS",
    "MAX_WEIGHT",
    "PROVIDERS_NEEDING_BASE_URL",
    "validate_allowed_models",
    "validate_azure_deployment",
    "validate_base_url",
    "validate_id",
    "validate_key_status",
    "validate_label",
    "validate_provider",
    "validate_public_model",
    "validate_route_target",
    "validate_route_targets",
    "validate_secret",
    "validate_tenant_name",
    "validate_url",
    "validate_weight",
]

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_SECRET_CHARS = 4096
MAX_LABEL_CHARS = 128
MAX_PUBLIC_MODEL_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_URL_CHARS = 2048
MAX_ID_CHARS = 128
DEFAULT_WEIGHT = 1
MAX_WEIGHT = 1000
PROVIDERS_NEEDING_BASE_URL = frozenset({Provider.OPENAI_COMPATIBLE, Provider.AZURE_OPENAI})
_PROVIDER_NAMES = ", ".join(p.value for p in Provider)
_STATUS_NAMES = ", ".join(s.value for s in KeyStatus)


def _has_space_or_control(text: str) -> bool:
    return any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in text)


def validate_tenant_name(name: str, *, field: str = "tenant") -> str:
    if not name:
        raise InvalidArgument(f"{field} is required")
    if _TENANT_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"{field} {name[:80]!r} is not a valid tenant name: use 1 to 63 lower-case letters, digits, "
            "'-' or '_', starting with a letter or digit"
        )
    return name


def validate_id(value: str, *, field: str = "id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > MAX_ID_CHARS or _has_space_or_control(value):
        raise InvalidArgument(f"{field} is not a valid id")
    return value


def validate_provider(provider: Provider | None, *, field: str = "provider") -> Provider:
    """``provider`` is None for PROVIDER_UNSPECIFIED or an unknown enum number."""
    if provider is None:
        raise InvalidArgument(f"{field} is required; one of: {_PROVIDER_NAMES}")
    return provider


def validate_key_status(status: KeyStatus | None, *, field: str = "status") -> KeyStatus:
    """``status`` is None for KEY_STATUS_UNSPECIFIED or an unknown enum number."""
    if status is None:
        raise InvalidArgument(f"{field} is required; one of: {_STATUS_NAMES}")
    return status


def validate_secret(secret: str, provider: Provider, *, field: str = "secret") -> str:
    """Non-empty (except for vllm), no whitespace or control characters, at
    most 4096 characters. Never echoes the secret."""
    if not secret:
        if provider is Provider.VLLM:
            return secret
        raise InvalidArgument(f"{field} is required for provider {provider.value}")
    if len(secret) > MAX_SECRET_CHARS:
        raise InvalidArgument(f"{field} is too long: at most {MAX_SECRET_CHARS} characters")
    if _has_space_or_control(secret):
        raise InvalidArgument(
            f"{field} must not contain whitespace or control characters (check for a trailing newline)"
        )
    return secret


def validate_url(url: str, *, field: str) -> str:
    """An absolute http(s) URL with a host, without credentials, query or
    fragment; trailing slashes are removed."""
    if not url:
        raise InvalidArgument(f"{field} is required")
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgument(f"{field} is too long: at most {MAX_URL_CHARS} characters")
    if _has_space_or_control(url):
        raise InvalidArgument(f"{field} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidArgument(f"{field} is not a valid URL") from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"{field} must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise InvalidArgument(f"{field} must not contain credentials (user:password@); put them in the secret")
    if not parts.hostname:
        raise InvalidArgument(f"{field} must name a host")
    if "?" in url or "#" in url:
        raise InvalidArgument(f"{field} must not have a query string or fragment")
    return url.rstrip("/")


def validate_base_url(
    base_url: str, provider: Provider, *, field: str = "base_url", policy: UrlPolicy = DEFAULT_URL_POLICY
) -> str:
    """Required for openai_compatible and azure_openai; optional otherwise,
    where empty means the provider's default endpoint (chosen by the sidecar).
    Its host must be one ``policy`` allows."""
    if not base_url:
        if provider in PROVIDERS_NEEDING_BASE_URL:
            raise InvalidArgument(f"{field} is required for provider {provider.value}")
        return ""
    url = validate_url(base_url, field=field)
    policy.check(url, field=field)
    return url


def validate_label(label: str, *, field: str = "label") -> str:
    if not label:
        raise InvalidArgument(f"{field} is required")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidArgument(f"{field} is too long: at most {MAX_LABEL_CHARS} characters")
    if not label.isprintable():
        raise InvalidArgument(f"{field} must contain only printable characters")
    if label != label.strip():
        raise InvalidArgument(f"{field} must not start or end with whitespace")
    return label


def validate_weight(weight: int, *, field: str = "weight") -> int:
    """0 means the default (1); at most 1000."""
    if weight == 0:
        return DEFAULT_WEIGHT
    if weight < 0 or weight > MAX_WEIGHT:
        raise InvalidArgument(f"{field} must be between 1 and {MAX_WEIGHT} (0 means {DEFAULT_WEIGHT})")
    return weight


def _validate_model_name(name: str, *, field: str) -> str:
    if not name:
        raise InvalidArgument(f"{field} must not be empty")
    if len(name) > MAX_MODEL_CHARS:
        raise InvalidArgument(f"{field} is too long: at most {MAX_MODEL_CHARS} characters")
    if _has_space_or_control(name):
        raise InvalidArgument(f"{field} must not contain whitespace or control characters")
    return name


def validate_allowed_models(models: Iterable[str], *, field: str = "allowed_models") -> tuple[str, ...]:
    """Each entry non-empty; duplicates are dropped, order kept. Empty = every model."""
    seen: dict[str, None] = {}
    for index, model in enumerate(models):
        seen[_validate_model_name(model, field=f"{field}[{index}]")] = None
    return tuple(seen)


def validate_public_model(public_model: str, *, field: str = "public_model") -> str:
    if not public_model:
        raise InvalidArgument(f"{field} is required")
    if len(public_model) > MAX_PUBLIC_MODEL_CHARS:
        raise InvalidArgument(f"{field} is too long: at most {MAX_PUBLIC_MODEL_CHARS} characters")
    if _has_space_or_control(public_model):
        raise InvalidArgument(f"{field} must not contain whitespace or control characters")
    return public_model


def validate_route_target(
    index: int,
    *,
    provider: Provider | None,
    upstream_model: str,
    priority: int,
    weight: int,
    node_urls: Sequence[str],
    api_version: str = "",
    deployment: str = "",
    policy: UrlPolicy = DEFAULT_URL_POLICY,
    endpoints: Sequence[str | None] = (),
) -> RouteTarget:
    """One target of a route; ``index`` names it in messages (``targets[1]``).
    vLLM node URLs must name hosts ``policy`` allows; ``api_version`` and
    ``deployment`` are for Azure OpenAI only (``validate_azure_deployment``)."""
    prefix = f"targets[{index}]"
    checked_provider = validate_provider(provider, field=f"{prefix}.provider")
    if not upstream_model:
        raise InvalidArgument(f"{prefix}.upstream_model is required")
    model = _validate_model_name(upstream_model, field=f"{prefix}.upstream_model")
    if checked_provider is Provider.VLLM:
        if not node_urls:
            raise InvalidArgument(f"{prefix}.node_urls needs at least one node URL for provider vllm")
        urls: dict[str, None] = {}
        for url_index, url in enumerate(node_urls):
            url_field = f"{prefix}.node_urls[{url_index}]"
            checked = validate_url(url, field=url_field)
            policy.check(checked, field=url_field)
            urls[checked] = None
        nodes = tuple(urls)
    else:
        if node_urls:
            raise InvalidArgument(f"{prefix}.node_urls is only for provider vllm, not {checked_provider.value}")
        nodes = ()
    if priority < 0:
        raise InvalidArgument(f"{prefix}.priority must not be negative")
    validate_azure_deployment(checked_provider, api_version, deployment, prefix=prefix)
    served = _validate_endpoints(endpoints, field=f"{prefix}.endpoints")
    if "messages" in served and checked_provider is not Provider.ANTHROPIC:
        # Anthropic's own Messages API: no other provider speaks it.
        raise InvalidArgument(
            f"{prefix}.endpoints: messages is only for provider anthropic, not {checked_provider.value}"
        )
    return RouteTarget(
        provider=checked_provider,
        upstream_model=model,
        priority=priority,
        weight=validate_weight(weight, field=f"{prefix}.weight"),
        node_urls=nodes,
        api_version=api_version,
        deployment=deployment,
        endpoints=served,
    )


# An Azure api-version ("2024-10-21", "2025-04-01-preview") and deployment name
# ("gpt-4o-prod", letters, digits, '-', '_', '.'): both go into the request URL
# as they are, so nothing that would need escaping is accepted.
_API_VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(-[a-z0-9]+)?")
_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_azure_deployment(provider: Provider, api_version: str, deployment: str, *, prefix: str) -> None:
    """A target's Azure classic-deployment fields: Azure OpenAI only, well formed,
    and a deployment only together with an api-version."""
    if not api_version and not deployment:
        return
    if provider is not Provider.AZURE_OPENAI:
        which = "api_version" if api_version else "deployment"
        raise InvalidArgument(f"{prefix}.{which} is only for provider azure_openai, not {provider.value}")
    if not api_version:
        raise InvalidArgument(f"{prefix}.deployment needs an api_version (classic deployments only)")
    if not _API_VERSION.fullmatch(api_version):
        raise InvalidArgument(f"{prefix}.api_version must look like 2024-10-21 or 2025-04-01-preview")
    if deployment and not _DEPLOYMENT.fullmatch(deployment):
        raise InvalidArgument(
            f"{prefix}.deployment must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )


def _validate_endpoints(endpoints: Sequence[str | None], *, field: str) -> tuple[str, ...]:
    """Known endpoint names, each once, in the order given (None: a value this build does not know)."""
    known = convert.endpoint_names()
    out: dict[str, None] = {}
    for index, name in enumerate(endpoints):
        if name is None or name not in known:
            raise InvalidArgument(f"{field}[{index}] is not a known endpoint; one of: {', '.join(known)}")
        out[name] = None
    return tuple(out)


def validate_route_targets(targets: Sequence[RouteTarget]) -> tuple[RouteTarget, ...]:
    """At least one target (each already checked by ``validate_route_target``)."""
    if not targets:
        raise InvalidArgument("targets: a route needs at least one target")
    return tuple(targets)
