"""Master-key rewrapping on both stores: paging every tenant's sealed
secrets, and the compare-and-set rewrite that touches nothing but the
ciphertext (no revision, no updated_at, no change-log row)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from control_plane.store import ProviderKeyUpdate, SealedSecret, Store
from control_plane.store.base import SecretRewrap, StoredSecret
from tests.store import factories as f
from tests.store.conftest import Backend


async def _seed(store: Store) -> None:
    await store.create_tenant(f.tenant("acme"))
    await store.create_tenant(f.tenant("beta", n=1))
    for n, (tenant, key_id) in enumerate([("acme", "pk_c"), ("beta", "pk_a"), ("acme", "pk_b"), ("beta", "pk_d")]):
        key = f.provider_key(key_id, tenant=tenant, label=f"l{n}", n=n)
        await store.create_provider_key(replace(key, secret_ciphertext=f"old-{key_id}".encode()))


async def test_list_sealed_secrets_pages_every_tenant_by_key_id(store: Store) -> None:
    assert await store.list_sealed_secrets() == []
    await _seed(store)
    first = await store.list_sealed_secrets(limit=3)
    assert first == [
        StoredSecret("beta", "pk_a", b"old-pk_a"),
        StoredSecret("acme", "pk_b", b"old-pk_b"),
        StoredSecret("acme", "pk_c", b"old-pk_c"),
    ]
    rest = await store.list_sealed_secrets(after=first[-1].key_id, limit=3)
    assert rest == [StoredSecret("beta", "pk_d", b"old-pk_d")]
    assert await store.list_sealed_secrets(after="pk_d") == []
    assert await store.list_sealed_secrets(limit=0) == []


async def test_rewrap_writes_only_the_ciphertext_and_logs_nothing(store: Store) -> None:
    await _seed(store)
    before = {k.id: k for t in ("acme", "beta") for k in await store.list_provider_keys(t)}
    version = await store.latest_version()

    done = await store.rewrap_secrets(
        [
            SecretRewrap("acme", "pk_b", b"old-pk_b", b"new-pk_b"),
            SecretRewrap("beta", "pk_a", b"old-pk_a", b"new-pk_a"),
        ]
    )
    assert done == ["pk_b", "pk_a"]
    assert await store.latest_version() == version  # no change row: sidecars see nothing
    after = {k.id: k for t in ("acme", "beta") for k in await store.list_provider_keys(t)}
    assert after["pk_b"] == replace(before["pk_b"], secret_ciphertext=b"new-pk_b")  # same revision, updated_at
    assert after["pk_a"] == replace(before["pk_a"], secret_ciphertext=b"new-pk_a")
    assert after["pk_c"] == before["pk_c"]
    assert after["pk_d"] == before["pk_d"]
    assert await store.rewrap_secrets([]) == []


async def test_rewrap_is_a_compare_and_set_on_the_old_ciphertext(store: Store) -> None:
    await _seed(store)
    # A rotation wins over a rewrap that read the secret before it.
    rotated = SealedSecret(ciphertext=b"rotated-pk_c", fingerprint="sha256:new", last4="new4")
    await store.update_provider_key("acme", "pk_c", ProviderKeyUpdate(updated_at=f.ts(50), secret=rotated))
    await store.delete_provider_key("beta", "pk_d")
    done = await store.rewrap_secrets(
        [
            SecretRewrap("acme", "pk_c", b"old-pk_c", b"rewrapped-pk_c"),  # stale: rotated meanwhile
            SecretRewrap("beta", "pk_d", b"old-pk_d", b"rewrapped-pk_d"),  # deleted meanwhile
            SecretRewrap("beta", "pk_b", b"old-pk_b", b"rewrapped-pk_b"),  # wrong tenant
            SecretRewrap("acme", "pk_b", b"old-pk_b", b"rewrapped-pk_b"),
        ]
    )
    assert done == ["pk_b"]
    key = await store.get_provider_key("acme", "pk_c")
    assert (key.secret_ciphertext, key.fingerprint, key.revision) == (b"rotated-pk_c", "sha256:new", 2)
    # Running the same batch again changes nothing (idempotent).
    assert await store.rewrap_secrets([SecretRewrap("acme", "pk_b", b"old-pk_b", b"rewrapped-pk_b")]) == []
    assert (await store.get_provider_key("acme", "pk_b")).secret_ciphertext == b"rewrapped-pk_b"


async def test_concurrent_rotations_and_rewraps_never_lose_a_rotation(backend: Backend) -> None:
    """Two connections (two replicas on Postgres): every key is rotated and
    rewrapped at the same time; each rotation survives."""
    writer, rewrapper = backend.open(), backend.open()
    await writer.migrate()
    await rewrapper.migrate()
    await writer.create_tenant(f.tenant())
    ids = [f"pk_{n:03d}" for n in range(30)]
    for n, key_id in enumerate(ids):
        await writer.create_provider_key(
            replace(f.provider_key(key_id, label=f"l{n}", n=n), secret_ciphertext=f"old-{key_id}".encode())
        )

    async def rotate(key_id: str) -> None:
        secret = SealedSecret(ciphertext=f"rotated-{key_id}".encode(), fingerprint="sha256:r", last4="rrrr")
        await writer.update_provider_key("acme", key_id, ProviderKeyUpdate(updated_at=f.ts(99), secret=secret))

    async def rewrap(chunk: list[str]) -> list[str]:
        return await rewrapper.rewrap_secrets(
            [SecretRewrap("acme", k, f"old-{k}".encode(), f"rewrapped-{k}".encode()) for k in chunk]
        )

    rotated = ids[::2]
    results = await asyncio.gather(
        *(rotate(k) for k in rotated), *(rewrap(ids[i : i + 10]) for i in range(0, len(ids), 10))
    )
    rewrapped = {k for r in results if r for k in r}
    for key_id in ids:
        key = await writer.get_provider_key("acme", key_id)
        if key_id in rotated:
            assert key.secret_ciphertext == f"rotated-{key_id}".encode()
            assert key.revision == 2
        else:
            assert key.secret_ciphertext == f"rewrapped-{key_id}".encode()
            assert key_id in rewrapped
            assert key.revision == 1
