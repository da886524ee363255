"""The audit log on both stores: written in the write's own transaction,
and a write whose audit row cannot be written leaves nothing behind."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta, timezone

import asyncpg
import pytest

from control_plane.store import ProviderKeyUpdate, RouteUpdate, SealedSecret, Store
from control_plane.store.base import AuditEntry, AuditQuery
from keyplane.domain import KeyStatus
from keyplane.errors import Aborted, AlreadyExists
from tests.store import factories as f
from tests.store import legacy
from tests.store.conftest import Backend

ROTATED = SealedSecret(ciphertext=b"\x02rotated", fingerprint="0123456789abcdef", last4="9876")


def entry(method: str, kind: str, resource_id: str, n: int = 0, **kwargs: object) -> AuditEntry:
    values: dict[str, object] = {
        "time": f.ts(n),
        "caller": "admin-token:bootstrap",
        "method": method,
        "tenant": "acme",
        "resource_kind": kind,
        "resource_id": resource_id,
    }
    values.update(kwargs)
    return AuditEntry(**values)  # type: ignore[arg-type]


async def all_events(store: Store) -> list[AuditEntry]:
    """Every event, oldest first."""
    return [e.entry for e in reversed(await store.list_audit_events(AuditQuery(limit=10_000)))]


async def test_every_write_records_its_entry(store: Store) -> None:
    writes: list[tuple[AuditEntry, Callable[[AuditEntry], Awaitable[object]]]] = [
        (
            entry("CreateTenant", "tenant", "acme", fields=("name",)),
            lambda a: store.create_tenant(f.tenant(), audit=a),
        ),
        (
            entry("CreateProviderKey", "provider_key", "pk_1", 1, fingerprint="fedcba9876543210"),
            lambda a: store.create_provider_key(f.provider_key(), audit=a),
        ),
        (
            entry("UpdateProviderKey", "provider_key", "pk_1", 2, fields=("status",)),
            lambda a: store.update_provider_key(
                "acme", "pk_1", ProviderKeyUpdate(f.ts(2), status=KeyStatus.DISABLED), audit=a
            ),
        ),
        (
            entry("UpdateProviderKey", "provider_key", "pk_1", 3, fields=("secret",), fingerprint=ROTATED.fingerprint),
            lambda a: store.update_provider_key(
                "acme", "pk_1", ProviderKeyUpdate(f.ts(3), secret=ROTATED), expected_revision=2, audit=a
            ),
        ),
        (
            entry("ResetKeyHealth", "provider_key", "pk_1", 4, fields=("health",)),
            lambda a: store.clear_key_health("acme", "pk_1", audit=a),
        ),
        (entry("CreateRoute", "route", "rt_1", 5), lambda a: store.create_route(f.route(), audit=a)),
        (
            entry("UpdateRoute", "route", "rt_1", 6, fields=("public_model",)),
            lambda a: store.update_route("acme", "rt_1", RouteUpdate(f.ts(6), public_model="chat2"), audit=a),
        ),
        (entry("CreateClientKey", "client_key", "ck_1", 7), lambda a: store.create_client_key(f.client_key(), audit=a)),
        (entry("DeleteClientKey", "client_key", "ck_1", 8), lambda a: store.delete_client_key("acme", "ck_1", audit=a)),
        (entry("DeleteRoute", "route", "rt_1", 9), lambda a: store.delete_route("acme", "rt_1", audit=a)),
        (
            entry("DeleteProviderKey", "provider_key", "pk_1", 10),
            lambda a: store.delete_provider_key("acme", "pk_1", audit=a),
        ),
        (entry("DeleteTenant", "tenant", "acme", 11), lambda a: store.delete_tenant("acme", audit=a)),
    ]
    for number, (audit, write) in enumerate(writes, start=1):
        await write(audit)
        events = await all_events(store)
        assert len(events) == number, audit.method
        assert events[-1] == audit
    # Without audit=: no event (the aggregator's learnt-health writes, and old callers).
    await store.create_tenant(f.tenant("other"))
    await store.create_provider_key(f.provider_key("pk_2", tenant="other"))
    await store.put_key_health(f.key_health("pk_2", tenant="other"))
    await store.clear_key_health("other", "pk_2")
    assert len(await all_events(store)) == len(writes)
    # The record of a tenant outlives it.
    assert [e.method for e in await all_events(store) if e.tenant == "acme"][-1] == "DeleteTenant"


async def test_failed_write_leaves_no_event_but_append_records_one(store: Store) -> None:
    await store.create_tenant(f.tenant())
    with pytest.raises(AlreadyExists):
        await store.create_tenant(f.tenant(), audit=entry("CreateTenant", "tenant", "acme"))
    await store.create_provider_key(f.provider_key())
    with pytest.raises(Aborted):
        await store.update_provider_key(
            "acme",
            "pk_1",
            ProviderKeyUpdate(f.ts(1), weight=9),
            expected_revision=5,
            audit=entry("UpdateProviderKey", "provider_key", "pk_1"),
        )
    assert await all_events(store) == []
    failed = entry("UpdateProviderKey", "provider_key", "pk_1", fields=("weight",), result="ABORTED")
    first = await store.append_audit(failed)
    second = await store.append_audit(replace(failed, result="NOT_FOUND"))
    assert second > first
    assert await all_events(store) == [failed, replace(failed, result="NOT_FOUND")]


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.IntegrityError | asyncpg.CheckViolationError)


async def test_a_refused_audit_row_rolls_the_write_back(store: Store) -> None:
    """The audit table's CHECK constraint (a caller is required) refuses the
    row: the write fails and leaves no entity row and no change-log row."""
    await store.create_tenant(f.tenant())
    await store.create_provider_key(f.provider_key())
    await store.create_route(f.route())
    await store.put_key_health(f.key_health())
    version = await store.latest_version()
    bad = entry("X", "provider_key", "pk_1", caller="")
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: store.create_tenant(f.tenant("beta"), audit=bad),
        lambda: store.delete_tenant("acme", audit=bad),
        lambda: store.create_provider_key(f.provider_key("pk_2", label="second"), audit=bad),
        lambda: store.update_provider_key("acme", "pk_1", ProviderKeyUpdate(f.ts(5), secret=ROTATED), audit=bad),
        lambda: store.delete_provider_key("acme", "pk_1", audit=bad),
        lambda: store.create_route(f.route("rt_2", public_model="other"), audit=bad),
        lambda: store.update_route("acme", "rt_1", RouteUpdate(f.ts(5), public_model="x"), audit=bad),
        lambda: store.delete_route("acme", "rt_1", audit=bad),
        lambda: store.create_client_key(f.client_key(), audit=bad),
        lambda: store.clear_key_health("acme", "pk_1", audit=bad),
    ]
    for attempt in attempts:
        with pytest.raises(Exception) as info:
            await attempt()
        assert _refused(info.value), repr(info.value)
    assert await store.latest_version() == version
    assert [t.name for t in await store.list_tenants()] == ["acme"]
    key = await store.get_provider_key("acme", "pk_1")
    assert (key.fingerprint, key.revision) == (f.provider_key().fingerprint, 1)
    assert [k.id for k in await store.list_provider_keys("acme")] == ["pk_1"]
    route = await store.get_route("acme", "rt_1")
    assert (route.public_model, route.revision) == ("chat", 1)
    assert await store.list_client_keys("acme") == []
    assert await store.get_key_health("acme", "pk_1", "") is not None
    assert await all_events(store) == []
    with pytest.raises(Exception) as info:
        await store.append_audit(bad)
    assert _refused(info.value)


async def test_a_trigger_refusing_the_row_rolls_the_write_back(backend: Backend) -> None:
    """Any failure of the audit insert (here a trigger the test installs) fails the write."""
    store = backend.open()
    await store.migrate()
    if backend.name == "sqlite":
        await legacy.execute(
            store,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events WHEN NEW.tenant = 'refused' "
            "BEGIN SELECT RAISE(ABORT, 'audit refused'); END",
        )
        refused: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    else:
        await legacy.execute(
            store,
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.tenant = 'refused' THEN RAISE EXCEPTION 'audit refused'; END IF; RETURN NEW; END $$",
        )
        await legacy.execute(
            store,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
        )
        refused = (asyncpg.RaiseError,)
    await store.create_tenant(f.tenant("refused"))
    version = await store.latest_version()
    with pytest.raises(refused):
        await store.create_route(
            f.route(tenant="refused"), audit=entry("CreateRoute", "route", "rt_1", tenant="refused")
        )
    assert await store.list_routes("refused") == []
    assert await store.latest_version() == version
    await store.create_route(f.route(tenant="refused"), audit=entry("CreateRoute", "route", "rt_1"))
    assert [e.tenant for e in await all_events(store)] == ["acme"]


async def test_paging_and_filters(store: Store) -> None:
    made: list[AuditEntry] = []
    for n in range(12):
        audit = entry(
            "UpdateRoute" if n % 3 else "UpdateProviderKey",
            "route" if n % 3 else "provider_key",
            f"id_{n % 4}",
            n,
            tenant="acme" if n % 2 else "beta",
        )
        await store.append_audit(audit)
        made.append(audit)
    newest_first = list(reversed(made))

    async def query(**kwargs: object) -> list[AuditEntry]:
        return [e.entry for e in await store.list_audit_events(AuditQuery(**kwargs))]  # type: ignore[arg-type]

    assert await query(limit=100) == newest_first
    page1 = await store.list_audit_events(AuditQuery(limit=5))
    page2 = await store.list_audit_events(AuditQuery(limit=5, before_id=page1[-1].id))
    page3 = await store.list_audit_events(AuditQuery(limit=5, before_id=page2[-1].id))
    assert [e.entry for e in page1 + page2 + page3] == newest_first
    assert len(page3) == 2
    assert await query(limit=0) == []
    assert await query(limit=100, tenant="acme") == [e for e in newest_first if e.tenant == "acme"]
    assert await query(limit=100, resource_kind="provider_key") == [
        e for e in newest_first if e.resource_kind == "provider_key"
    ]
    assert await query(limit=100, resource_id="id_1", tenant="acme") == [
        e for e in newest_first if e.resource_id == "id_1" and e.tenant == "acme"
    ]
    # start inclusive, end exclusive; any time zone.
    window = await query(limit=100, start=f.ts(3), end=f.ts(7).astimezone(timezone(timedelta(hours=5))))
    assert window == [e for e in newest_first if f.ts(3) <= e.time < f.ts(7)]
    assert [e.time for e in window] == [f.ts(n) for n in (6, 5, 4, 3)]
    assert await query(limit=100, tenant="nobody") == []
