"""Open-loop load through sidecars for the limits tests, counted per window.

Windows are scaled down (``--limits-window 6``: a limit of 1200 requests per
minute counts as 120 per 6 s) so that each test runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import limits_pb2 as lpb
from tests.e2e.fleet import MODEL, Fleet

__all__ = ["CP_FLAGS", "PER_MINUTE", "PER_WINDOW", "WINDOW_MS", "PacedLoad", "limit_client_key", "next_window"]

WINDOW_MS = 6000
PER_MINUTE = 1200
PER_WINDOW = PER_MINUTE * WINDOW_MS // 60_000  # 120
CP_FLAGS = ("--limits-window", "6", "--limits-rebalance-interval", "1")


@dataclass
class PacedLoad:
    """Open-loop load: ``rate`` requests a second to one sidecar, each sent on
    time whether or not the last one was answered; (send unix ms, status)."""

    url: str
    token: str
    rate: float
    answers: list[tuple[int, int]] = field(default_factory=list)
    refusals: list[httpx.Response] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # of the answers admitted
    errors: list[str] = field(default_factory=list)

    async def run(self, until: float) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {self.token}"}
        pending: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=15.0, limits=httpx.Limits(max_connections=64)) as client:

            async def one() -> None:
                sent_ms = time.time_ns() // 1_000_000
                try:
                    resp = await client.post(f"{self.url}/chat/completions", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.answers.append((sent_ms, resp.status_code))
                if resp.status_code == 200:
                    self.bodies.append(resp.content)
                if resp.status_code == 429 and len(self.refusals) < 5:
                    self.refusals.append(resp)

            interval = 1.0 / self.rate
            next_at = time.monotonic()
            while time.monotonic() < until:
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if pending:
                await asyncio.gather(*pending)

    def admitted_by_window(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for sent_ms, status in self.answers:
            if status == 200:
                w = sent_ms - sent_ms % WINDOW_MS
                out[w] = out.get(w, 0) + 1
        return out


def next_window(seconds: float) -> tuple[float, int]:
    """The first window starting at least ``seconds`` from now: (seconds to it, its start in unix ms)."""
    now_ms = time.time_ns() // 1_000_000
    target = now_ms + int(seconds * 1000)
    start = target - target % WINDOW_MS + WINDOW_MS
    return (start - now_ms) / 1000, start


async def limit_client_key(fleet: Fleet, **limits: int) -> str:
    """Set ``limits`` (fields of ``Limits``) on tenant acme's one client key; its id."""
    channel, admin = await fleet.admin()
    try:
        request = apb.ListClientKeysRequest(tenant="acme")
        [client_key] = (await admin.ListClientKeys(request, metadata=fleet.admin_md)).client_keys
        limit_set = lpb.Limits(tenant="acme", client_key_id=client_key.id)
        for name, value in limits.items():
            setattr(limit_set, name, value)
        await admin.SetLimits(lpb.SetLimitsRequest(limits=limit_set), metadata=fleet.admin_md)
    finally:
        await channel.close(None)
    return str(client_key.id)
