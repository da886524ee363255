"""The Azure suffix of the CLI's (and the config file's) target syntax.

``azure_openai:gpt-4o?api-version=2024-10-21&deployment=gpt4o-prod`` names a
classic Azure OpenAI deployment: the api-version and deployment of the
target, in the shape they take in the request URL. Pure; the control plane
validates the values.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["AZURE_SUFFIX_HELP", "split_azure_suffix"]

AZURE_SUFFIX_HELP = "?api-version=V[&deployment=NAME]"
_FIELDS = {"api-version": "api_version", "deployment": "deployment"}


def split_azure_suffix(spec: str) -> tuple[str, str, str]:
    """``(spec without the suffix, api_version, deployment)``; ValueError if malformed."""
    if "?" not in spec:
        return spec, "", ""
    spec, query = spec.split("?", 1)
    found: dict[str, str] = {}
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if not sep or name not in _FIELDS or not value:
            raise ValueError(f"target suffix must look like {AZURE_SUFFIX_HELP}, got {'?' + query!r}")
        if _FIELDS[name] in found:
            raise ValueError(f"target suffix names {name} twice")
        found[_FIELDS[name]] = urllib.parse.unquote(value)
    return spec, found.get("api_version", ""), found.get("deployment", "")
