"""API tokens (admin and sidecar) in the store: one behaviour, both stores."""

from __future__ import annotations

import hashlib

import pytest

from control_plane.store import Store
from keyplane.domain import AccessToken, ChangeOp, EntityKind, TokenKind
from keyplane.errors import Aborted, AlreadyExists, NotFound
from tests.store import factories as f
from tests.store.conftest import Backend


def token(
    token_id: str = "st_1",
    kind: TokenKind = TokenKind.SIDECAR,
    *,
    tenants: tuple[str, ...] | None = ("acme", "globex"),
    n: int = 0,
    label: str = "fleet-eu",
) -> AccessToken:
    value = f"kps-value-of-{token_id}"
    return AccessToken(
        id=token_id,
        kind=kind,
        label=label,
        prefix=value[:10],
        token_sha256=hashlib.sha256(value.encode()).digest(),
        tenants=tenants if kind is TokenKind.SIDECAR else None,
        created_at=f.ts(n),
    )


async def test_create_get_list_round_trip(store: Store) -> None:
    sidecar = await store.create_token(token("st_1"))
    every = await store.create_token(token("st_2", tenants=None, n=1, label="all"))
    admin = await store.create_token(token("at_1", TokenKind.ADMIN, n=2, label="ops"))

    assert sidecar.revision == 1 and sidecar.revoked_at is None
    assert await store.get_token(TokenKind.SIDECAR, "st_1") == sidecar
    assert (await store.get_token(TokenKind.SIDECAR, "st_2")).tenants is None
    assert (await store.get_token(TokenKind.SIDECAR, "st_1")).tenants == ("acme", "globex")
    assert await store.get_token(TokenKind.ADMIN, "at_1") == admin
    assert await store.list_tokens(TokenKind.SIDECAR) == [sidecar, every]
    assert await store.list_tokens(TokenKind.ADMIN) == [admin]
    # Kinds do not mix: an admin id is no sidecar token.
    with pytest.raises(NotFound, match="sidecar token 'at_1' not found"):
        await store.get_token(TokenKind.SIDECAR, "at_1")


async def test_every_write_logs_a_global_change(store: Store) -> None:
    version = await store.latest_version()
    await store.create_token(token("st_1"))
    await store.create_token(token("at_1", TokenKind.ADMIN, n=1))
    await store.revoke_token(TokenKind.SIDECAR, "st_1", f.ts(5))
    records = await store.changes_since(version)
    assert [(c.tenant, c.kind, c.entity_id, c.op) for c in records] == [
        ("", EntityKind.SIDECAR_TOKEN, "st_1", ChangeOp.PUT),
        ("", EntityKind.ADMIN_TOKEN, "at_1", ChangeOp.PUT),
        ("", EntityKind.SIDECAR_TOKEN, "st_1", ChangeOp.PUT),
    ]


async def test_revoke_sets_revoked_at_and_bumps_the_revision_once(store: Store) -> None:
    await store.create_token(token("st_1"))
    revoked = await store.revoke_token(TokenKind.SIDECAR, "st_1", f.ts(5))
    assert (revoked.revoked_at, revoked.revision) == (f.ts(5), 2)
    assert await store.get_token(TokenKind.SIDECAR, "st_1") == revoked
    # Again: nothing changes, nothing is logged, the first revocation time stays.
    version = await store.latest_version()
    assert await store.revoke_token(TokenKind.SIDECAR, "st_1", f.ts(9)) == revoked
    assert await store.latest_version() == version
    # Still listed.
    assert await store.list_tokens(TokenKind.SIDECAR) == [revoked]


async def test_revoke_with_a_stale_revision_is_aborted(store: Store) -> None:
    await store.create_token(token("at_1", TokenKind.ADMIN))
    version = await store.latest_version()
    with pytest.raises(Aborted, match="admin token 'at_1' was changed since it was read"):
        await store.revoke_token(TokenKind.ADMIN, "at_1", f.ts(5), expected_revision=7)
    assert (await store.get_token(TokenKind.ADMIN, "at_1")).revoked_at is None
    assert await store.latest_version() == version
    revoked = await store.revoke_token(TokenKind.ADMIN, "at_1", f.ts(5), expected_revision=1)
    assert revoked.revision == 2


async def test_unknown_and_duplicate_tokens(store: Store) -> None:
    with pytest.raises(NotFound, match="admin token 'at_x' not found"):
        await store.revoke_token(TokenKind.ADMIN, "at_x", f.ts(1))
    with pytest.raises(NotFound):
        await store.revoke_token(TokenKind.ADMIN, "at_x", f.ts(1), expected_revision=1)
    await store.create_token(token("st_1"))
    version = await store.latest_version()
    with pytest.raises(AlreadyExists, match="sidecar token 'st_1' already exists"):
        await store.create_token(token("st_1", n=3))
    assert await store.latest_version() == version  # a failed write leaves nothing behind
    assert await store.list_tokens(TokenKind.ADMIN) == []


async def test_tokens_survive_a_reopen(backend: Backend) -> None:
    first = backend.open()
    await first.migrate()
    created = await first.create_token(token("st_1"))
    await first.close()
    again = backend.open()
    await again.migrate()
    assert await again.list_tokens(TokenKind.SIDECAR) == [created]
