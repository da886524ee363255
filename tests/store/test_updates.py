"""Updates on both stores: only the named columns, revision + 1, and the
compare-and-set precondition (``expected_revision``)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

import pytest

from control_plane.store import ProviderKeyUpdate, RouteUpdate, SealedSecret, Store
from control_plane.store._codec import targets_to_json
from keyplane.domain import ChangeOp, EntityKind, KeyStatus, Provider, RouteTarget
from keyplane.errors import Aborted, AlreadyExists, NotFound
from tests.store import factories as f
from tests.store import legacy
from tests.store.conftest import Backend
from tests.store.test_conformance import changes

NEW_SECRET = SealedSecret(ciphertext=b"\x02rotated-ciphertext", fingerprint="sha256:ef01", last4="9876")


async def test_revisions_start_at_one(store: Store) -> None:
    tenant = await store.create_tenant(replace(f.tenant(), revision=42))  # the store assigns it
    key = await store.create_provider_key(replace(f.provider_key(), revision=7))
    route = await store.create_route(f.route())
    client_key = await store.create_client_key(f.client_key())
    assert (tenant.revision, key.revision, route.revision, client_key.revision) == (1, 1, 1, 1)
    assert (await store.get_tenant("acme")).revision == 1
    assert [t.revision for t in await store.list_tenants()] == [1]
    assert (await store.get_provider_key("acme", key.id)).revision == 1
    assert (await store.get_route("acme", route.id)).revision == 1
    assert (await store.get_client_key("acme", client_key.id)).revision == 1
    assert [c.revision for c in await store.list_client_keys("acme")] == [1]


async def test_field_update_writes_only_the_named_columns(store: Store) -> None:
    await store.create_tenant(f.tenant())
    key = await store.create_provider_key(f.provider_key())
    version = await store.latest_version()

    weight = await store.update_provider_key("acme", key.id, ProviderKeyUpdate(updated_at=f.ts(10), weight=9))
    assert weight == replace(key, weight=9, updated_at=f.ts(10), revision=2)

    every = ProviderKeyUpdate(
        updated_at=f.ts(11),
        label="backup",
        status=KeyStatus.DISABLED,
        weight=7,
        allowed_models=(),  # empty is a value (every model), not "unchanged"
        base_url="http://llm.internal:8080/v1",
    )
    updated = await store.update_provider_key("acme", key.id, every)
    expected = replace(
        key,
        label="backup",
        status=KeyStatus.DISABLED,
        weight=7,
        allowed_models=(),
        base_url="http://llm.internal:8080/v1",
        updated_at=f.ts(11),
        revision=3,
    )
    assert updated == expected
    assert await store.get_provider_key("acme", key.id) == expected
    # The secret columns were never part of it.
    assert (updated.secret_ciphertext, updated.fingerprint, updated.last4) == (
        key.secret_ciphertext,
        key.fingerprint,
        key.last4,
    )
    assert await changes(store, version) == [("acme", EntityKind.PROVIDER_KEY, key.id, ChangeOp.PUT)] * 2


async def test_rotation_writes_only_the_secret_columns(store: Store) -> None:
    await store.create_tenant(f.tenant())
    key = await store.create_provider_key(f.provider_key())
    disabled = await store.update_provider_key(
        "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(1), status=KeyStatus.DISABLED, weight=5)
    )
    rotated = await store.update_provider_key("acme", key.id, ProviderKeyUpdate(updated_at=f.ts(2), secret=NEW_SECRET))
    assert rotated == replace(
        disabled,
        secret_ciphertext=NEW_SECRET.ciphertext,
        fingerprint=NEW_SECRET.fingerprint,
        last4=NEW_SECRET.last4,
        updated_at=f.ts(2),
        revision=3,
    )
    # A later field update leaves the rotated secret alone.
    enabled = await store.update_provider_key(
        "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(3), status=KeyStatus.ACTIVE)
    )
    assert (enabled.secret_ciphertext, enabled.fingerprint, enabled.revision) == (
        NEW_SECRET.ciphertext,
        "sha256:ef01",
        4,
    )
    assert "rotated-ciphertext" not in repr(NEW_SECRET)


async def test_stale_revision_is_aborted_and_writes_nothing(store: Store) -> None:
    await store.create_tenant(f.tenant())
    key = await store.create_provider_key(f.provider_key())
    route = await store.create_route(f.route())
    await store.update_provider_key("acme", key.id, ProviderKeyUpdate(updated_at=f.ts(1), weight=4))
    await store.update_route("acme", route.id, RouteUpdate(updated_at=f.ts(1), public_model="chat-2"))
    before_key = await store.get_provider_key("acme", key.id)
    before_route = await store.get_route("acme", route.id)
    version = await store.latest_version()

    with pytest.raises(Aborted, match=r"provider key 'pk_1' in tenant 'acme' was changed since it was read") as info:
        await store.update_provider_key(
            "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(2), secret=NEW_SECRET), expected_revision=1
        )
    assert "revision 2" in str(info.value) and "expected 1" in str(info.value)
    with pytest.raises(Aborted, match="route 'rt_1'"):
        await store.update_route(
            "acme", route.id, RouteUpdate(updated_at=f.ts(2), public_model="chat-3"), expected_revision=1
        )
    assert await store.get_provider_key("acme", key.id) == before_key
    assert await store.get_route("acme", route.id) == before_route
    assert await store.latest_version() == version

    # The current revision passes, once.
    rotated = await store.update_provider_key(
        "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(3), secret=NEW_SECRET), expected_revision=2
    )
    assert (rotated.revision, rotated.fingerprint, rotated.weight) == (3, NEW_SECRET.fingerprint, 4)
    with pytest.raises(Aborted):
        await store.update_provider_key(
            "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(4), weight=1), expected_revision=2
        )
    renamed = await store.update_route(
        "acme", route.id, RouteUpdate(updated_at=f.ts(3), public_model="chat-3"), expected_revision=2
    )
    assert (renamed.public_model, renamed.revision) == ("chat-3", 3)


async def test_update_of_missing_or_foreign_object_is_not_found(store: Store) -> None:
    await store.create_tenant(f.tenant())
    await store.create_tenant(f.tenant("other"))
    key = await store.create_provider_key(f.provider_key())
    route = await store.create_route(f.route())
    version = await store.latest_version()
    for tenant, key_id in [("acme", "nope"), ("other", key.id), ("ghost", key.id)]:
        for expected_revision in (None, 1):
            with pytest.raises(NotFound, match="provider key"):
                await store.update_provider_key(
                    tenant, key_id, ProviderKeyUpdate(updated_at=f.ts(1), weight=2), expected_revision=expected_revision
                )
    for tenant, route_id in [("acme", "nope"), ("other", route.id)]:
        for expected_revision in (None, 1):
            with pytest.raises(NotFound, match="route"):
                await store.update_route(
                    tenant,
                    route_id,
                    RouteUpdate(updated_at=f.ts(1), public_model="x"),
                    expected_revision=expected_revision,
                )
    assert await store.latest_version() == version
    assert await store.get_provider_key("acme", key.id) == key


async def test_update_to_a_taken_name_writes_nothing(store: Store) -> None:
    await store.create_tenant(f.tenant())
    first = await store.create_provider_key(f.provider_key("pk_1", label="one"))
    await store.create_provider_key(f.provider_key("pk_2", label="two", n=1))
    route = await store.create_route(f.route())
    await store.create_route(f.route("rt_2", public_model="taken", n=1))
    version = await store.latest_version()
    with pytest.raises(AlreadyExists, match="label 'two' already exists"):
        await store.update_provider_key("acme", "pk_1", ProviderKeyUpdate(updated_at=f.ts(5), label="two", weight=99))
    with pytest.raises(AlreadyExists, match="public_model 'taken' already exists"):
        await store.update_route("acme", route.id, RouteUpdate(updated_at=f.ts(5), public_model="taken"))
    assert await store.get_provider_key("acme", "pk_1") == first
    assert await store.get_route("acme", route.id) == route
    assert await store.latest_version() == version


async def test_route_update_writes_only_the_named_columns(store: Store) -> None:
    await store.create_tenant(f.tenant())
    route = await store.create_route(f.route())
    targets = (RouteTarget(Provider.ANTHROPIC, "claude-sonnet", priority=0, weight=5),)
    retargeted = await store.update_route("acme", route.id, RouteUpdate(updated_at=f.ts(1), targets=targets))
    assert retargeted == replace(route, targets=targets, updated_at=f.ts(1), revision=2)
    renamed = await store.update_route("acme", route.id, RouteUpdate(updated_at=f.ts(2), public_model="chat-v2"))
    assert renamed == replace(retargeted, public_model="chat-v2", updated_at=f.ts(2), revision=3)
    assert await store.get_route("acme", route.id) == renamed


async def test_concurrent_compare_and_set_lets_exactly_one_through(store: Store) -> None:
    await store.create_tenant(f.tenant())
    key = await store.create_provider_key(f.provider_key())

    async def attempt(weight: int) -> int | None:
        try:
            updated = await store.update_provider_key(
                "acme", key.id, ProviderKeyUpdate(updated_at=f.ts(weight), weight=weight), expected_revision=1
            )
        except Aborted:
            return None
        return updated.weight

    results = await asyncio.gather(*(attempt(w) for w in range(10, 30)))
    winners = [w for w in results if w is not None]
    assert len(winners) == 1
    stored = await store.get_provider_key("acme", key.id)
    assert (stored.weight, stored.revision) == (winners[0], 2)


async def test_concurrent_rotations_and_field_updates_never_undo_each_other(store: Store) -> None:
    await store.create_tenant(f.tenant())
    key = await store.create_provider_key(f.provider_key())

    def secret(i: int) -> SealedSecret:
        return SealedSecret(ciphertext=f"ct-{i}".encode(), fingerprint=f"fp-{i}", last4=f"{i:04d}")

    updates = [ProviderKeyUpdate(updated_at=f.ts(i), secret=secret(i)) for i in range(1, 31)]
    updates += [ProviderKeyUpdate(updated_at=f.ts(i), weight=100 + i) for i in range(1, 31)]
    results = await asyncio.gather(*(store.update_provider_key("acme", key.id, u) for u in updates))
    assert sorted(r.revision for r in results) == list(range(2, 62))  # each write its own revision

    # Replay in revision order: every write shows the latest rotation and the
    # latest weight before it, so none undid another.
    fingerprint, weight = key.fingerprint, key.weight
    for result in sorted(results, key=lambda r: r.revision):
        update = updates[results.index(result)]
        if update.secret is not None:
            fingerprint = update.secret.fingerprint
        if update.weight is not None:
            weight = update.weight
        assert (result.fingerprint, result.weight) == (fingerprint, weight)
    final = await store.get_provider_key("acme", key.id)
    assert (final.fingerprint, final.weight, final.revision) == (fingerprint, weight, 61)
    assert final.secret_ciphertext == f"ct-{fingerprint.removeprefix('fp-')}".encode()


async def test_rows_from_before_revisions_start_at_revision_one(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = backend.open()
    module = sys.modules[type(old).__module__]
    migrations = module.MIGRATIONS
    assert [m.version for m in migrations[:5]] == [1, 2, 3, 4, 5]
    with monkeypatch.context() as patch:
        patch.setattr(module, "MIGRATIONS", migrations[:2])  # the schema before revisions
        await old.migrate()
        await legacy.insert_tenant(old, f.tenant())
        await legacy.insert_provider_key(old, f.provider_key())
        route = f.route()
        await legacy.insert_route(old, route, targets_to_json(route.targets))
        await old.close()

    new = backend.open()
    await new.migrate()
    assert (await new.get_tenant("acme")).revision == 1
    assert await new.get_provider_key("acme", "pk_1") == f.provider_key()
    assert await new.get_route("acme", route.id) == route
    updated = await new.update_provider_key(
        "acme", "pk_1", ProviderKeyUpdate(updated_at=f.ts(1), weight=1), expected_revision=1
    )
    assert updated.revision == 2
