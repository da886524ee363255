"""Online master-key rotation: which master key seals each provider secret,
and re-encrypting them all under the primary key.

Rewrapping reads the store's sealed secrets page by page (by key id), opens
each one not yet under the primary key with the key it names and seals it
again with the primary, and writes each page in one transaction with a
compare-and-set on the old ciphertext: a secret rotated (or a key deleted)
meanwhile is left alone, so the newer write always wins. The plaintext, the
key's revision and the change log are untouched, so sidecars see nothing.
A secret already under the primary is skipped, so an interrupted run just
runs again. A call works for at most ``time_budget`` seconds and returns
where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.store.base import AuditEntry, SecretRewrap, Store
from keyplane.crypto import MasterKeyError
from keyplane.keyring import Keyring, MasterKeys, UnknownMasterKey, ciphertext_key_id

__all__ = ["DEFAULT_BATCH", "MAX_BATCH", "KeyUsage", "RewrapProgress", "key_usage", "rewrap_secrets"]

log = logging.getLogger(__name__)

DEFAULT_BATCH = 100
MAX_BATCH = 1000
_USAGE_PAGE = 1000


@dataclass(slots=True)
class RewrapProgress:
    examined: int = 0
    rewrapped: int = 0
    already_current: int = 0
    skipped_changed: int = 0
    unreadable: int = 0
    # The last key id examined when the call stopped early; "" when done.
    next_after: str = ""


@dataclass(frozen=True, slots=True)
class KeyUsage:
    ring: Keyring
    # master key id -> secrets it seals; "" for legacy ciphertexts no key opens.
    secrets: dict[str, int]
    total: int


async def key_usage(store: Store, keys: MasterKeys) -> KeyUsage:
    """How many provider secrets each master key seals (every tenant)."""
    ring = keys.current()
    counts: Counter[str] = Counter()
    after = ""
    while True:
        page = await store.list_sealed_secrets(after, _USAGE_PAGE)
        for secret in page:
            try:
                key_id = ring.sealed_by(secret.ciphertext, secret.key_id)
            except MasterKeyError:
                key_id = None
            counts[key_id or ""] += 1
        if len(page) < _USAGE_PAGE:
            break
        after = page[-1].key_id
    return KeyUsage(ring=ring, secrets=dict(counts), total=sum(counts.values()))


async def rewrap_secrets(
    store: Store,
    keys: MasterKeys,
    *,
    after: str = "",
    batch_size: int = DEFAULT_BATCH,
    time_budget: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    audit: AuditEntry | None = None,
) -> RewrapProgress:
    """Re-encrypt the secrets after key id ``after`` under the primary key,
    ``batch_size`` per transaction, until done or ``time_budget`` is spent;
    each transaction that rewrites a secret records ``audit`` with it."""
    ring = keys.current()
    primary = ring.primary_id
    deadline = clock() + time_budget
    progress = RewrapProgress()
    while True:
        page = await store.list_sealed_secrets(after, batch_size)
        batch: list[SecretRewrap] = []
        for secret in page:
            progress.examined += 1
            try:
                if ciphertext_key_id(secret.ciphertext) == primary:
                    progress.already_current += 1
                    continue
                plain = keys.open(secret.ciphertext, secret.key_id)
            except MasterKeyError as exc:
                progress.unreadable += 1
                if isinstance(exc, UnknownMasterKey):
                    reason = f"is sealed with master key {exc.key_id}, which is not in the keyring"
                else:
                    reason = "does not open with the keyring"
                log.error("provider key %s of tenant %s %s; not rewrapped", secret.key_id, secret.tenant, reason)
                continue
            batch.append(SecretRewrap(secret.tenant, secret.key_id, secret.ciphertext, ring.seal(plain, secret.key_id)))
        done = await store.rewrap_secrets(batch, audit=audit)
        progress.rewrapped += len(done)
        progress.skipped_changed += len(batch) - len(done)
        if len(page) < batch_size:
            progress.next_after = ""
            return progress
        after = page[-1].key_id
        if clock() >= deadline:
            progress.next_after = after
            return progress
