"""A fake Azure OpenAI resource (a real aiohttp server) for both of its API shapes.

- the v1 API: ``POST /openai/v1/chat/completions`` (no api-version needed);
- classic deployments: ``POST /openai/deployments/{deployment}/chat/completions
  ?api-version=...``; a missing api-version or unknown deployment gets Azure's
  404s, an api-version the resource does not speak a 404 too.

Other endpoints the same way (``/embeddings`` in place of ``/chat/completions``).

Both want the key in the ``api-key`` header (or ``Authorization: Bearer``);
without one Azure answers 401. The completions themselves are
``FakeUpstream``'s (OpenAI's shapes, which Azure speaks), and replies can be
programmed per secret the same way; Azure's real error bodies are below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from .upstream import FakeUpstream, Reply, _json

__all__ = [
    "AZURE_CONTENT_FILTER",
    "AZURE_INVALID_KEY",
    "AZURE_RATE_LIMITED",
    "AzureCall",
    "FakeAzure",
]

# 401 for a wrong key (or a key of another resource).
AZURE_INVALID_KEY = Reply(
    401,
    {
        "error": {
            "code": "401",
            "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
            "a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        }
    },
)
# 429 over the deployment's token rate limit, with Retry-After.
AZURE_RATE_LIMITED = Reply(
    429,
    {
        "error": {
            "code": "429",
            "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
            "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. "
            "Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default "
            "rate limit.",
        }
    },
    {"retry-after": "6", "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"},
)
# 400 when the prompt trips the content filter: the app's problem, never a key's.
AZURE_CONTENT_FILTER = Reply(
    400,
    {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
            "policy. Please modify your prompt and retry. To learn more about our content filtering policies please "
            "read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "hate": {"filtered": False, "severity": "safe"},
                    "jailbreak": {"filtered": False, "detected": False},
                    "self_harm": {"filtered": False, "severity": "safe"},
                    "sexual": {"filtered": False, "severity": "safe"},
                    "violence": {"filtered": True, "severity": "medium"},
                },
            },
        }
    },
)
_MISSING_KEY = {
    "error": {
        "code": "401",
        "message": "Access denied due to missing subscription key. Make sure to include subscription key when "
        "making requests to an API.",
    }
}
_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}
_DEPLOYMENT_NOT_FOUND = {
    "error": {
        "code": "DeploymentNotFound",
        "message": "The API deployment for this resource does not exist. If you created the deployment within the "
        "last 5 minutes, please wait a moment and try again.",
    }
}
# Any OpenAI endpoint under a deployment (or the v1 API): /chat/completions, /embeddings, ...
_DEPLOYMENT_PATH = re.compile(r"/openai/deployments/([^/]+)(/[a-z/_]+)")


@dataclass(frozen=True)
class AzureCall:
    """What the resource saw of one call (besides ``requests``)."""

    shape: str  # "v1" or "deployment" (or "unknown")
    path: str
    api_version: str | None
    api_key: str | None
    authorization: str | None


class FakeAzure(FakeUpstream):
    """``async with FakeAzure(deployments={"gpt4o-prod"}) as az:``; keys point at ``az.url``."""

    def __init__(
        self,
        *,
        deployments: Iterable[str] = (),
        api_versions: Iterable[str] = ("2024-10-21", "2025-04-01-preview"),
        replies: dict[str, Reply] | None = None,
    ) -> None:
        super().__init__(replies=replies)
        self.deployments = frozenset(deployments)
        self.api_versions = frozenset(api_versions)
        self.calls: list[AzureCall] = []

    async def __aenter__(self) -> FakeAzure:
        await super().__aenter__()
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        match = _DEPLOYMENT_PATH.fullmatch(path)
        shape = "v1" if path.startswith("/openai/v1/") else "deployment" if match else "unknown"
        api_version = request.query.get("api-version")
        call = AzureCall(shape, path, api_version, request.headers.get("api-key"), request.headers.get("authorization"))
        self.calls.append(call)
        if call.api_key is None and not (call.authorization or "").lower().startswith("bearer "):
            return _json(401, _MISSING_KEY)
        if shape == "unknown":
            return _json(404, _NOT_FOUND)
        if shape == "deployment":
            assert match is not None
            if api_version is None or api_version not in self.api_versions:
                return _json(404, _NOT_FOUND)
            if match.group(1) not in self.deployments:
                return _json(404, _DEPLOYMENT_NOT_FOUND)
        return await super()._handle(request)
