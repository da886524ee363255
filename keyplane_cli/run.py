"""Commands that run things: the control plane, a sidecar, or both (``up``)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyplane.crypto import MasterKeyError
from keyplane.domain import Provider
from keyplane.home import Home, ensure_private_dir, read_token_file
from keyplane.runtime import tune_gc
from keyplane.tls import TlsError, is_loopback_listen
from keyplane_cli.affinity_flags import add_affinity_flags, affinity_options_from_args
from keyplane_cli.control_plane_flags import add_control_plane_flags, control_plane_options_from_args
from keyplane_cli.convergence_flags import add_convergence_flags, convergence_options_from_args
from keyplane_cli.edge_flags import add_edge_flags, edge_options_from_args
from keyplane_cli.health_flags import add_health_flags, aggregator_intervals_from_args, health_policy_from_args
from keyplane_cli.master_key import master_key_sources
from keyplane_cli.panic_flags import add_panic_flags, panic_policy_from_args
from keyplane_cli.quota_flags import (
    add_control_plane_limit_flags,
    add_sidecar_limit_flags,
    control_plane_limit_options_from_args,
    sidecar_limit_options_from_args,
)
from keyplane_cli.recovery_probe_flags import add_recovery_probe_flags, recovery_probe_from_args
from keyplane_cli.shutdown_flags import Signals, add_control_plane_drain_flags, add_sidecar_shutdown_flags
from keyplane_cli.sidecar_affinity_flags import add_sidecar_affinity_flags, sidecar_affinity_options_from_args
from keyplane_cli.stability_flags import (
    add_stability_flags,
    add_watch_admission_flags,
    stability_options_from_args,
    watch_admission_options_from_args,
)
from keyplane_cli.tls_flags import (
    add_client_tls_flags,
    add_server_tls_flags,
    client_tls_from_args,
    server_tls_from_args,
)
from keyplane_cli.usage_flags import add_usage_flags, usage_options_from_args

if TYPE_CHECKING:
    from keyplane.health.machine import HealthPolicy
    from sidecar.config import SidecarConfig

__all__ = ["add_run_commands"]

log = logging.getLogger("keyplane")

SIDECAR_TOKEN_ENV = "KEYPLANE_SIDECAR_TOKEN"


def _parse_sidecar_tokens(path: Path) -> dict[str, tuple[str, ...]]:
    """Lines of ``<token> <tenant,tenant|*>``; blank lines and # comments skipped."""
    tokens: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            tokens[parts[0]] = ("*",)
        elif len(parts) == 2:
            tokens[parts[0]] = tuple(t for t in parts[1].split(",") if t)
        else:
            raise SystemExit(f"{path}:{number}: expected '<token> <tenants|*>'")
    if not tokens:
        raise SystemExit(f"{path}: no sidecar tokens")
    return tokens


async def _start(starting: Awaitable[None], address: str, flag: str) -> None:
    """Await a server's start; an address it cannot bind is one line naming
    the address and the flag that sets it, not a traceback."""
    try:
        await starting
    except OSError as exc:
        if not _is_bind_error(exc):
            raise
        detail = exc.strerror.lower() if exc.strerror else "the address is in use or not available here"
        raise SystemExit(f"keyplane: cannot listen on {address}: {detail} (choose another with {flag})") from None


def _is_bind_error(exc: OSError) -> bool:
    from control_plane.server import ListenError

    return isinstance(exc, ListenError) or exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM. Installed before anything starts,
    so a signal sent as soon as the ready line is printed stops the process
    cleanly instead of killing it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_up(args: argparse.Namespace) -> int:
    from control_plane.config import ControlPlaneConfig, redact_url
    from control_plane.server import ControlPlane
    from sidecar.config import SidecarConfig
    from sidecar.server import Sidecar

    stop = _stop_on_signals()
    health_policy = health_policy_from_args(args)
    intervals = aggregator_intervals_from_args(args)
    if not is_loopback_listen(args.listen):
        raise SystemExit(
            f"up: refusing to serve plaintext gRPC on {args.listen}: 'keyplane up' listens on loopback only; "
            "run 'keyplane control-plane' with --tls-cert and --tls-key to serve other hosts"
        )
    home = Home(args.home) if args.home else Home.default()
    ensure_private_dir(home.root)  # tightens a group/world-accessible one, with a warning
    master_key, keyring_file = master_key_sources(None, None, home=home, create=True)
    admin_token = home.ensure_token(home.admin_token_file, "kpa-")
    sidecar_token = home.ensure_token(home.sidecar_token_file, "kps-")
    store_url = args.store or f"sqlite:///{home.database}"
    cp = ControlPlane(
        ControlPlaneConfig(
            listen=args.listen,
            store_url=store_url,
            admin_token=admin_token,
            sidecar_tokens={sidecar_token: ("*",)},
            master_key=master_key,
            master_keyring_file=keyring_file,
            health_policy=health_policy,
            **intervals,
            **control_plane_options_from_args(args),
            **usage_options_from_args(args),
            recovery_probe=recovery_probe_from_args(args),
            **convergence_options_from_args(args),
            **affinity_options_from_args(args),
            **watch_admission_options_from_args(args),
            **control_plane_limit_options_from_args(args),
        )
    )
    try:
        await _start(cp.start(), args.listen, "--listen")
    except MasterKeyError as exc:
        raise SystemExit(f"up: {exc}") from None
    host = args.listen.rsplit(":", 1)[0]
    target = f"{host}:{cp.port}"
    sc = Sidecar(
        SidecarConfig(
            control_plane_target=target,
            sidecar_token=sidecar_token,
            host=args.host,
            port=args.port,
            health_policy=health_policy,
            panic_policy=panic_policy_from_args(args),
            **edge_options_from_args(args),
            **sidecar_affinity_options_from_args(args),
        )
    )
    try:
        await _start(sc.start(), f"{args.host}:{args.port}", "--host/--port")
        lines = [
            f"keyplane control plane listening on {target} (store: {redact_url(store_url)})",
            f"keyplane sidecar listening on http://{args.host}:{sc.port}/v1",
            f"admin token: {home.admin_token_file}  (the admin CLI finds it; data in {home.root})",
            "next steps:",
            "  keyplane tenants create acme",
            "  keyplane keys add -t acme -p openai -l main --secret-env OPENAI_API_KEY",
            "  keyplane routes add -t acme -m gpt-4o-mini --target openai:gpt-4o-mini",
            "  keyplane client-keys create -t acme -l my-app",
        ]
        if args.listen != "127.0.0.1:50051":
            lines.append(f"  (pass --server {target} to the admin commands, or export KEYPLANE_SERVER={target})")
        print("\n".join(lines), flush=True)
        tune_gc()
        await stop.wait()
    finally:
        await sc.stop()
        await cp.stop()
    return 0


async def _run_control_plane(args: argparse.Namespace) -> int:
    from control_plane.config import ControlPlaneConfig, redact_url
    from control_plane.server import ControlPlane

    signals = Signals()
    health_policy = health_policy_from_args(args)
    intervals = aggregator_intervals_from_args(args)
    admin_token = (
        read_token_file(args.admin_token_file) if args.admin_token_file else os.environ.get("KEYPLANE_ADMIN_TOKEN", "")
    )
    if not admin_token:
        raise SystemExit("control-plane needs an admin token: --admin-token-file or KEYPLANE_ADMIN_TOKEN")
    if args.sidecar_tokens_file:
        sidecar_tokens = _parse_sidecar_tokens(args.sidecar_tokens_file)
    elif os.environ.get(SIDECAR_TOKEN_ENV):
        sidecar_tokens = {os.environ[SIDECAR_TOKEN_ENV].strip(): ("*",)}
    else:
        raise SystemExit(f"control-plane needs sidecar tokens: --sidecar-tokens-file or {SIDECAR_TOKEN_ENV}")
    try:
        master_key, keyring_file = master_key_sources(args.master_key_file, args.master_keyring_file)
    except MasterKeyError as exc:
        raise SystemExit(f"control-plane: {exc}") from None
    try:
        config = ControlPlaneConfig(
            listen=args.listen,
            store_url=args.store,
            admin_token=admin_token,
            sidecar_tokens=sidecar_tokens,
            master_key=master_key,
            master_keyring_file=keyring_file,
            health_policy=health_policy,
            tls=server_tls_from_args(args),
            insecure_plaintext=args.insecure_plaintext,
            drain_seconds=args.drain_seconds,
            **intervals,
            **control_plane_options_from_args(args),
            **usage_options_from_args(args),
            recovery_probe=recovery_probe_from_args(args),
            **convergence_options_from_args(args),
            **affinity_options_from_args(args),
            **watch_admission_options_from_args(args),
            **control_plane_limit_options_from_args(args),
        )
    except ValueError as exc:  # TlsError included
        raise SystemExit(f"control-plane: {exc}") from None
    cp = ControlPlane(config)
    try:
        await _start(cp.start(), args.listen, "--listen")
    except (TlsError, MasterKeyError) as exc:
        raise SystemExit(f"control-plane: {exc}") from None
    print(f"keyplane control plane listening on port {cp.port} (store: {redact_url(args.store)})", flush=True)
    tune_gc()
    try:
        await signals.stop.wait()
    finally:
        # SIGTERM: NOT_SERVING and the drain window first; SIGINT: stop at once.
        await cp.shutdown(None if signals.terminated else 0.0, hurry=signals.hurry)
    return 0


def sidecar_config_from_args(args: argparse.Namespace, token: str, health_policy: HealthPolicy) -> SidecarConfig:
    """The ``keyplane sidecar`` flags as a config (``ValueError`` for values out of range)."""
    from sidecar.config import SidecarConfig

    return SidecarConfig(
        control_plane_target=args.control_plane,
        sidecar_token=token,
        tenants=tuple(args.tenant or ()),
        host=args.host,
        port=args.port,
        health_policy=health_policy,
        panic_policy=panic_policy_from_args(args),
        report_outcomes=not args.no_outcome_reports,
        usage_accounting=not args.no_usage_accounting,
        access_log=args.access_log,
        upstream_connect_timeout=args.upstream_connect_timeout,
        upstream_read_timeout=args.upstream_read_timeout,
        request_timeout=args.request_timeout,
        upstream_limit_per_host=args.upstream_limit_per_host,
        upstream_trust_env=args.upstream_trust_env,
        upstream_ca_file=str(args.upstream_ca_file) if args.upstream_ca_file else None,
        upstream_ca_file_only=args.upstream_ca_file_only,
        upstream_max_header_size=args.upstream_max_header_size,
        upstream_max_headers=args.upstream_max_headers,
        upstream_max_body_bytes=args.upstream_max_body_bytes,
        control_plane_tls=client_tls_from_args(args),
        providers=tuple(args.provider or ()),
        **({"sidecar_id": args.sidecar_id} if args.sidecar_id else {}),
        shutdown_delay=args.shutdown_delay,
        shutdown_grace=args.shutdown_grace,
        **edge_options_from_args(args),
        **stability_options_from_args(args),
        **sidecar_affinity_options_from_args(args),
        **sidecar_limit_options_from_args(args),
    )


def _served_provider(name: str) -> Provider:
    try:
        return Provider(name)
    except ValueError:
        choices = ", ".join(p.value for p in Provider)
        raise argparse.ArgumentTypeError(f"unknown provider {name!r}; one of: {choices}") from None


async def _run_sidecar(args: argparse.Namespace) -> int:
    from sidecar.server import Sidecar

    signals = Signals()
    health_policy = health_policy_from_args(args)
    if args.token_file:
        token = read_token_file(args.token_file)
    elif os.environ.get(SIDECAR_TOKEN_ENV):
        token = os.environ[SIDECAR_TOKEN_ENV].strip()
    else:
        default = Home.default().sidecar_token_file
        if not default.exists():
            raise SystemExit(f"sidecar needs a token: --token-file or {SIDECAR_TOKEN_ENV}")
        token = read_token_file(default)
    try:
        config = sidecar_config_from_args(args, token, health_policy)
        sc = Sidecar(config)
    except ValueError as exc:
        raise SystemExit(f"sidecar: {exc}") from None
    try:
        await _start(sc.start(), f"{args.host}:{args.port}", "--host/--port")
    except TlsError as exc:
        raise SystemExit(f"sidecar: {exc}") from None
    print(f"keyplane sidecar listening on http://{args.host}:{sc.port}/v1", flush=True)
    tune_gc()
    try:
        await signals.stop.wait()
    finally:
        # SIGTERM: the delay, then the grace (sidecar/shutdown.py); SIGINT: the grace only.
        await sc.shutdown(None if signals.terminated else 0.0, hurry=signals.hurry)
    return 0


def _runner(coro_fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(
            level=getattr(logging, args.log_level.upper()),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            import uvloop

            return int(uvloop.run(coro_fn(args)))
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return int(asyncio.run(coro_fn(args)))

    return run


def add_run_commands(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    up = sub.add_parser("up", help="run the control plane (SQLite) and one sidecar in this process")
    up.add_argument("--home", type=Path, help="data directory (default $KEYPLANE_HOME or ~/.keyplane)")
    up.add_argument("--listen", default="127.0.0.1:50051", help="control plane gRPC address")
    up.add_argument("--host", default="127.0.0.1", help="sidecar HTTP host (keep it on loopback)")
    up.add_argument("--port", type=int, default=8787, help="sidecar HTTP port (0 = any free port)")
    up.add_argument("--store", help="store URL instead of the embedded SQLite file")
    add_edge_flags(up)
    handlers["up"] = _runner(_run_up)

    cp = sub.add_parser("control-plane", help="run the control plane")
    cp.add_argument(
        "--listen",
        default="0.0.0.0:50051",
        help="gRPC address (default 0.0.0.0:50051; off loopback it needs TLS or --insecure-plaintext)",
    )
    cp.add_argument("--store", required=True, help="sqlite:///path.db or postgresql://user@host/db[?schema=s]")
    cp.add_argument(
        "--admin-token-file", type=Path, help="file holding the bootstrap admin token (else KEYPLANE_ADMIN_TOKEN)"
    )
    cp.add_argument("--sidecar-tokens-file", type=Path, help="lines of '<token> <tenant,tenant|*>'")
    cp.add_argument("--master-key-file", type=Path, help="base64 32-byte key (else KEYPLANE_MASTER_KEY)")
    cp.add_argument(
        "--master-keyring-file",
        type=Path,
        help="'<id> <base64 key>' lines, newest last, re-read when it changes (else KEYPLANE_MASTER_KEYRING); "
        "once it exists it replaces the single master key",
    )
    add_server_tls_flags(cp)
    add_control_plane_drain_flags(cp)
    handlers["control-plane"] = _runner(_run_control_plane)

    sc = sub.add_parser("sidecar", help="run a sidecar next to an application")
    sc.add_argument("--control-plane", default="127.0.0.1:50051", help="control plane gRPC address")
    sc.add_argument("--token-file", type=Path, help="sidecar token file (else KEYPLANE_SIDECAR_TOKEN)")
    sc.add_argument("--tenant", action="append", help="tenant to serve (repeatable; default all the token allows)")
    sc.add_argument(
        "--sidecar-id",
        help="this sidecar's name in 'keyplane proxy-status' (default <hostname>-<pid>; e.g. the pod name)",
    )
    sc.add_argument(
        "--provider",
        action="append",
        type=_served_provider,
        metavar="PROVIDER",
        help="serve only routes to this provider (repeatable; default every provider this build knows): a "
        "configuration version with a route to another one is rejected (NACK, shown by 'keyplane proxy-status') "
        "and the sidecar keeps serving the version it held; for sidecars whose network reaches only some providers",
    )
    sc.add_argument("--host", default="127.0.0.1", help="HTTP address apps call (keep it on loopback)")
    sc.add_argument("--port", type=int, default=8787, help="HTTP port apps call (0 = any free port)")
    sc.add_argument(
        "--no-outcome-reports",
        action="store_true",
        help="do not report attempt outcomes to the control plane (this sidecar still acts on its own "
        "findings, but the fleet no longer learns from them)",
    )
    sc.add_argument(
        "--no-usage-accounting",
        action="store_true",
        help="do not read token usage from answers (nor ask streams for it); outcomes are then "
        "reported without usage, so usage rollups, costs and budgets see nothing of this sidecar",
    )
    sc.add_argument(
        "--access-log",
        nargs="?",
        const="-",
        metavar="PATH",
        help="one JSON line per chat request (request id, tenant, model, status, attempts, provider, key id, "
        "latency) on stdout, or appended to PATH; off by default",
    )
    upstream = sc.add_argument_group("upstream calls")
    upstream.add_argument(
        "--upstream-connect-timeout", type=float, default=10.0, help="seconds to connect (TCP, proxy, TLS)"
    )
    upstream.add_argument(
        "--upstream-read-timeout", type=float, default=600.0, help="longest silence between two bytes of an answer"
    )
    upstream.add_argument(
        "--request-timeout", type=float, default=600.0, help="one deadline for a whole app request, every attempt"
    )
    upstream.add_argument(
        "--upstream-limit-per-host", type=int, default=256, help="connections per provider host (more requests queue)"
    )
    upstream.add_argument(
        "--upstream-trust-env",
        action="store_true",
        help="send upstream calls through HTTP_PROXY / HTTPS_PROXY (http:// proxies; https via CONNECT), "
        "except hosts in NO_PROXY",
    )
    upstream.add_argument(
        "--upstream-ca-file", type=Path, help="PEM bundle trusted for upstream TLS, on top of the system's CAs"
    )
    upstream.add_argument(
        "--upstream-ca-file-only",
        action="store_true",
        help="trust only --upstream-ca-file for upstream TLS, not the system's CAs",
    )
    upstream.add_argument(
        "--upstream-max-header-size",
        type=int,
        default=8190,
        help="most bytes in an upstream answer's status line and in any one of its header lines",
    )
    upstream.add_argument(
        "--upstream-max-headers", type=int, default=128, help="most header lines in an upstream answer's head"
    )
    upstream.add_argument(
        "--upstream-max-body-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="most bytes of a non-streamed upstream answer (a larger one fails the attempt as upstream_error)",
    )
    add_edge_flags(sc)
    add_stability_flags(sc)
    add_sidecar_affinity_flags(sc)
    add_sidecar_limit_flags(sc)
    add_sidecar_shutdown_flags(sc)
    add_client_tls_flags(sc)
    handlers["sidecar"] = _runner(_run_sidecar)

    add_control_plane_flags(up)
    add_control_plane_flags(cp)
    add_recovery_probe_flags(up)
    add_recovery_probe_flags(cp)
    add_convergence_flags(up)
    add_convergence_flags(cp)
    add_affinity_flags(up)
    add_affinity_flags(cp)
    add_watch_admission_flags(up)
    add_watch_admission_flags(cp)
    add_control_plane_limit_flags(up)
    add_control_plane_limit_flags(cp)
    add_usage_flags(up)
    add_usage_flags(cp)
    add_health_flags(up, aggregator=True)
    add_health_flags(cp, aggregator=True)
    add_health_flags(sc, aggregator=False)
    add_panic_flags(up)
    add_sidecar_affinity_flags(up)
    add_panic_flags(sc)
    for parser in (up, cp, sc):
        parser.add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
        )
