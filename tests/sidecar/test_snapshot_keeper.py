"""The snapshot fold (pure) and the keeper: what is persisted restores the same state."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from keyplane.domain import Provider
from keyplane.v1 import sidecar_service_pb2
from sidecar.snapshot_file import SnapshotKey, read_snapshot_file
from sidecar.snapshot_fold import SnapshotFold
from sidecar.snapshot_keeper import SnapshotKeeper
from sidecar.state import SidecarState
from tests.sidecar import protos as p

TOKEN = "kps-keeper-token-0123456789"


def _stream() -> list[sidecar_service_pb2.WatchResponse]:
    """A snapshot of two tenants, then deltas touching every kind of change."""
    return [
        p.snapshot(
            10,
            p.tenant_state(
                "acme",
                keys=[p.pkey("k1", "sk-one"), p.pkey("k2", "sk-two")],
                routes=[p.route("r1", "chat", p.target("gpt-4o"))],
                client_keys=[p.client_key("c1", "kp-acme-1")],
                key_health=[p.key_health("k2", "gpt-4o", p.COOLDOWN, until=time.time() + 600)],
            ),
            p.tenant_state("globex", keys=[p.pkey("g1", "sk-g")], client_keys=[p.client_key("gc", "kp-globex")]),
        ),
        p.delta(
            p.key_put(11, "acme", p.pkey("k3", "sk-three")),
            p.key_put(12, "acme", p.pkey("k1", "", status=p.DISABLED)),
            p.route_put(13, "acme", p.route("r2", "embed", p.target("text-embedding-3-small"))),
        ),
        p.delta(
            p.client_key_put(14, "acme", p.client_key("c2", "kp-acme-2")),
            p.client_key_deleted(15, "acme", "c1"),
            p.key_health_put(16, "acme", p.key_health("k3", "", p.UNHEALTHY)),
            p.provider_health_put(17, "acme", p.provider_health(p.OPENAI, "gpt-4o", until=time.time() + 600)),
        ),
        # A resume overlap: 16 is already held and must not be applied twice.
        p.delta(p.key_health_put(16, "acme", p.key_health("k3", "", p.HEALTHY))),
        p.delta(p.tenant_deleted(18, "globex"), p.route_deleted(19, "acme", "r1")),
    ]


def _picture(state: SidecarState) -> dict[str, object]:
    now = time.time()
    health = state.health("acme")
    return {
        "version": state.version,
        "tenants": state.tenants(),
        "models": state.models("acme"),
        "keys": [(k.id, k.secret) for k in state.keys("acme", Provider.OPENAI)],
        "auth": [state.authenticate(t) for t in ("kp-acme-1", "kp-acme-2", "kp-globex")],
        "k2": health.key_usable("k2", "gpt-4o", now),
        "k3": health.key_usable("k3", "gpt-4o", now),
        "openai": health.provider_degraded(Provider.OPENAI, "gpt-4o", now),
    }


def test_the_fold_rebuilds_the_state_the_stream_built() -> None:
    live, fold = SidecarState(), SnapshotFold()
    for message in _stream():
        live.apply(message)
        fold.apply(message)
    restored = SidecarState()
    restored.apply(fold.response())
    assert _picture(restored) == _picture(live)
    assert _picture(live) == {
        "version": 19,
        "tenants": ("acme",),
        "models": ("embed",),
        "keys": [("k2", "sk-two"), ("k3", "sk-three")],
        "auth": [None, "acme", None],
        "k2": False,
        "k3": False,
        "openai": True,
    }


def test_the_fold_filters_tenants() -> None:
    fold = SnapshotFold()
    fold.apply(_stream()[0])
    assert [t.tenant for t in fold.response(frozenset({"globex"})).snapshot.tenants] == ["globex"]


async def test_the_keeper_persists_coalesced_and_a_new_sidecar_restores_it(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.snapshot"
    key = SnapshotKey.from_token(TOKEN)
    state = SidecarState()
    keeper = SnapshotKeeper(state, path=path, key=key, interval=0.3)
    runner = asyncio.create_task(keeper.run())
    state.set_connected(True)
    for message in _stream():
        state.apply(message)
        keeper.note(message)
    # A burst of 100 health deltas: coalesced, never one write per delta.
    for i in range(100):
        message = p.delta(p.key_health_put(100 + i, "acme", p.key_health("k2", f"m{i}", p.COOLDOWN)))
        state.apply(message)
        keeper.note(message)
        await asyncio.sleep(0.005)
    await keeper.close()
    await runner
    print(f"\n100 deltas over ~0.5 s -> {keeper.writes} writes of the snapshot file")
    assert 1 <= keeper.writes <= 4
    found = read_snapshot_file(path, key)
    assert found is not None and found.version == 199

    # A restarted sidecar: the same token opens it, the state comes back whole.
    fresh = SidecarState()
    again = SnapshotKeeper(fresh, path=path, key=key)
    assert await again.restore()
    assert _picture(fresh) == _picture(state)
    assert again.restored_version == 199
    age = again.age()
    assert age is not None and 0 <= age < 5
    # The first message from the control plane ends "serving from the file".
    resumed = p.delta(p.route_put(200, "acme", p.route("r9", "new", p.target("gpt-4o"))))
    fresh.apply(resumed)
    again.note(resumed)
    assert again.restored_version is None


async def test_a_file_from_another_token_or_a_tampered_file_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sidecar.snapshot"
    state = SidecarState()
    keeper = SnapshotKeeper(state, path=path, key=SnapshotKey.from_token(TOKEN))
    first = _stream()[0]
    state.apply(first)
    keeper.note(first)
    await keeper.close()
    assert path.exists()

    caplog.set_level(logging.ERROR, logger="sidecar.snapshot_keeper")
    other = SidecarState()
    assert not await SnapshotKeeper(other, path=path, key=SnapshotKey.from_token("kps-another")).restore()
    assert not other.is_ready
    assert "ignoring the persisted snapshot" in caplog.text and "another sidecar token" in caplog.text

    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.clear()
    assert not await SnapshotKeeper(other, path=path, key=SnapshotKey.from_token(TOKEN)).restore()
    assert not other.is_ready and "ignoring the persisted snapshot" in caplog.text
    assert TOKEN not in caplog.text and "sk-one" not in caplog.text


async def test_restored_age_counts_from_the_last_sync(tmp_path: Path) -> None:
    now = [5000.0]
    path = tmp_path / "s.snapshot"
    key = SnapshotKey.from_token(TOKEN)
    state = SidecarState(clock=lambda: now[0])
    keeper = SnapshotKeeper(state, path=path, key=key, wall_clock=lambda: now[0])
    state.set_connected(True)
    state.apply(_stream()[0])
    keeper.note(_stream()[0])
    state.set_connected(False)
    now[0] += 30  # written 30 s after the stream broke: still "in sync 30 s ago"
    await keeper.close()
    now[0] += 100
    fresh = SidecarState(clock=lambda: now[0])
    again = SnapshotKeeper(fresh, path=path, key=key, wall_clock=lambda: now[0])
    assert await again.restore()
    assert again.age() == pytest.approx(130.0)
