"""The fleet the endpoint tests run against: a sidecar, an openai upstream with keys o1
(picked first: heavier) and o2, an openai_compatible upstream with key c1; route
"everything" tries openai then openai_compatible, "chat-only" lists chat completions
only, "claude" is anthropic (chat completions only by default)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import openai

from keyplane.v1 import resources_pb2
from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from . import protos as p
from .conftest import CLIENT_TOKEN, TENANT, sidecar_config

__all__ = ["AUDIO", "COMPAT_MODEL", "MODEL", "UP_MODEL", "Fleet", "fleet_snapshot", "open_fleet"]

MODEL = "everything"
UP_MODEL = "up-model"
COMPAT_MODEL = "compat-model"
AUDIO = b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 64  # ~16 KB of "audio"


@dataclass(frozen=True)
class Fleet:
    sidecar: Sidecar
    first: FakeUpstream  # provider openai: keys o1 (picked first) and o2
    second: FakeUpstream  # provider openai_compatible: key c1

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=CLIENT_TOKEN, base_url=f"{self.sidecar.url}/v1", max_retries=0)


def fleet_snapshot(first: FakeUpstream, second: FakeUpstream, *, version: int = 10) -> Any:
    return p.snapshot(
        version,
        p.tenant_state(
            TENANT,
            keys=[
                p.pkey("o1", "sk-one", base_url=first.base_url, weight=100),
                p.pkey("o2", "sk-two", base_url=first.base_url, weight=1),
                p.pkey("c1", "sk-compat", provider=p.COMPATIBLE, base_url=second.base_url),
            ],
            routes=[
                p.route(
                    "r1",
                    MODEL,
                    p.target(UP_MODEL, priority=0),
                    p.target(COMPAT_MODEL, provider=p.COMPATIBLE, priority=1),
                ),
                p.route("r2", "chat-only", p.target(UP_MODEL, endpoints=[resources_pb2.ENDPOINT_CHAT_COMPLETIONS])),
                p.route("r3", "claude", p.target("claude-sonnet-4", provider=p.ANTHROPIC)),
            ],
            client_keys=[p.client_key("ck1", CLIENT_TOKEN)],
        ),
    )


@asynccontextmanager
async def open_fleet() -> AsyncIterator[Fleet]:
    async with FakeUpstream() as first, FakeUpstream() as second:
        async with Sidecar(sidecar_config(), watch=False) as sc:
            sc.state.apply(fleet_snapshot(first, second))
            yield Fleet(sc, first, second)
