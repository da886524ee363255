"""The race issue 10 is about: a secret rotation racing a field update of the
same key. 200 rotate/update pairs run at once through the gRPC API of a real
control plane (one on SQLite; two replicas on one Postgres), and afterwards
every watching sidecar holds the secret of the last rotation: no field update
ever wrote an older secret back.

"Last" is decided by the store: every write gets the next revision of the key
(its etag), so the responses, ordered by revision, are the key's history.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from keyplane import convert
from keyplane.crypto import fingerprint
from keyplane.domain import Provider
from keyplane.v1 import admin_service_pb2 as apb
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from sidecar.state import SidecarState
from tests.control_plane.conftest import ADMIN_MD, EOF, SECRET, Harness, HarnessFactory, WatchCall, next_message

PG_DSN = os.environ.get("KEYPLANE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PAIRS = 200


@pytest.fixture(params=["sqlite", "postgres"])
async def replicas(request: pytest.FixtureRequest, make_harness: HarnessFactory) -> AsyncIterator[list[Harness]]:
    if request.param == "sqlite":
        yield [await make_harness()]
        return
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"Postgres at {PG_DSN} is unreachable: {type(exc).__name__}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"kp_race_{uuid.uuid4().hex[:16]}"
    try:
        master_key = os.urandom(32)
        url = f"{PG_DSN}?schema={schema}"
        yield [await make_harness(store_url=url, master_key=master_key) for _ in range(2)]
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@dataclass
class Watcher:
    """A sidecar's view: the real SidecarState fed by a real Watch stream,
    recording every secret the key had in it, in order."""

    call: WatchCall
    state: SidecarState = field(default_factory=SidecarState)
    secrets: list[str] = field(default_factory=list)
    applied: asyncio.Event = field(default_factory=asyncio.Event)

    def key(self, key_id: str) -> tuple[str, int] | None:
        for key in self.state.keys("acme", Provider.OPENAI):
            if key.id == key_id:
                return key.secret, key.weight
        return None

    async def follow(self, key_id: str) -> None:
        while True:
            message = await self.call.read()
            if message is EOF:
                return
            assert isinstance(message, spb.WatchResponse)
            self.state.apply(message)
            self.applied.set()
            held = self.key(key_id)
            if held is not None and (not self.secrets or self.secrets[-1] != held[0]):
                self.secrets.append(held[0])


def _rotation(key_id: str, i: int) -> tuple[str, apb.UpdateProviderKeyRequest]:
    secret = f"sk-race-{i:04d}-{uuid.uuid4().hex}"
    return secret, apb.UpdateProviderKeyRequest(tenant="acme", id=key_id, new_secret=secret)


def _weight(key_id: str, i: int) -> apb.UpdateProviderKeyRequest:
    return apb.UpdateProviderKeyRequest(
        tenant="acme", id=key_id, key=rpb.ProviderKey(weight=i + 2), update_mask=FieldMask(paths=["weight"])
    )


async def _caught_up(watcher: Watcher, version: int) -> None:
    async with asyncio.timeout(20):
        while watcher.state.version < version:
            watcher.applied.clear()
            await watcher.applied.wait()


async def test_concurrent_rotations_and_updates_end_with_the_last_rotated_secret(replicas: list[Harness]) -> None:
    first = replicas[0]
    await first.tenant()
    key = await first.key(weight=1)
    watchers = [Watcher(r.watch(tenants=("acme",), sidecar_id=f"sc-race-{n}")) for n, r in enumerate(replicas)]
    followers = [asyncio.create_task(w.follow(key.id)) for w in watchers]
    for watcher in watchers:
        await _caught_up(watcher, await first.latest_version())
        assert watcher.key(key.id) == (SECRET, 1)

    # 200 pairs, all 400 calls in flight at once, spread over the replicas.
    secrets: dict[str, str] = {fingerprint(SECRET): SECRET}  # fingerprint -> secret
    calls = []
    for i in range(PAIRS):
        secret, rotate = _rotation(key.id, i)
        secrets[fingerprint(secret)] = secret
        calls.append(("rotate", replicas[i % len(replicas)].admin.UpdateProviderKey(rotate, metadata=ADMIN_MD)))
        calls.append(
            ("weight", replicas[(i + 1) % len(replicas)].admin.UpdateProviderKey(_weight(key.id, i), metadata=ADMIN_MD))
        )
    responses = await asyncio.gather(*(call for _, call in calls))
    history = sorted(
        ((convert.revision_from_etag(r.key.etag), kind, r.key) for (kind, _), r in zip(calls, responses, strict=True)),
        key=lambda entry: entry[0],
    )
    # Every write got its own revision: the responses are the whole history.
    assert [revision for revision, _, _ in history] == list(range(2, 2 * PAIRS + 2))

    # Replay it: each write shows the secret of the latest rotation before it
    # (a weight update never wrote an older one back) and the latest weight.
    rotation_order = [fingerprint(SECRET)]
    current_fp, current_weight = fingerprint(SECRET), 1
    for _, kind, written in history:
        if kind == "rotate":
            assert written.fingerprint != current_fp and written.fingerprint in secrets
            current_fp = written.fingerprint
            rotation_order.append(current_fp)
        else:
            assert written.weight != current_weight
            current_weight = written.weight
        assert (written.fingerprint, written.weight) == (current_fp, current_weight)

    final = (
        await first.admin.GetProviderKey(apb.GetProviderKeyRequest(tenant="acme", id=key.id), metadata=ADMIN_MD)
    ).key
    assert final.etag == convert.etag_from_revision(2 * PAIRS + 1)
    assert (final.fingerprint, final.weight) == (current_fp, current_weight)
    last_secret = secrets[current_fp]

    # Every sidecar ends on the last rotated secret, and never went back to an
    # earlier secret on the way (what it saw follows the rotation order).
    latest = await first.latest_version()
    for watcher in watchers:
        await _caught_up(watcher, latest)
        assert watcher.key(key.id) == (last_secret, current_weight)
        seen = [rotation_order.index(fingerprint(s)) for s in watcher.secrets]
        assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == PAIRS
    # A sidecar that connects now gets it in its snapshot too.
    for n, replica in enumerate(replicas):
        fresh = Watcher(replica.watch(tenants=("acme",), sidecar_id=f"sc-late-{n}"))
        fresh.state.apply(await next_message(fresh.call, within=5))
        assert fresh.key(key.id) == (last_secret, current_weight)

    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
