"""Affinity bindings (tenant, client key, public model) -> node, for both SQL
stores: :class:`BindingsSql` (issue 14).

A hit is one plain SELECT (``find_binding``): no lock, no write. A miss goes
through ``claim_binding``: one transaction that first takes the triple's
lock (``_lock_binding``: ``pg_advisory_xact_lock`` on a 64-bit hash of the
triple on Postgres; SQLite's single writer needs none), reads again, and
keeps, creates or moves ONE row. Only a move (and a deletion) appends a
change row (kind BINDING), so sidecars holding the binding replace it;
creations, refreshes and sweeps do not (a sidecar's cached binding expires
on its own). Deleting the client key, node, route or tenant cascades.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from control_plane.store._nodes import NODE_HEALTH_COLUMNS, NodesSql
from control_plane.store._rows import Row
from control_plane.store._sql_base import Conn
from control_plane.store.base import AuditEntry, BindingFilter
from keyplane.affinity import Binding, BindingKey, BindingResult, BindingView, NodeState, binding_entity_id
from keyplane.domain import ChangeOp, EntityKind
from keyplane.errors import FailedPrecondition, NotFound

__all__ = ["BindingsSql"]

_COLUMNS = (
    "b.tenant, b.client_key_id, b.public_model, b.node_id, n.url AS node_url, "
    "b.created_at, b.updated_at, b.expires_at, b.moves"
)
_FROM = "FROM bindings b JOIN nodes n ON n.id = b.node_id"


def _where(where: BindingFilter) -> tuple[str, list[Any]]:
    sql = " WHERE b.tenant = ?"
    params: list[Any] = [where.tenant]
    for column, value in (
        ("client_key_id", where.client_key_id),
        ("public_model", where.public_model),
        ("node_id", where.node_id),
    ):
        if value:
            sql += f" AND b.{column} = ?"
            params.append(value)
    return sql, params


class BindingsSql(NodesSql[Conn]):
    """The binding methods of ``Store``."""

    async def _lock_binding(self, conn: Conn, key: BindingKey) -> None:
        """Serialise every claim of ``key`` until the transaction ends. The
        SQLite store's transactions are serialised already."""

    def _binding(self, row: Row) -> Binding:
        enc = self._encoding
        return Binding(
            key=BindingKey(row["tenant"], row["client_key_id"], row["public_model"]),
            node_id=row["node_id"],
            node_url=row["node_url"],
            created_at=enc.time_from(row["created_at"]),
            updated_at=enc.time_from(row["updated_at"]),
            expires_at=enc.time_from(row["expires_at"]),
            moves=int(row["moves"]),
        )

    async def _read_binding(self, conn: Conn, key: BindingKey) -> Row | None:
        health = ", ".join(f"h.{c} AS h_{c}" for c in NODE_HEALTH_COLUMNS.split(", "))
        return await self._fetchone(
            conn,
            f"SELECT {_COLUMNS}, n.state AS node_state, {health} {_FROM} "
            "LEFT JOIN node_health h ON h.node_id = b.node_id "
            "WHERE b.client_key_id = ? AND b.public_model = ? AND b.tenant = ?",
            (key.client_key_id, key.public_model, key.tenant),
        )

    def _view(self, row: Row) -> BindingView:
        health = None
        if row["h_node_id"] is not None:
            health = self._node_health({c: row[f"h_{c}"] for c in NODE_HEALTH_COLUMNS.split(", ")})
        return BindingView(self._binding(row), NodeState(row["node_state"]), health)

    async def find_binding(self, key: BindingKey) -> BindingView | None:
        """The binding of ``key`` (live or expired) with its node's state and
        health: one SELECT, no lock, no write."""
        async with self._session() as conn:
            row = await self._read_binding(conn, key)
        return None if row is None else self._view(row)

    async def claim_binding(
        self, key: BindingKey, keep: frozenset[str], candidate: str, now: datetime, expires_at: datetime
    ) -> tuple[Binding, BindingResult]:
        """Under the triple's lock: a live binding whose node is in ``keep`` is
        returned as it is (HIT: another claim made it meanwhile); otherwise the
        binding is created (CREATED; an expired row is replaced) or moved to
        ``candidate`` (MOVED, logged). NotFound for an unknown client key;
        FailedPrecondition when ``candidate`` is not an ACTIVE node of the
        tenant (removed meanwhile)."""
        enc = self._encoding
        async with self._transaction() as conn:
            await self._lock_binding(conn, key)
            row = await self._read_binding(conn, key)
            current = None if row is None else self._binding(row)
            if current is not None and current.live(now) and current.node_id in keep:
                return current, BindingResult.HIT
            sql = f"SELECT 1 FROM client_keys WHERE tenant = ? AND id = ?{self._share_lock}"  # noqa: S608
            if await self._fetchone(conn, sql, (key.tenant, key.client_key_id)) is None:
                raise NotFound(f"client key {key.client_key_id!r} not found in tenant {key.tenant!r}")
            sql = f"SELECT state FROM nodes WHERE tenant = ? AND id = ?{self._share_lock}"  # noqa: S608
            node = await self._fetchone(conn, sql, (key.tenant, candidate))
            if node is None or NodeState(node["state"]) is not NodeState.ACTIVE:
                raise FailedPrecondition(f"node {candidate!r} is not an active node of tenant {key.tenant!r}")
            params = (enc.time(now, "now"), enc.time(expires_at, "expires_at"))
            if current is None:
                await self._execute(
                    conn,
                    "INSERT INTO bindings (tenant, client_key_id, public_model, node_id, created_at, updated_at, "
                    "expires_at, moves) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                    (key.tenant, key.client_key_id, key.public_model, candidate, params[0], *params),
                )
                result = BindingResult.CREATED
            elif not current.live(now):
                await self._execute(
                    conn,
                    "UPDATE bindings SET node_id = ?, created_at = ?, updated_at = ?, expires_at = ?, moves = 0 "
                    "WHERE client_key_id = ? AND public_model = ?",
                    (candidate, params[0], *params, key.client_key_id, key.public_model),
                )
                result = BindingResult.CREATED
            else:
                await self._execute(
                    conn,
                    "UPDATE bindings SET node_id = ?, updated_at = ?, expires_at = ?, moves = moves + 1 "
                    "WHERE client_key_id = ? AND public_model = ?",
                    (candidate, *params, key.client_key_id, key.public_model),
                )
                result = BindingResult.MOVED
            row = await self._read_binding(conn, key)
            assert row is not None
            if result is BindingResult.MOVED:
                entity_id = binding_entity_id(key.client_key_id, key.public_model)
                await self._log(conn, key.tenant, EntityKind.BINDING, entity_id, ChangeOp.PUT)
        return self._binding(row), result

    async def refresh_bindings(
        self, refs: Sequence[tuple[BindingKey, str]], now: datetime, expires_at: datetime
    ) -> tuple[int, list[Binding], list[tuple[BindingKey, str]]]:
        """Push each binding's expiry to ``expires_at`` where it still names
        the node given and that node is ACTIVE (a draining node's bindings run
        out). Returns how many were refreshed, the others that exist as they
        stand, and the refs of those that do not exist."""
        enc = self._encoding
        refreshed = 0
        current: list[Binding] = []
        gone: list[tuple[BindingKey, str]] = []
        async with self._transaction() as conn:
            for key, node_id in dict.fromkeys(refs):
                changed = await self._execute(
                    conn,
                    "UPDATE bindings SET updated_at = ?, expires_at = ? "
                    "WHERE client_key_id = ? AND public_model = ? AND tenant = ? AND node_id = ? "
                    "AND expires_at > ? AND expires_at < ? "
                    "AND node_id IN (SELECT id FROM nodes WHERE state = ?)",
                    (
                        enc.time(now, "now"),
                        enc.time(expires_at, "expires_at"),
                        key.client_key_id,
                        key.public_model,
                        key.tenant,
                        node_id,
                        enc.time(now, "now"),
                        enc.time(expires_at, "expires_at"),
                        NodeState.ACTIVE.value,
                    ),
                )
                if changed:
                    refreshed += 1
                    continue
                row = await self._read_binding(conn, key)
                if row is None:
                    gone.append((key, node_id))
                else:
                    current.append(self._binding(row))
        return refreshed, current, gone

    async def list_bindings(
        self, where: BindingFilter, *, after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[Binding]:
        """Matching bindings (expired ones not swept yet included) ordered by
        client key id then public model, after the pair ``after``."""
        sql, params = _where(where)
        if after is not None:
            sql += " AND (b.client_key_id > ? OR (b.client_key_id = ? AND b.public_model > ?))"
            params += [after[0], after[0], after[1]]
        params.append(max(limit, 0))
        order = f" ORDER BY b.client_key_id{self._bytewise}, b.public_model{self._bytewise} LIMIT ?"
        async with self._session() as conn:
            await self._require_tenant(conn, where.tenant)
            rows = await self._fetchall(conn, f"SELECT {_COLUMNS} {_FROM}{sql}{order}", params)
        return [self._binding(r) for r in rows]

    async def delete_bindings(self, where: BindingFilter, *, audit: AuditEntry | None = None) -> tuple[int, int | None]:
        """Delete the matching bindings, logging each (kind BINDING, DELETE).
        Returns how many and the last version logged (None: none matched)."""
        sql, params = _where(where)
        version: int | None = None
        async with self._transaction() as conn:
            await self._require_tenant(conn, where.tenant)
            order = f" ORDER BY b.client_key_id{self._bytewise}, b.public_model{self._bytewise}"
            select = f"SELECT b.client_key_id, b.public_model FROM bindings b{sql}{order}"  # noqa: S608
            rows = await self._fetchall(conn, select, params)
            for row in rows:
                await self._execute(
                    conn,
                    "DELETE FROM bindings WHERE client_key_id = ? AND public_model = ?",
                    (row["client_key_id"], row["public_model"]),
                )
            await self._audit(conn, audit)
            for row in rows:
                entity_id = binding_entity_id(row["client_key_id"], row["public_model"])
                version = await self._log(conn, where.tenant, EntityKind.BINDING, entity_id, ChangeOp.DELETE)
        return len(rows), version

    async def count_bindings(self, tenant: str, now: datetime) -> dict[str, int]:
        """Live bindings of a tenant per node id."""
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                "SELECT node_id, COUNT(*) AS n FROM bindings WHERE tenant = ? AND expires_at > ? GROUP BY node_id",
                (tenant, self._encoding.time(now, "now")),
            )
        return {r["node_id"]: int(r["n"]) for r in rows}

    async def sweep_bindings(self, now: datetime, limit: int = 1000) -> int:
        """Delete at most ``limit`` bindings expired at ``now``, oldest expiry
        first, in one statement; returns how many. Not logged."""
        if limit <= 0:
            return 0
        async with self._transaction() as conn:
            return await self._execute(
                conn,
                "DELETE FROM bindings WHERE (client_key_id, public_model) IN ("
                "SELECT client_key_id, public_model FROM bindings WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
                (self._encoding.time(now, "now"), limit),
            )
