"""A real, local OpenAI-compatible upstream for tests (aiohttp.web on 127.0.0.1).

It records every request, answers chat completions in OpenAI's JSON shape,
streams with OpenAI's SSE framing, and can be programmed per secret (and per
model) to answer with a canned status, headers and body -- the providers'
real error bodies are provided -- or with a stream that breaks mid-way.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.health import bodies as _bodies

from .openai_endpoints import ENDPOINTS, EndpointState, stored_call, stored_response

__all__ = [
    "ANTHROPIC_OVERLOADED",
    "BROKEN_STREAM",
    "COMPLETION",
    "CONTEXT_LENGTH_EXCEEDED",
    "EXHAUSTED_REPLIES",
    "GEMINI_INVALID_API_KEY",
    "INVALID_API_KEY",
    "RATE_LIMITED",
    "SERVER_ERROR",
    "SERVICE_UNAVAILABLE",
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "rate_limited",
]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    # Lower-case names.
    headers: dict[str, str]
    json: Any
    # Monotonic time the request arrived.
    at: float = 0.0
    # The URL's query string, as sent.
    query: str = ""

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict) and isinstance(self.json.get("model"), str):
            return str(self.json["model"])
        return None

    @property
    def secret(self) -> str | None:
        """The credential the upstream saw: a bearer token or an Azure api-key."""
        auth = self.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:]
        return self.headers.get("api-key")


@dataclass(frozen=True)
class Reply:
    status: int
    # Any JSON value; None means a normal completion (streamed when asked for).
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to wait before answering (to provoke read timeouts).
    delay: float = 0.0
    # For a normal completion: drop the connection after this many streamed content chunks.
    break_after: int | None = None


@dataclass
class _Rule:
    secret: str
    model: str | None
    reply: Reply
    # None: for ever.
    remaining: int | None
    # Applies to this share of the matching requests (drawn from the upstream's seeded RNG).
    chance: float = 1.0


# A normal completion (the default for any secret).
COMPLETION = Reply(200, None)
# A completion whose stream is cut after two content chunks (non-streaming requests are answered whole).
BROKEN_STREAM = Reply(200, None, break_after=2)


# OpenAI's real bodies.
INVALID_API_KEY = Reply(
    401,
    {
        "error": {
            "message": "Incorrect API key provided: sk-bad***********1234. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    },
)
SERVER_ERROR = Reply(
    500,
    {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    },
)
RATE_LIMITED = Reply(
    429,
    {
        "error": {
            "message": "Rate limit reached for gpt-4o-mini in organization org-xyz on requests per min (RPM): "
            "Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    },
    {"retry-after": "20"},
)


# Gemini's OpenAI-compatible endpoint: an invalid key is a 400, the body a JSON list.
GEMINI_INVALID_API_KEY = Reply(
    400,
    [
        {
            "error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            }
        }
    ],
)
# OpenAI: the request itself is too long (a client error: nobody's fault but the app's).
CONTEXT_LENGTH_EXCEEDED = Reply(
    400,
    {
        "error": {
            "message": "This model's maximum context length is 128000 tokens. However, your messages resulted in "
            "130532 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
)
ANTHROPIC_OVERLOADED = Reply(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
SERVICE_UNAVAILABLE = Reply(
    503,
    {"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}},
)


# Out of credits or quota, each provider's real answer (bodies from tests/health/bodies.py,
# served as they were received: status, JSON shape and wording).
EXHAUSTED_REPLIES: dict[str, Reply] = {
    "openai-429-insufficient_quota": Reply(429, json.loads(_bodies.OPENAI_INSUFFICIENT_QUOTA)),
    "openai-400-billing_hard_limit": Reply(400, json.loads(_bodies.OPENAI_BILLING_HARD_LIMIT)),
    "anthropic-400-credit_balance": Reply(
        400, json.loads(_bodies.ANTHROPIC_CREDIT_BALANCE_TOO_LOW), {"request-id": "req_011CbrFTcXhtiMzr3s6EocF7"}
    ),
    "gemini-429-prepayment_depleted": Reply(429, json.loads(_bodies.GEMINI_PREPAYMENT_CREDITS_DEPLETED)),
    "azure-403-call_volume_quota": Reply(403, json.loads(_bodies.AZURE_OUT_OF_CALL_VOLUME_QUOTA)),
    "openrouter-402-insufficient_credits": Reply(402, json.loads(_bodies.OPENROUTER_INSUFFICIENT_CREDITS)),
    "together-402-credit_limit": Reply(402, json.loads(_bodies.TOGETHER_CREDIT_LIMIT_EXCEEDED)),
    "deepseek-402-insufficient_balance": Reply(402, json.loads(_bodies.DEEPSEEK_INSUFFICIENT_BALANCE)),
    "xai-429-credits_used_up": Reply(429, json.loads(_bodies.XAI_CREDITS_USED_UP)),
}


def rate_limited(retry_after: float | None) -> Reply:
    """OpenAI's 429, with ``Retry-After`` (seconds) when given."""
    headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
    return Reply(429, RATE_LIMITED.body, headers)


class FakeUpstream:
    """``async with FakeUpstream() as up:`` then point keys at ``up.base_url``."""

    def __init__(
        self,
        *,
        chunks: Sequence[str] = ("Hello", " from", " the", " fake", " upstream", "!"),
        chunk_delay: float = 0.0,
        replies: dict[str, Reply] | None = None,
    ) -> None:
        self.chunks = tuple(chunks)
        self.chunk_delay = chunk_delay
        # secret -> canned reply; anything else gets a normal completion
        # (rules set with ``program`` take precedence).
        self.replies: dict[str, Reply] = dict(replies or {})
        self._rules: list[_Rule] = []
        self._rng = random.Random(12)
        self.requests: list[RecordedRequest] = []
        # When set, a stream sends its first chunk then waits for this gate.
        self.stream_gate: asyncio.Event | None = None
        # When set, a stream drops the connection after this many content chunks.
        self.break_after: int | None = None
        self.first_chunk_sent = asyncio.Event()
        self.stream_finished = asyncio.Event()
        self.stream_aborted = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        # The other OpenAI endpoints' memory (stored responses).
        self.endpoint_state = EndpointState()
        # Whether a stream honours ``stream_options.include_usage`` (OpenAI does: a
        # ``"usage":null`` member on every chunk, then a usage chunk with no choices
        # before ``[DONE]``); False plays a provider that ignores it.
        self.stream_usage = True
        # Prompt tokens the fake reports, and of them cached (prompt_tokens_details).
        self.prompt_tokens = 9
        self.cached_tokens = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def requests_to(self, suffix: str) -> list[RecordedRequest]:
        """The requests whose path ends with ``suffix`` ("/embeddings")."""
        return [r for r in self.requests if r.path.endswith(suffix)]

    def secrets(self, since: int = 0, *, model: str | None = None) -> list[str | None]:
        """The credentials of the chat requests from index ``since`` on (optionally one model's)."""
        return [r.secret for r in self.chat_requests()[since:] if model is None or r.model == model]

    def program(self, secret: str, reply: Reply, *, model: str | None = None, times: int | None = None) -> None:
        """Answer ``secret``'s requests (only those for ``model`` when given) with ``reply``,
        ``times`` times or for ever. The newest matching rule wins; ``COMPLETION`` restores
        normal answers."""
        self._rules.insert(0, _Rule(secret, model, reply, times))

    def flaky(self, secret: str, reply: Reply, chance: float, *, seed: int | None = None) -> None:
        """Answer ``chance`` of ``secret``'s requests (at random) with ``reply``, the rest normally."""
        if seed is not None:
            self._rng.seed(seed)
        self._rules.insert(0, _Rule(secret, None, reply, None, chance))

    def reset(self, secret: str | None = None) -> None:
        """Forget the programmed replies (of one secret, or all)."""
        self._rules = [r for r in self._rules if secret is not None and r.secret != secret]
        if secret is None:
            self.replies.clear()
        else:
            self.replies.pop(secret, None)

    def _reply_for(self, secret: str, model: str | None) -> Reply | None:
        for rule in self._rules:
            if rule.secret != secret or (rule.model is not None and rule.model != model):
                continue
            if rule.chance < 1.0 and self._rng.random() >= rule.chance:
                continue
            if rule.remaining is not None:
                if rule.remaining <= 0:
                    continue
                rule.remaining -= 1
            return rule.reply
        return self.replies.get(secret)

    async def __aenter__(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # uploads (audio) too
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body: Any
        if request.content_type == "multipart/form-data":
            # A form's fields as strings; a file as the bytes it held.
            form = await request.post()
            body = {k: (v if isinstance(v, str | bytes) else _form_bytes(v)) for k, v in form.items()}
        else:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            json=body,
            at=time.monotonic(),
            query=request.rel_url.raw_query_string,
        )
        self.requests.append(recorded)
        other = next((h for suffix, h in ENDPOINTS.items() if request.path.endswith(suffix)), None)
        stored = stored_call(request.path)
        if stored is None and (
            request.method != "POST" or (other is None and not request.path.endswith("/chat/completions"))
        ):
            return _json(
                404, {"error": {"message": "Not found", "type": "invalid_request_error", "param": None, "code": None}}
            )
        canned = self._reply_for(recorded.secret or "", recorded.model)
        break_after = self.break_after
        if canned is not None:
            if canned.delay:
                await asyncio.sleep(canned.delay)
            if canned.body is not None:
                return _json(canned.status, canned.body, canned.headers)
            if canned.break_after is not None:
                break_after = canned.break_after
        if stored is not None:
            return await stored_response(request, stored, recorded.secret or "", self.endpoint_state)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _json(
                400,
                {
                    "error": {
                        "message": "you must provide a model parameter",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        if other is not None and not request.path.endswith("/chat/completions"):
            return await other(request, body, recorded.secret or "", self.endpoint_state)
        if body.get("stream") is True:
            return await self._stream(request, body, break_after)
        return _json(200, self._completion(body))

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self.chunks)
        return {
            "id": "chatcmpl-fake0001",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object, as its API sends it (CompletionUsage with its details)."""
        completion = len(self.chunks)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _chunk(self, model: str, delta: dict[str, Any] | None, finish_reason: str | None, usage: object = ...) -> bytes:
        payload: dict[str, Any] = {
            "id": "chatcmpl-fake0001",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if delta is not None
            else [],
        }
        if usage is not ...:
            payload["usage"] = usage
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    async def _stream(self, request: web.Request, body: dict[str, Any], break_after: int | None) -> web.StreamResponse:
        model: str = body["model"]
        options = body.get("stream_options")
        with_usage = self.stream_usage and isinstance(options, dict) and options.get("include_usage") is True
        usage: object = None if with_usage else ...
        response = web.StreamResponse(
            status=200,
            headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"},
        )
        await response.prepare(request)
        try:
            await response.write(self._chunk(model, {"role": "assistant", "content": "", "refusal": None}, None, usage))
            for index, text in enumerate(self.chunks):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                await response.write(self._chunk(model, {"content": text}, None, usage))
                if break_after is not None and index + 1 >= break_after:
                    assert request.transport is not None
                    request.transport.abort()
                    self.stream_aborted.set()
                    return response
                if index == 0:
                    self.first_chunk_sent.set()
                    if self.stream_gate is not None:
                        await self.stream_gate.wait()
            await response.write(self._chunk(model, {}, "stop", usage))
            if with_usage:
                await response.write(self._chunk(model, None, None, self.usage()))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_aborted.set()
            raise
        self.stream_finished.set()
        return response


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers or {},
    )


def _form_bytes(value: object) -> bytes:
    """A form part's bytes (a file field's content)."""
    if isinstance(value, bytearray):
        return bytes(value)
    read = value.file.read() if isinstance(value, web.FileField) else b""
    return bytes(read)
