"""``keyplane health show`` as a user runs it: an exhausted key is listed
key-wide with its bench end and the provider's words, without key material."""

from __future__ import annotations

import re
import time
from pathlib import Path

from keyplane import convert
from keyplane.domain import Provider
from keyplane.health import HealthPolicy, Outcome, classify_response
from tests.control_plane.conftest import HarnessFactory
from tests.control_plane.test_health import report, setup_keys
from tests.control_plane.test_health_cli import keyplane
from tests.health import bodies


async def test_health_show_lists_an_exhausted_key_with_the_providers_reason(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    harness = await make_harness(health_policy=HealthPolicy(exhausted_bench=600.0))
    key1, _ = await setup_keys(harness)
    classification = classify_response(429, {}, bodies.XAI_CREDITS_USED_UP, now=time.time())
    outcome = Outcome(key1, Provider.OPENAI, "grok-4", classification, provider_final=False)
    assert await report(harness, [convert.outcome_to_proto("acme", outcome)]) == 1

    text = await keyplane(harness, tmp_path, "health", "show", "-t", "acme")
    [line] = [line for line in text.splitlines() if line.startswith(key1)]
    match = re.fullmatch(
        rf"{key1}\s+\(all models\)\s+exhausted\s+\S+ \S+ \(in (\d+)s\)\s+"
        r"429 credits used up: Your team \[redacted\] has either used all available credits or reached its "
        r"monthly spending limit\. .*",
        line,
    )
    assert match is not None, line
    assert 590 <= int(match.group(1)) <= 600
    assert "16f2151a" not in text  # the team id the provider quoted
    print(f"\n{line}")
