"""Recovery-probe flags of ``keyplane control-plane`` and ``keyplane up``
(``control_plane.recovery_probe``): how the control plane probes exhausted
keys in the background.

- ``--recovery-probe PROVIDER=KIND`` (repeatable): ``completion`` (a
  1-token chat completion, the default for every provider) or ``models``
  (``GET {base_url}/models``).
- ``--recovery-probe-interval``, ``--recovery-probe-timeout``,
  ``--recovery-probe-lead`` (seconds).
- ``--no-recovery-probe``: never probe (exhausted keys then come back only
  when their bench ends and app traffic tries them, or by an admin reset).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal, cast

from keyplane.domain import Provider
from keyplane_cli.arg_types import non_negative_seconds, positive_seconds

if TYPE_CHECKING:  # the control plane is imported only by the commands that run it
    from control_plane.recovery_probe import RecoveryProbeConfig

__all__ = ["add_recovery_probe_flags", "recovery_probe_from_args"]

ProbeKind = Literal["completion", "models"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("completion", "models")
# RecoveryProbeConfig's defaults (tests/cli checks they agree).
DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_LEAD = 15.0


def _probe_kind(text: str) -> tuple[Provider, ProbeKind]:
    name, sep, kind = text.partition("=")
    try:
        provider = Provider(name.strip())
    except ValueError:
        known = ", ".join(p.value for p in Provider)
        raise argparse.ArgumentTypeError(f"unknown provider {name!r} (one of {known})") from None
    if not sep or kind.strip() not in PROBE_KINDS:
        raise argparse.ArgumentTypeError(f"expected PROVIDER=KIND with KIND one of {', '.join(PROBE_KINDS)}")
    return provider, cast(ProbeKind, kind.strip())


def add_recovery_probe_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "recovery probe of exhausted keys",
        "a key out of credits or quota is benched for every model; from shortly before its bench ends the "
        "control plane sends the provider one cheap request with it: success restores the key fleet-wide, "
        "another exhausted answer extends the bench (see --health-exhausted-bench)",
    )
    group.add_argument(
        "--recovery-probe",
        dest="recovery_probe_kinds",
        type=_probe_kind,
        action="append",
        default=[],
        metavar="PROVIDER=KIND",
        help="probe for one provider kind: 'completion' (a 1-token chat completion for a model the key serves; "
        "the default, and the probe that sees billing) or 'models' (GET {base_url}/models); repeatable",
    )
    group.add_argument(
        "--recovery-probe-interval",
        type=positive_seconds,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"how often benched keys are looked at (default {DEFAULT_INTERVAL:g})",
    )
    group.add_argument(
        "--recovery-probe-timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest one probe request may take (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--recovery-probe-lead",
        type=non_negative_seconds,
        default=DEFAULT_LEAD,
        metavar="SECONDS",
        help="probe this long before a bench ends, so a failed probe extends it before app traffic could "
        f"try the key (default {DEFAULT_LEAD:g})",
    )
    group.add_argument(
        "--no-recovery-probe",
        dest="recovery_probe_enabled",
        action="store_false",
        default=True,
        help="never probe exhausted keys",
    )


def recovery_probe_from_args(args: argparse.Namespace) -> RecoveryProbeConfig:
    from control_plane.recovery_probe import RecoveryProbeConfig

    kinds: dict[Provider, ProbeKind] = dict(getattr(args, "recovery_probe_kinds", []) or [])
    return RecoveryProbeConfig(
        enabled=getattr(args, "recovery_probe_enabled", True),
        interval=getattr(args, "recovery_probe_interval", DEFAULT_INTERVAL),
        timeout=getattr(args, "recovery_probe_timeout", DEFAULT_TIMEOUT),
        lead=getattr(args, "recovery_probe_lead", DEFAULT_LEAD),
        kinds=kinds,
    )
