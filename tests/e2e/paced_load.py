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
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import usage_pb2 as upb
from tests.e2e.fleet import MODEL, Fleet

__all__ = [
    "CP_FLAGS",
    "PER_MINUTE",
    "PER_WINDOW",
    "WINDOW_MS",
    "Measured",
    "PacedLoad",
    "limit_client_key",
    "next_window",
    "price_per_token",
    "three_times_the_limit",
]

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


async def price_per_token(fleet: Fleet) -> None:
    """Price the fake provider's model for acme: $1 per million input tokens,
    $2 per million output (1 and 2 micro-dollars a token)."""
    price = upb.Price(
        tenant="acme",
        provider=rpb.PROVIDER_OPENAI_COMPATIBLE,
        model="upstream-m",
        input_micros_per_million=1_000_000,
        cached_input_micros_per_million=1_000_000,
        output_micros_per_million=2_000_000,
    )
    channel, admin = await fleet.admin()
    try:
        await admin.SetPrice(apb.SetPriceRequest(price=price), metadata=fleet.admin_md)
    finally:
        await channel.close(None)


@dataclass
class Measured:
    """What a run of ``three_times_the_limit`` admitted, per measured window."""

    per_window: list[int]  # in all
    asked: list[int]  # in all
    per_sidecar: list[list[int]]  # admitted, per sidecar, per window
    loads: list[PacedLoad]


async def three_times_the_limit(ports: list[int], token: str, measured: int = 3) -> Measured:
    """Ask the sidecars on ``ports`` three times PER_WINDOW in all, evenly:
    one window to learn the demand, then ``measured`` windows counted."""
    rate = 3 * PER_WINDOW / (WINDOW_MS / 1000) / len(ports)
    loads = [PacedLoad(f"http://127.0.0.1:{port}/v1", token, rate) for port in ports]
    warmup, first_measured_ms = next_window(2.0)
    until = time.monotonic() + warmup + measured * WINDOW_MS / 1000 + 0.05
    await asyncio.gather(*(load.run(until) for load in loads))
    for load in loads:
        assert not load.errors, load.errors[:3]
        assert {s for _, s in load.answers} <= {200, 429}
    windows = [first_measured_ms + i * WINDOW_MS for i in range(measured)]
    per_sidecar = [[load.admitted_by_window().get(w, 0) for w in windows] for load in loads]
    asked = [sum(1 for load in loads for t, _ in load.answers if w <= t < w + WINDOW_MS) for w in windows]
    assert all(a >= 2.5 * PER_WINDOW for a in asked), asked
    per_window = [sum(column) for column in zip(*per_sidecar, strict=True)]
    return Measured(per_window, asked, per_sidecar, loads)
