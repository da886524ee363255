from __future__ import annotations

import argparse

import pytest

from keyplane.v1 import resources_pb2
from keyplane_cli import build_parser
from keyplane_cli.admin import _target


@pytest.mark.parametrize(
    ("spec", "provider", "model", "priority", "weight", "nodes"),
    [
        ("openai:gpt-4o", "PROVIDER_OPENAI", "gpt-4o", 0, 1, []),
        ("anthropic:claude-sonnet-4@1", "PROVIDER_ANTHROPIC", "claude-sonnet-4", 1, 1, []),
        ("gemini:gemini-2.5-flash@2*5", "PROVIDER_GEMINI", "gemini-2.5-flash", 2, 5, []),
        (
            "vllm:llama@0=http://n1:8000/v1,http://n2:8000/v1",
            "PROVIDER_VLLM",
            "llama",
            0,
            1,
            ["http://n1:8000/v1", "http://n2:8000/v1"],
        ),
        ("openai_compatible:org/model:free", "PROVIDER_OPENAI_COMPATIBLE", "org/model:free", 0, 1, []),
    ],
)
def test_target_spec(spec: str, provider: str, model: str, priority: int, weight: int, nodes: list[str]) -> None:
    target = _target(spec)
    assert resources_pb2.Provider.Name(target.provider) == provider
    assert (target.upstream_model, target.priority, target.weight, list(target.node_urls)) == (
        model,
        priority,
        weight,
        nodes,
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nosuch:model", "unknown provider 'nosuch'"), ("openai", "must look like"), ("openai:m@x", "priority")],
)
def test_bad_target_spec_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _target(spec)


def test_secret_is_never_a_command_line_argument() -> None:
    parser = build_parser({})
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "add", "-t", "a", "-p", "openai", "-l", "x", "--secret", "sk-1"])
