"""Config files: the shipped JSON Schema, errors naming their place in the
file, secrets only by reference and never echoed."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from keyplane.domain import Provider
from keyplane_cli.config_file import ConfigError, load_config, parse_config, schema
from keyplane_cli.config_plan import KeySpec, RouteSpec, TargetSpec, TenantSpec

SECRET = "sk-file-0123456789abcdef"


def _problems(document: Any, environ: dict[str, str] | None = None, base: Path = Path("/")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(document, base=base, environ=environ or {})
    return info.value.problems


def _doc(**key: Any) -> dict[str, Any]:
    return {"tenants": [{"name": "acme", "keys": [{"provider": "openai", "label": "main", **key}]}]}


def test_the_schema_ships_with_the_package_and_is_a_valid_schema() -> None:
    text = resources.files("keyplane_cli").joinpath("schema/keyplane.schema.json").read_text(encoding="utf-8")
    assert json.loads(text) == schema()
    jsonschema.Draft202012Validator.check_schema(schema())
    # The provider enum is the domain's.
    assert set(schema()["$defs"]["provider"]["enum"]) == {p.value for p in Provider}
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"keyplane_cli" = ["schema/*.json"]' in pyproject


def test_a_full_file_parses_with_references_read(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "anthropic").write_text("sk-ant-0123456789abcdef\n")
    (tmp_path / "keyplane.yaml").write_text(
        """
version: 1
tenants:
  - name: acme
    keys:
      - {provider: openai, label: main, secret: {env: OPENAI_KEY}, weight: 3, allowed_models: [gpt-4o, gpt-4o]}
      - {provider: anthropic, label: claude, secret: {file: secrets/anthropic}, status: disabled}
      - {provider: openai_compatible, label: local, secret: {env: OPENAI_KEY}, base_url: "https://llm.test/v1/"}
      - {provider: vllm, label: nodes}
    routes:
      - model: chat
        targets:
          - openai:gpt-4o@1*5
          - {provider: anthropic, model: claude-3, priority: 2}
          - vllm:llama=http://10.0.0.1:8000/,http://10.0.0.2:8000
    client_keys: [app, {label: batch}]
  - name: empty
"""
    )
    tenants = load_config(tmp_path / "keyplane.yaml", {"OPENAI_KEY": SECRET + "\n"})
    acme = tenants[0]
    assert acme.keys == (
        KeySpec("openai", "main", "", 3, ("gpt-4o",), "active", SECRET, "env:OPENAI_KEY"),
        KeySpec("anthropic", "claude", "", 1, (), "disabled", "sk-ant-0123456789abcdef", "file:secrets/anthropic"),
        KeySpec("openai_compatible", "local", "https://llm.test/v1", 1, (), "active", SECRET, "env:OPENAI_KEY"),
        KeySpec("vllm", "nodes"),
    )
    assert acme.routes == (
        RouteSpec(
            "chat",
            (
                TargetSpec("openai", "gpt-4o", 1, 5),
                TargetSpec("anthropic", "claude-3", 2, 1),
                TargetSpec("vllm", "llama", 0, 1, ("http://10.0.0.1:8000", "http://10.0.0.2:8000")),
            ),
        ),
    )
    assert acme.client_keys == ("app", "batch")
    assert tenants[1] == TenantSpec("empty")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (_doc(provider="nosuch", secret={"env": "X"}), "tenants[0].keys[0].provider: 'nosuch' is not one of ["),
        (_doc(secret={"env": "X"}, weight=0), "tenants[0].keys[0].weight: 0 is less than the minimum of 1"),
        (_doc(secret={"env": "X"}, wieght=2), "tenants[0].keys[0]: Additional properties are not allowed ('wieght'"),
        (_doc(), "tenants[0].keys[0]: 'secret' is a required property"),
        (
            _doc(provider="azure_openai", secret={"env": "X"}),
            "tenants[0].keys[0]: 'base_url' is a required property",
        ),
        (_doc(secret={"env": "X"}, status="paused"), "tenants[0].keys[0].status: 'paused' is not one of"),
        ({"tenants": [{"name": "Acme!"}]}, "tenants[0].name: 'Acme!' does not match"),
        ({"tenant": []}, "(top level): 'tenants' is a required property"),
        (
            {"tenants": [{"name": "a", "routes": [{"model": "m", "targets": ["openai-gpt"]}]}]},
            "tenants[0].routes[0].targets[0]: 'openai-gpt' does not match",
        ),
        (
            {"tenants": [{"name": "a", "routes": [{"model": "m", "targets": [{"provider": "x", "model": "y"}]}]}]},
            "tenants[0].routes[0].targets[0].provider: 'x' is not one of",
        ),
        ({"tenants": [{"name": "a", "routes": [{"model": "m", "targets": []}]}]}, "targets: [] should be non-empty"),
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "tenants[1].name: tenant 'a' is named twice"),
        (
            {"tenants": [{"name": "a", "client_keys": ["x", {"label": "x"}]}]},
            "tenants[0].client_keys[1]: client key label 'x' is named twice",
        ),
    ],
)
def test_errors_name_their_place(document: Any, expected: str) -> None:
    problems = _problems(document)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "secret",
    [SECRET, {"value": SECRET}, {"env": "A", "file": "/x"}, [SECRET], {"env": SECRET + " x"}],
)
def test_literal_secrets_are_refused_and_never_echoed(secret: Any) -> None:
    problems = _problems(_doc(secret=secret))
    assert problems == [
        "tenants[0].keys[0].secret: must be a reference, {env: VAR} or {file: PATH}; "
        "a literal secret is not allowed in the file"
    ]


def test_a_whole_key_that_is_invalid_is_not_echoed() -> None:
    document = {"tenants": [{"name": "a", "keys": [[{"api_key": SECRET}]]}]}
    problems = _problems(document)
    assert problems == ["tenants[0].keys[0]: a list is not of type 'object'"]


def test_unresolvable_references_name_the_key(tmp_path: Path) -> None:
    unset = _problems(_doc(secret={"env": "NOPE"}))
    assert unset == ["tenants[0].keys[0].secret: environment variable NOPE is not set"]
    assert _problems(_doc(secret={"env": "E"}), {"E": " \n"}) == ["tenants[0].keys[0].secret: env:E is empty"]
    problems = _problems(_doc(secret={"file": "missing"}), base=tmp_path)
    assert problems == [f"tenants[0].keys[0].secret: cannot read {tmp_path / 'missing'}: FileNotFoundError"]


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text("tenants:\n  - name: a\n   bad: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems[0].startswith(f"{path}: line 3 column")


def test_the_readme_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Declarative config", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "anthropic").write_text("sk-ant-0123456789abcdef")
    (tmp_path / "keyplane.yaml").write_text(example)
    (acme,) = load_config(tmp_path / "keyplane.yaml", {"OPENAI_API_KEY": SECRET})
    assert [k.label for k in acme.keys] == ["main", "claude"]
    assert acme.routes[1].targets == (
        TargetSpec("vllm", "llama-3", node_urls=("http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1")),
    )
    assert acme.client_keys == ("web", "batch")


def test_azure_targets_carry_api_version_and_deployment() -> None:
    route = {
        "model": "chat",
        "targets": [
            "azure_openai:gpt-4o@1?api-version=2024-10-21&deployment=gpt4o-prod",
            {"provider": "azure_openai", "model": "gpt-4o-mini", "api_version": "2025-04-01-preview"},
            "azure_openai:gpt-4.1",
        ],
    }
    (acme,) = parse_config({"tenants": [{"name": "acme", "routes": [route]}]}, base=Path("/"), environ={})
    assert acme.routes[0].targets == (
        TargetSpec("azure_openai", "gpt-4o", priority=1, api_version="2024-10-21", deployment="gpt4o-prod"),
        TargetSpec("azure_openai", "gpt-4o-mini", api_version="2025-04-01-preview"),
        TargetSpec("azure_openai", "gpt-4.1"),
    )
    problems = _problems(
        {"tenants": [{"name": "a", "routes": [{"model": "m", "targets": ["azure_openai:m?version=1"]}]}]}
    )
    assert any("api-version=V" in p for p in problems), problems
    problems = _problems(
        {
            "tenants": [
                {
                    "name": "a",
                    "routes": [
                        {"model": "m", "targets": [{"provider": "azure_openai", "model": "m", "api_version": "v1"}]}
                    ],
                }
            ]
        }
    )
    assert any("api_version: 'v1' does not match" in p for p in problems), problems
