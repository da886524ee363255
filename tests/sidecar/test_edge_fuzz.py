"""Fuzz the app-facing edge with a deterministic corpus of malformed requests over raw
sockets (tests/sidecar/edge_corpus.py): no 5xx, no hang, every answer with a body is
OpenAI-shaped JSON, the sidecar stays up, and nothing reaches the upstream."""

from __future__ import annotations

import asyncio
import json

import httpx

from sidecar.server import Sidecar
from tests.fakes.upstream import FakeUpstream

from .conftest import CLIENT_TOKEN, sidecar_config, standard_snapshot
from .edge_corpus import Case, corpus
from .rawhttp import Exchange, exchange

HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# Each case is answered or closed within this (the slowest wait for a timeout).
BOUND = max(HEAD_TIMEOUT, BODY_TIMEOUT) + 3.0


def problems(case: Case, got: Exchange) -> list[str]:
    found = []
    if got.timed_out:
        found.append(f"no answer and no close within {BOUND}s")
    if got.status is None:
        if not got.closed:
            found.append("neither answered nor closed")
        elif got.raw:
            found.append(f"closed after bytes that are no answer: {got.raw[:80]!r}")
        return found
    if not 400 <= got.status < 500:
        found.append(f"status {got.status}")
    if got.body:
        try:
            got.openai_error()
        except (AssertionError, ValueError) as exc:
            found.append(f"not OpenAI-shaped ({type(exc).__name__}): {got.body[:120]!r}")
    return [f"{case.name}: {p}" for p in found]


async def test_a_corpus_of_malformed_requests(upstream: FakeUpstream) -> None:
    cases = corpus(CLIENT_TOKEN)
    assert len(cases) >= 500
    config = sidecar_config(request_head_timeout=HEAD_TIMEOUT, request_body_timeout=BODY_TIMEOUT)
    async with Sidecar(config, watch=False) as sc:
        sc.state.apply(standard_snapshot(upstream))
        gate = asyncio.Semaphore(64)

        async def run(case: Case) -> tuple[Case, Exchange]:
            async with gate:
                return case, await exchange(sc.port, case.pieces, bound=BOUND)

        results = await asyncio.gather(*(run(case) for case in cases))
        found = [p for case, got in results for p in problems(case, got)]
        assert not found, "\n".join(found[:40]) + f"\n({len(found)} problems in {len(cases)} cases)"
        statuses = {got.status for _, got in results}
        # The corpus exercises every kind of refusal.
        assert {400, 404, 408, 413, 431} <= statuses, statuses
        answered = sum(1 for _, got in results if got.status is not None)
        assert answered >= 0.9 * len(cases), answered
        async with httpx.AsyncClient(base_url=sc.url, timeout=5.0) as client:
            health = await client.get("/healthz")
            assert health.status_code == 200, health.text
            assert json.loads(health.text)["status"] == "ok"
    assert upstream.requests == []
