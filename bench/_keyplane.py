"""A real keyplane for the benchmarks: the control plane and a sidecar, each its
own process started through the ``keyplane`` CLI, configured through the gRPC
admin API (what the admin CLI calls)."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench._procs import Proc, repo_root
from keyplane.v1 import admin_service_pb2 as admin_pb2
from keyplane.v1 import admin_service_pb2_grpc as admin_grpc
from keyplane.v1 import resources_pb2

__all__ = [
    "SRC_ENV",
    "TENANT",
    "Admin",
    "ControlPlaneProc",
    "drop_schema",
    "keyplane_env",
    "keyplane_src",
    "start_control_plane",
    "start_sidecar",
]

TENANT = "bench"
OPENAI_COMPATIBLE = resources_pb2.Provider.Value("PROVIDER_OPENAI_COMPATIBLE")
KEYPLANE = [sys.executable, "-m", "keyplane_cli"]
# Where the keyplane processes import keyplane, control_plane and sidecar from
# (default: this checkout). Point it at another tree (e.g. ``git archive``
# output of a commit) to measure that version with this harness.
SRC_ENV = "KEYPLANE_BENCH_SRC"


def keyplane_src() -> Path:
    return Path(os.environ.get(SRC_ENV) or repo_root()).resolve()


def keyplane_command(src: Path | None = None) -> list[str]:
    """The ``keyplane`` command of the tree at ``src`` (trees before the CLI
    moved above both apps have it at ``keyplane.cli``)."""
    tree = src or keyplane_src()
    if not (tree / "keyplane_cli").is_dir() and (tree / "keyplane" / "cli").is_dir():
        return [sys.executable, "-m", "keyplane.cli"]
    return list(KEYPLANE)


def keyplane_env(extra: dict[str, str] | None = None, src: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # keyplane from the source tree first, then this harness (``bench``).
    paths = [str(src or keyplane_src()), str(repo_root())]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


@dataclass
class ControlPlaneProc:
    proc: Proc
    address: str
    admin_token: str = field(repr=False)
    sidecar_token: str = field(repr=False)
    master_key: str = field(repr=False)
    home: Path
    src: Path | None = None

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.home, ignore_errors=True)


def start_control_plane(
    *,
    cpus: frozenset[int] | None = None,
    store: str | None = None,
    argv: Sequence[str] | None = None,
    extra_env: dict[str, str] | None = None,
    same_secrets_as: ControlPlaneProc | None = None,
    src: Path | None = None,
) -> ControlPlaneProc:
    """``keyplane control-plane`` on a free port with a fresh SQLite file (or ``store``).

    ``argv`` replaces the command (same options), e.g. the traced control plane
    of ``bench.db_queries``."""
    home = Path(tempfile.mkdtemp(prefix="bench-keyplane-"))
    admin_token = "kpa-" + secrets.token_urlsafe(24)
    sidecar_token = "kps-" + secrets.token_urlsafe(24)
    master_key = base64.b64encode(os.urandom(32)).decode()
    if same_secrets_as is not None:  # another replica of the same control plane
        admin_token, sidecar_token = same_secrets_as.admin_token, same_secrets_as.sidecar_token
        master_key = same_secrets_as.master_key
    (home / "admin.token").write_text(admin_token + "\n")
    env = keyplane_env(
        {
            "KEYPLANE_MASTER_KEY": master_key,
            "KEYPLANE_SIDECAR_TOKEN": sidecar_token,
            "KEYPLANE_HOME": str(home),
            **(extra_env or {}),
        },
        src,
    )
    command = list(argv) if argv is not None else [*keyplane_command(src), "control-plane"]
    command += [
        "--listen",
        "127.0.0.1:0",
        "--store",
        store or f"sqlite:///{home / 'keyplane.db'}",
        "--admin-token-file",
        str(home / "admin.token"),
        "--log-level",
        "warning",
    ]
    try:
        proc = Proc.start(command, ready=r"listening on port (\d+)", cpus=cpus, env=env, cwd=src or keyplane_src())
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    return ControlPlaneProc(proc, f"127.0.0.1:{proc.match.group(1)}", admin_token, sidecar_token, master_key, home, src)


class Admin:
    """Synchronous admin client (one channel, the admin token on every call)."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = admin_grpc.AdminServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def close(self) -> None:
        self.channel.close()

    def setup(self, upstream_base: str, models: Sequence[str], *, keys: int = 1) -> tuple[list[str], str]:
        """Tenant ``bench``, ``keys`` openai_compatible keys on ``upstream_base``,
        one route per model, one client key; returns (key ids, client token)."""
        md = self.metadata
        self.stub.CreateTenant(admin_pb2.CreateTenantRequest(name=TENANT), metadata=md, timeout=30)
        key_ids = []
        for index in range(keys):
            response = self.stub.CreateProviderKey(
                admin_pb2.CreateProviderKeyRequest(
                    tenant=TENANT,
                    provider=OPENAI_COMPATIBLE,
                    label=f"key-{index}",
                    secret=f"sk-bench-{index:04d}-" + secrets.token_hex(8),
                    base_url=upstream_base.rstrip("/") + "/v1",
                    weight=1,
                ),
                metadata=md,
                timeout=30,
            )
            key_ids.append(response.key.id)
        for model in models:
            target = resources_pb2.RouteTarget(provider=OPENAI_COMPATIBLE, upstream_model=model, weight=1)
            self.stub.CreateRoute(
                admin_pb2.CreateRouteRequest(tenant=TENANT, public_model=model, targets=[target]),
                metadata=md,
                timeout=30,
            )
        client = self.stub.CreateClientKey(
            admin_pb2.CreateClientKeyRequest(tenant=TENANT, label="bench"), metadata=md, timeout=30
        )
        return key_ids, client.token


def start_sidecar(
    cp: ControlPlaneProc,
    *,
    cpus: frozenset[int] | None = None,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> Proc:
    """``keyplane sidecar`` on a free port (plus ``extra_args``); returns once /healthz says ready.

    At the default log level, as users run it (``extra_args`` may say otherwise)."""
    env = keyplane_env({"KEYPLANE_SIDECAR_TOKEN": cp.sidecar_token, "KEYPLANE_HOME": str(cp.home)}, cp.src)
    proc = Proc.start(
        [
            *keyplane_command(cp.src),
            *("sidecar", "--control-plane", cp.address, "--port", "0"),
            *extra_args,
        ],
        ready=r"listening on (http://\S+)/v1",
        cpus=cpus,
        env=env,
        cwd=cp.src or keyplane_src(),
    )
    deadline = time.monotonic() + timeout
    url = proc.match.group(1) + "/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError("the sidecar never became ready")
        time.sleep(0.05)


def drop_schema(url: str, schema: str) -> None:
    """Drop a throwaway Postgres schema made by a benchmark."""
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())
