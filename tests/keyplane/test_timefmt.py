"""Readable times in logs (issue 13): ISO-8601 UTC and "in 12.3s", never bare
epoch seconds; the sidecar's and the control plane's cooldown lines use them."""

from __future__ import annotations

import logging
import re

import pytest

from control_plane.aggregator import _log_transition
from keyplane.domain import HealthState, Provider
from keyplane.health.classify import classify_response
from keyplane.health.machine import HealthChange, HealthPolicy, KeyScope, Outcome, Verdict
from keyplane.timefmt import iso_utc, until_text
from sidecar.health import TenantHealth

NOW = 1_796_030_000.25  # 2026-11-30T09:13:20.250Z
READABLE = re.compile(r"until 2026-11-30T09:13:\d\d\.\d{3}Z \(in \d+\.\ds\)")


def test_iso_utc_and_until_text() -> None:
    assert iso_utc(NOW) == "2026-11-30T09:13:20.250Z"
    assert until_text(NOW + 12.34, NOW) == "2026-11-30T09:13:32.590Z (in 12.3s)"
    assert until_text(NOW - 1.5, NOW) == "2026-11-30T09:13:18.750Z (ended 1.5s ago)"


def test_the_sidecar_logs_a_cooldown_end_as_a_readable_time(caplog: pytest.LogCaptureFixture) -> None:
    health = TenantHealth("acme", HealthPolicy(rate_limit_default=7.0))
    limited = classify_response(429, {"retry-after": "7"}, b"", now=NOW)
    with caplog.at_level(logging.WARNING, logger="sidecar.health"):
        health.record(Outcome("k1", Provider.OPENAI, "gpt-4o", limited, provider_final=True), NOW)
    [line] = [r.getMessage() for r in caplog.records if "cooldown" in r.getMessage()]
    assert READABLE.search(line), line
    assert "until 2026-11-30T09:13:27.250Z (in 7.0s)" in line
    assert str(int(NOW)) not in line


def test_the_control_plane_logs_a_cooldown_end_as_a_readable_time(caplog: pytest.LogCaptureFixture) -> None:
    change = HealthChange(KeyScope("k1", "gpt-4o"), Verdict(HealthState.COOLDOWN, until=NOW + 7.0, reason="429"))
    with caplog.at_level(logging.INFO, logger="control_plane.aggregator"):
        _log_transition("acme", change, NOW)
    [line] = [r.getMessage() for r in caplog.records]
    assert "until 2026-11-30T09:13:27.250Z (in 7.0s)" in line, line
