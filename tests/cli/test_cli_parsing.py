from __future__ import annotations

import argparse
from collections.abc import Iterator

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


def test_azure_target_spec() -> None:
    classic = _target("azure_openai:gpt-4o@1*2?api-version=2024-10-21&deployment=gpt4o-prod")
    assert (classic.upstream_model, classic.priority, classic.weight) == ("gpt-4o", 1, 2)
    assert (classic.api_version, classic.deployment) == ("2024-10-21", "gpt4o-prod")
    v1 = _target("azure_openai:gpt-4o")
    assert (v1.api_version, v1.deployment) == ("", "")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch:model", "unknown provider 'nosuch'"),
        ("openai", "must look like"),
        ("openai:m@x", "priority"),
        ("azure_openai:m?version=1", "api-version=V"),
        ("azure_openai:m?api-version=1&api-version=2", "twice"),
    ],
)
def test_bad_target_spec_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _target(spec)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


# Options whose name speaks of a secret but whose value is not one: the name
# of a variable, or a file that holds it.
_NOT_A_SECRET = {"--secret-env", "--secret-stdin", "--no-secret", "--admin-token-file", "--token-file"}
_SECRET_WORDS = ("secret", "token", "password", "api-key", "apikey", "master-key")


def test_no_command_takes_a_secret_as_an_argument() -> None:
    """Secrets on a command line land in shell history and ``ps``: no option
    of any command takes one as its value (files and variable names only)."""
    offending: list[str] = []
    checked = 0
    for prog, parser in _parsers(build_parser({})):
        for action in parser._actions:
            for option in action.option_strings:
                if not any(word in option for word in _SECRET_WORDS):
                    continue
                checked += 1
                takes_value = action.nargs != 0
                is_path = action.type is not None and getattr(action.type, "__name__", "") == "Path"
                if takes_value and option not in _NOT_A_SECRET and not is_path and not option.endswith("-file"):
                    offending.append(f"{prog} {option}")
    assert checked > 10  # the walk reached the commands that handle secrets
    assert offending == []


def test_a_secret_given_as_an_option_is_refused() -> None:
    parser = build_parser({})
    for argv in (
        ["keys", "add", "-t", "a", "-p", "openai", "-l", "x", "--secret", "sk-1"],
        ["keys", "add", "-t", "a", "-p", "openai", "-l", "x", "--secret-value", "sk-1"],
        ["keys", "rotate", "-t", "a", "pk_1", "--new-secret", "sk-1"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
