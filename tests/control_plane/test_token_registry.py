"""The token registry, fed by hand (no store, no server)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime

from control_plane.token_registry import TokenRegistry, token_sha256
from keyplane.domain import AccessToken, TokenKind

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def token(
    token_id: str, value: str, kind: TokenKind = TokenKind.SIDECAR, tenants: tuple[str, ...] | None = None
) -> AccessToken:
    return AccessToken(
        id=token_id,
        kind=kind,
        label="x",
        prefix=value[:10],
        token_sha256=hashlib.sha256(value.encode()).digest(),
        tenants=tenants,
        created_at=NOW,
    )


def test_find_by_kind_and_scope() -> None:
    registry = TokenRegistry()
    registry.load(
        [
            token("st_1", "kps-one", tenants=("acme", "globex")),
            token("st_2", "kps-two"),
            token("at_1", "kpa-one", TokenKind.ADMIN),
            replace(token("st_3", "kps-three"), revoked_at=NOW),  # revoked: not held
        ]
    )
    assert len(registry) == 3
    found = registry.find(TokenKind.SIDECAR, "kps-one")
    assert found is not None and (found.id, found.tenants) == ("st_1", frozenset({"acme", "globex"}))
    found = registry.find(TokenKind.SIDECAR, "kps-two")
    assert found is not None and found.tenants is None
    assert registry.find(TokenKind.SIDECAR, "kpa-one") is None  # an admin token is no sidecar token
    assert registry.find(TokenKind.ADMIN, "kpa-one") is not None
    assert registry.find(TokenKind.SIDECAR, "kps-three") is None
    assert registry.find(TokenKind.SIDECAR, "kps-on") is None
    assert "kps-one" not in repr(found) and token_sha256("kps-two").hex() not in repr(found)


def test_revocation_reaches_watchers_once() -> None:
    registry = TokenRegistry()
    registry.apply(token("st_1", "kps-one"))
    fired: list[str] = []
    registry.on_revoke("st_1", lambda: fired.append("a"))
    cancel_b = registry.on_revoke("st_1", lambda: fired.append("b"))
    cancel_b()
    registry.apply(token("st_1", "kps-one"))  # a re-read of a valid token changes nothing
    assert fired == []
    registry.apply(replace(token("st_1", "kps-one"), revoked_at=NOW, revision=2))
    assert fired == ["a"]
    assert registry.find(TokenKind.SIDECAR, "kps-one") is None and not registry.is_valid("st_1")
    registry.remove("st_1")
    assert fired == ["a"]
    # Asking about a token that is not valid (any more) answers at once.
    registry.on_revoke("st_1", lambda: fired.append("late"))
    assert fired == ["a", "late"]


def test_a_reload_without_a_token_revokes_it() -> None:
    registry = TokenRegistry()
    registry.load([token("st_1", "kps-one"), token("st_2", "kps-two")])
    fired: list[str] = []
    registry.on_revoke("st_1", lambda: fired.append("st_1"))
    registry.on_revoke("st_2", lambda: fired.append("st_2"))
    registry.load([token("st_2", "kps-two")])
    assert fired == ["st_1"]
    assert registry.is_valid("st_2") and not registry.is_valid("st_1")
