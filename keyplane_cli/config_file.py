"""Declarative config files: YAML (or JSON) read, checked against the JSON
Schema that ships with the package (``schema/keyplane.schema.json``), and
turned into the specs ``config_plan`` plans with.

Secrets are never in the file, only references to them (``{env: VAR}`` or
``{file: PATH}``, a relative path being relative to the file); they are read
here and never appear in errors. Errors name their place in the file:
``tenants[0].keys[1].provider: 'nosuch' is not one of [...]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from keyplane_cli.config_limits import LimitsSpec
from keyplane_cli.config_plan import KeySpec, PriceSpec, RouteSpec, TargetSpec, TenantSpec
from keyplane_cli.targets import split_azure_suffix

__all__ = ["ConfigError", "load_config", "parse_config", "schema"]

SECRET_HINT = "must be a reference, {env: VAR} or {file: PATH}; a literal secret is not allowed in the file"


class ConfigError(Exception):
    """The file is unreadable or invalid: one line per problem, each naming its place."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@cache
def schema() -> dict[str, Any]:
    text = resources.files("keyplane_cli").joinpath("schema/keyplane.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _where(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    if "secret" in path:
        return f"{_where(path[: path.index('secret') + 1])}: {SECRET_HINT}"
    if error.context:
        # oneOf: say why the alternative of the value's own type failed.
        fitting = [e for e in error.context if not (e.validator == "type" and not e.relative_path)]
        best = jsonschema.exceptions.best_match(fitting)
        if best is not None:
            return _message(best)
    message = error.message
    if isinstance(error.instance, dict | list) and error.instance:
        # Never echo a whole mapping or list: it may hold something secret-looking.
        kind = "a mapping" if isinstance(error.instance, dict) else "a list"
        message = message.replace(repr(error.instance), kind)
    return f"{_where(path)}: {message}"


def _validate(document: Any) -> None:
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError(list(dict.fromkeys(_message(e) for e in errors)))


def _target(value: str | Mapping[str, Any]) -> TargetSpec:
    if isinstance(value, Mapping):
        return TargetSpec(
            provider=value["provider"],
            model=value["model"],
            priority=value.get("priority", 0),
            weight=value.get("weight", 1),
            node_urls=tuple(dict.fromkeys(u.rstrip("/") for u in value.get("node_urls", ()))),
            endpoints=tuple(dict.fromkeys(value.get("endpoints", ()))),
            api_version=value.get("api_version", ""),
            deployment=value.get("deployment", ""),
        )
    try:
        spec, api_version, deployment = split_azure_suffix(value)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    nodes = ""
    if "=" in spec:
        spec, nodes = spec.split("=", 1)
    endpoints: tuple[str, ...] = ()
    if "+" in spec:
        spec, endpoint_text = spec.rsplit("+", 1)
        endpoints = tuple(dict.fromkeys(e for e in endpoint_text.split(",") if e))
    weight = 1
    if "*" in spec:
        spec, weight_text = spec.rsplit("*", 1)
        weight = int(weight_text)
    priority = 0
    if "@" in spec:
        spec, priority_text = spec.rsplit("@", 1)
        priority = int(priority_text)
    provider, _, model = spec.partition(":")
    node_urls = tuple(dict.fromkeys(n.rstrip("/") for n in nodes.split(",") if n))
    return TargetSpec(
        provider=provider,
        model=model,
        priority=priority,
        weight=weight,
        node_urls=node_urls,
        endpoints=endpoints,
        api_version=api_version,
        deployment=deployment,
    )


def _read_secret(ref: Mapping[str, str], where: str, base: Path, environ: Mapping[str, str]) -> tuple[str, str]:
    if "env" in ref:
        name = ref["env"]
        value = environ.get(name)
        if value is None:
            raise ConfigError([f"{where}: environment variable {name} is not set"])
        source = f"env:{name}"
    else:
        path = base / ref["file"]
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{where}: cannot read {path}: {type(exc).__name__}"]) from None
        source = f"file:{ref['file']}"
    value = value.strip()
    if not value:
        raise ConfigError([f"{where}: {source} is empty"])
    return value, source


def _unique(items: Sequence[str], where: Callable[[int], str], what: str) -> list[str]:
    seen: set[str] = set()
    problems = []
    for index, item in enumerate(items):
        if item in seen:
            problems.append(f"{where(index)}: {what} {item!r} is named twice")
        seen.add(item)
    return problems


def _tenant(index: int, raw: Mapping[str, Any], base: Path, environ: Mapping[str, str]) -> TenantSpec:
    at = f"tenants[{index}]"
    keys: list[KeySpec] = []
    for k, key in enumerate(raw.get("keys", [])):
        secret, source = None, ""
        if "secret" in key:
            secret, source = _read_secret(key["secret"], f"{at}.keys[{k}].secret", base, environ)
        keys.append(
            KeySpec(
                provider=key["provider"],
                label=key["label"],
                base_url=key.get("base_url", "").rstrip("/"),
                weight=key.get("weight", 1),
                allowed_models=tuple(dict.fromkeys(key.get("allowed_models", ()))),
                status=key.get("status", "active"),
                secret=secret,
                secret_ref=source,
            )
        )
    routes = [RouteSpec(r["model"], tuple(_target(t) for t in r["targets"])) for r in raw.get("routes", [])]
    client_keys = [c if isinstance(c, str) else c["label"] for c in raw.get("client_keys", [])]
    limits = [("", _limits(f"{at}.limits", raw["limits"]))] if "limits" in raw else []
    limits += [
        (c["label"], _limits(f"{at}.client_keys[{i}].limits", c["limits"]))
        for i, c in enumerate(raw.get("client_keys", []))
        if isinstance(c, dict) and "limits" in c
    ]
    prices = [_price(f"{at}.prices[{i}]", p) for i, p in enumerate(raw.get("prices", []))]
    problems = _unique([k.label for k in keys], lambda i: f"{at}.keys[{i}].label", "key label")
    problems += _unique([r.model for r in routes], lambda i: f"{at}.routes[{i}].model", "route model")
    problems += _unique(client_keys, lambda i: f"{at}.client_keys[{i}]", "client key label")
    problems += _unique(
        [f"{p.provider}:{p.model}" for p in prices], lambda i: f"{at}.prices[{i}]", "price (provider:model)"
    )
    if problems:
        raise ConfigError(problems)
    return TenantSpec(raw["name"], tuple(keys), tuple(routes), tuple(client_keys), tuple(prices), tuple(limits))


def _limits(where: str, raw: Mapping[str, Any]) -> LimitsSpec:
    return LimitsSpec(
        requests_per_minute=int(raw.get("requests_per_minute", 0)),
        tokens_per_minute=int(raw.get("tokens_per_minute", 0)),
        daily_budget_micros=_micros(raw.get("daily_budget", 0), f"{where}.daily_budget"),
        monthly_budget_micros=_micros(raw.get("monthly_budget", 0), f"{where}.monthly_budget"),
    )


def _micros(value: float, where: str) -> int:
    """Dollars per million tokens as micro-dollars per million (exact to 6 decimals)."""
    micros = Decimal(str(value)) * 1_000_000
    if micros != micros.to_integral_value():
        raise ConfigError([f"{where}: at most 6 decimals (micro-dollars)"])
    return int(micros)


def _price(where: str, raw: Mapping[str, Any]) -> PriceSpec:
    input_ = _micros(raw["input"], f"{where}.input")
    cached = _micros(raw["cached_input"], f"{where}.cached_input") if "cached_input" in raw else input_
    return PriceSpec(raw["provider"], raw["model"], input_, cached, _micros(raw["output"], f"{where}.output"))


def parse_config(document: Any, *, base: Path, environ: Mapping[str, str]) -> list[TenantSpec]:
    """A loaded document, checked, with its secret references read."""
    _validate(document)
    tenants = [_tenant(i, raw, base, environ) for i, raw in enumerate(document["tenants"])]
    problems = _unique([t.name for t in tenants], lambda i: f"tenants[{i}].name", "tenant")
    if problems:
        raise ConfigError(problems)
    return tenants


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> list[TenantSpec]:
    """Read ``path`` (``-``: stdin is not supported; secrets come from the environment or files)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {getattr(exc, 'strerror', None) or type(exc).__name__}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError([f"{path}:{where}: {problem}"]) from None
    return parse_config(document, base=path.parent, environ=os.environ if environ is None else environ)
