"""Health-policy flags for the commands that run things.

Every field of ``keyplane.health.HealthPolicy`` gets a ``--health-<field>``
flag and a ``KEYPLANE_HEALTH_<FIELD>`` environment variable (the flag wins;
neither: the dataclass default). ``keyplane control-plane`` and ``keyplane up``
also take the aggregator's intervals (``ControlPlaneConfig.health_*``) the same
way. The control plane's policy decides what the whole fleet is told; a
sidecar's decides what its own attempts do to its local book before the
control plane answers.

Values are checked when parsed: times are finite seconds > 0, counts whole
numbers >= 1. A bad flag is a usage error; a bad environment variable stops
the command with a message naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from keyplane.health.machine import HealthPolicy
from keyplane_cli.arg_types import positive_count, positive_seconds

__all__ = [
    "AGGREGATOR_SETTINGS",
    "ENV_PREFIX",
    "POLICY_SETTINGS",
    "AggregatorIntervals",
    "HealthSetting",
    "add_health_flags",
    "aggregator_intervals_from_args",
    "health_policy_from_args",
    "positive_count",
    "positive_seconds",
]

ENV_PREFIX = "KEYPLANE_HEALTH_"


@dataclass(frozen=True, slots=True)
class HealthSetting:
    """One tunable: ``name`` is the HealthPolicy field (or the part of the
    ControlPlaneConfig field after ``health_``)."""

    name: str
    parse: Callable[[str], float | int]
    help: str

    @property
    def flag(self) -> str:
        return "--health-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def dest(self) -> str:
        return "health_" + self.name


POLICY_SETTINGS = (
    HealthSetting("error_window", positive_seconds, "sliding window for upstream errors per (key, model)"),
    HealthSetting("error_threshold", positive_count, "errors within the window that cool a (key, model) down"),
    HealthSetting("base_cooldown", positive_seconds, "first cooldown after errors; doubles per consecutive trip"),
    HealthSetting("max_cooldown", positive_seconds, "cap on the doubling cooldowns (Retry-After is honoured as sent)"),
    HealthSetting("rate_limit_default", positive_seconds, "cooldown after a 429 without Retry-After; doubles, capped"),
    HealthSetting("provider_window", positive_seconds, "sliding window for end-to-end failures per (provider, model)"),
    HealthSetting("provider_threshold", positive_count, "end-to-end failures in the window that degrade a provider"),
    HealthSetting("provider_cooldown", positive_seconds, "how long a provider stays degraded; doubles, capped"),
    HealthSetting("idle_ttl", positive_seconds, "healthy entries untouched this long are forgotten"),
    HealthSetting("max_entries", positive_count, "most health entries kept in memory"),
    HealthSetting(
        "exhausted_bench",
        positive_seconds,
        "how long a key out of credits or quota (402, 429 insufficient_quota, ...) is benched for every model "
        "before the control plane probes it; doubles per failed probe",
    ),
    HealthSetting("exhausted_max_bench", positive_seconds, "cap on the doubling benches of an exhausted key"),
)
AGGREGATOR_SETTINGS = (
    HealthSetting("sweep_interval", positive_seconds, "how often idle health entries are evicted"),
    HealthSetting("retry_interval", positive_seconds, "how often unpersisted health changes are retried"),
)

_POLICY_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(HealthPolicy)}


def add_health_flags(parser: argparse.ArgumentParser, *, aggregator: bool) -> None:
    """Add the policy flags (and with ``aggregator`` the control plane's intervals)."""
    group = parser.add_argument_group(
        "health policy",
        f"times in seconds; each flag can also be set as {ENV_PREFIX}<NAME> (e.g. {POLICY_SETTINGS[1].env})",
    )
    settings: list[tuple[HealthSetting, Any]] = [(s, _POLICY_DEFAULTS[s.name]) for s in POLICY_SETTINGS]
    if aggregator:
        from control_plane.config import ControlPlaneConfig

        defaults = {f.name: f.default for f in dataclasses.fields(ControlPlaneConfig)}
        settings += [(s, defaults["health_" + s.name]) for s in AGGREGATOR_SETTINGS]
    for setting, default in settings:
        group.add_argument(
            setting.flag,
            dest=setting.dest,
            type=setting.parse,
            default=None,
            metavar="N" if setting.parse is positive_count else "SECONDS",
            help=f"{setting.help} (default {default:g})",
        )


def _resolve(
    args: argparse.Namespace, settings: tuple[HealthSetting, ...], environ: Mapping[str, str]
) -> dict[str, float | int]:
    values: dict[str, float | int] = {}
    for setting in settings:
        value = getattr(args, setting.dest, None)
        if value is None:
            raw = environ.get(setting.env, "").strip()
            if not raw:
                continue
            try:
                value = setting.parse(raw)
            except argparse.ArgumentTypeError as exc:
                raise SystemExit(f"{setting.env}: {exc}") from None
        values[setting.name] = value
    return values


def health_policy_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> HealthPolicy:
    """The policy the flags (else the environment, else the defaults) ask for."""
    values: dict[str, Any] = dict(_resolve(args, POLICY_SETTINGS, os.environ if environ is None else environ))
    try:
        return HealthPolicy(**values)
    except ValueError as exc:  # pragma: no cover - the parsers above already enforce the same bounds
        raise SystemExit(f"invalid health policy: {exc}") from None


class AggregatorIntervals(TypedDict, total=False):
    """``ControlPlaneConfig`` keyword arguments (only those that were set)."""

    health_sweep_interval: float
    health_retry_interval: float


def aggregator_intervals_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AggregatorIntervals:
    """The aggregator intervals the flags (else the environment) ask for."""
    values = _resolve(args, AGGREGATOR_SETTINGS, os.environ if environ is None else environ)
    intervals = AggregatorIntervals()
    if "sweep_interval" in values:
        intervals["health_sweep_interval"] = float(values["sweep_interval"])
    if "retry_interval" in values:
        intervals["health_retry_interval"] = float(values["retry_interval"])
    return intervals
