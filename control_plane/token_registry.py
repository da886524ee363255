"""The API tokens (admin and sidecar) that authenticate right now, in memory.

Pure: no I/O. The snapshot hub loads it from the store at start and feeds it
every ADMIN_TOKEN / SIDECAR_TOKEN change it reads from the change log, so a
token created or revoked through any replica counts on every replica as soon
as that replica catches up (at once on the writing replica, within a NOTIFY
round trip on the others). The ``Authenticator`` consults it on every call.

Only SHA-256 hashes are held. A presented token is hashed and compared with
every held hash of its kind by ``hmac.compare_digest``, without an early exit.
Streams authenticated by a token can ask to hear of its revocation
(``on_revoke``) and end themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from keyplane.domain import AccessToken, TokenKind

__all__ = ["ManagedToken", "TokenRegistry", "token_sha256"]

log = logging.getLogger(__name__)


def token_sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class ManagedToken:
    """One valid (not revoked) managed token. ``tenants``: a sidecar token's
    scope, None for every tenant (and for admin tokens)."""

    id: str
    kind: TokenKind
    token_sha256: bytes
    tenants: frozenset[str] | None

    def __repr__(self) -> str:
        return f"ManagedToken(id={self.id!r}, kind={self.kind.value!r})"


def _managed(token: AccessToken) -> ManagedToken:
    tenants = None if token.tenants is None else frozenset(token.tenants)
    return ManagedToken(token.id, token.kind, token.token_sha256, tenants)


class TokenRegistry:
    def __init__(self) -> None:
        self._tokens: dict[str, ManagedToken] = {}
        self._by_kind: dict[TokenKind, tuple[ManagedToken, ...]] = dict.fromkeys(TokenKind, ())
        self._watchers: dict[str, list[Callable[[], None]]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    # feeding ---------------------------------------------------------------------
    def load(self, tokens: Iterable[AccessToken]) -> None:
        """Hold exactly the tokens of ``tokens`` that are not revoked."""
        fresh = {t.id: _managed(t) for t in tokens if not t.revoked}
        gone = set(self._tokens) - set(fresh)
        self._tokens = fresh
        self._reindex()
        for token_id in gone:
            self._fire(token_id)

    def apply(self, token: AccessToken) -> None:
        """Take in the token as it is stored now (created or revoked)."""
        if token.revoked:
            self.remove(token.id)
        else:
            self._tokens[token.id] = _managed(token)
            self._reindex()

    def remove(self, token_id: str) -> None:
        """Forget the token (revoked, or gone) and tell its streams."""
        if self._tokens.pop(token_id, None) is not None:
            self._reindex()
        self._fire(token_id)

    def _reindex(self) -> None:
        by_kind: dict[TokenKind, list[ManagedToken]] = {kind: [] for kind in TokenKind}
        for token in self._tokens.values():
            by_kind[token.kind].append(token)
        self._by_kind = {kind: tuple(tokens) for kind, tokens in by_kind.items()}

    # looking up --------------------------------------------------------------------
    def find(self, kind: TokenKind, token: str) -> ManagedToken | None:
        """The valid managed token of ``kind`` whose hash is ``token``'s."""
        digest = token_sha256(token)
        found: ManagedToken | None = None
        for candidate in self._by_kind[kind]:  # no early exit: constant work per token
            if hmac.compare_digest(digest, candidate.token_sha256) and found is None:
                found = candidate
        return found

    def is_valid(self, token_id: str) -> bool:
        return token_id in self._tokens

    # revocation -----------------------------------------------------------------------
    def on_revoke(self, token_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` once when ``token_id`` is revoked (at once when it
        is not valid now); returns a function that cancels the request."""
        if token_id not in self._tokens:
            callback()
            return lambda: None
        self._watchers.setdefault(token_id, []).append(callback)

        def cancel() -> None:
            callbacks = self._watchers.get(token_id)
            if callbacks is not None and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._watchers[token_id]

        return cancel

    def _fire(self, token_id: str) -> None:
        for callback in self._watchers.pop(token_id, []):
            try:
                callback()
            except Exception:
                log.exception("token revocation callback failed")
