"""Nodes of vllm targets and their learnt health, for both SQL stores:
:class:`NodesSql` (issue 14).

A node's id is derived from (route id, URL) (``keyplane.affinity.node_id_for``),
so a target's node_urls and AddNode name the same node, on every replica.
Every change of a node or of its health appends one change row (kinds NODE
and NODE_HEALTH), which the hub turns into ``node_put`` / ``node_health``.
Removing a node deletes its bindings (no change row per binding: the
REMOVED node_put tells sidecars to forget them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from control_plane.store import _codec
from control_plane.store._rows import Row
from control_plane.store._sql_base import Conn
from control_plane.store.base import AuditEntry
from control_plane.store.sidecar_status import SidecarStatusSql
from keyplane.affinity import NodeHealth, NodeState, SelfHostedNode, node_id_for
from keyplane.domain import ChangeOp, EntityKind, HealthState

__all__ = ["NODE_COLUMNS", "NODE_HEALTH_COLUMNS", "NodesSql"]

NODE_COLUMNS = "id, tenant, route_id, url, upstream_model, state, from_route, created_at, updated_at, revision"
NODE_HEALTH_COLUMNS = "tenant, node_id, state, until, reason, updated_at"


class NodesSql(SidecarStatusSql[Conn]):
    """The node methods of ``Store``."""

    # rows ----------------------------------------------------------------------

    def _node(self, row: Row) -> SelfHostedNode:
        enc = self._encoding
        return SelfHostedNode(
            id=row["id"],
            tenant=row["tenant"],
            route_id=row["route_id"],
            url=row["url"],
            upstream_model=row["upstream_model"],
            state=NodeState(row["state"]),
            from_route=bool(row["from_route"]),
            created_at=enc.time_from(row["created_at"]),
            updated_at=enc.time_from(row["updated_at"]),
            revision=int(row["revision"]),
        )

    def _node_health(self, row: Row) -> NodeHealth:
        until = row["until"]
        return NodeHealth(
            tenant=row["tenant"],
            node_id=row["node_id"],
            state=HealthState(row["state"]),
            until=None if until is None else self._encoding.time_from(until),
            reason=row["reason"],
            updated_at=self._encoding.time_from(row["updated_at"]),
        )

    async def _insert_node(self, conn: Conn, node: SelfHostedNode) -> None:
        enc = self._encoding
        await self._execute(
            conn,
            f"INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",  # noqa: S608
            (
                node.id,
                node.tenant,
                node.route_id,
                node.url,
                node.upstream_model,
                node.state.value,
                node.from_route,
                enc.time(node.created_at, "created_at"),
                enc.time(node.updated_at, "updated_at"),
            ),
        )

    async def _write_state(self, conn: Conn, node_id: str, state: NodeState, now: datetime) -> Row:
        row = await self._fetchone(
            conn,
            f"UPDATE nodes SET state = ?, updated_at = ?, revision = revision + 1 WHERE id = ? "  # noqa: S608
            f"RETURNING {NODE_COLUMNS}",
            (state.value, self._encoding.time(now, "updated_at"), node_id),
        )
        assert row is not None
        if state is NodeState.REMOVED:
            await self._execute(conn, "DELETE FROM bindings WHERE node_id = ?", (node_id,))
            await self._execute(conn, "DELETE FROM node_health WHERE node_id = ?", (node_id,))
        return row

    async def _require_route(self, conn: Conn, tenant: str, route_id: str) -> None:
        sql = f"SELECT 1 FROM routes WHERE tenant = ? AND id = ?{self._share_lock}"  # noqa: S608
        if await self._fetchone(conn, sql, (tenant, route_id)) is None:
            await self._require_tenant(conn, tenant)
            raise _codec.not_found("routes", tenant, route_id)

    # nodes -----------------------------------------------------------------------

    async def sync_route_nodes(
        self, tenant: str, route_id: str, pool: Sequence[tuple[str, str]], now: datetime
    ) -> list[int]:
        """Make the route's node rows follow its targets' node_urls; ``pool``:
        (upstream model, url) of every node URL of every vllm target. A URL
        new to the route becomes an ACTIVE node; a node from node_urls whose
        URL is gone is REMOVED; a node an admin removed stays removed.
        Idempotent; returns the versions of the changes it logged."""
        versions: list[int] = []
        async with self._transaction() as conn:
            await self._require_route(conn, tenant, route_id)
            rows = await self._fetchall(
                conn,
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE route_id = ?",  # noqa: S608
                (route_id,),
            )
            existing = {r["id"]: self._node(r) for r in rows}
            wanted = {node_id_for(route_id, url): (model, url) for model, url in pool}
            for node_id, (model, url) in wanted.items():
                if node_id not in existing:
                    node = SelfHostedNode(node_id, tenant, route_id, url, model, NodeState.ACTIVE, True, now, now)
                    await self._insert_node(conn, node)
                    versions.append(await self._log(conn, tenant, EntityKind.NODE, node_id, ChangeOp.PUT))
            for node in existing.values():
                if node.from_route and node.id not in wanted and node.state is not NodeState.REMOVED:
                    await self._write_state(conn, node.id, NodeState.REMOVED, now)
                    versions.append(await self._log(conn, tenant, EntityKind.NODE, node.id, ChangeOp.PUT))
        return versions

    async def add_node(
        self, node: SelfHostedNode, *, audit: AuditEntry | None = None
    ) -> tuple[SelfHostedNode, int | None]:
        """Insert ``node`` (its id must be ``node_id_for(route_id, url)``); a
        node already there is returned as it is, or made ACTIVE again when it
        was REMOVED. Returns the node and the version logged (None: no change)."""
        if node.id != node_id_for(node.route_id, node.url):
            raise ValueError("node id must be node_id_for(route_id, url)")
        async with self._transaction() as conn:
            await self._require_route(conn, node.tenant, node.route_id)
            row = await self._fetchone(
                conn,
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?",  # noqa: S608
                (node.id,),
            )
            if row is not None and NodeState(row["state"]) is not NodeState.REMOVED:
                await self._audit(conn, audit)
                return self._node(row), None
            if row is None:
                await self._insert_node(conn, node)
                row = await self._fetchone(conn, f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (node.id,))  # noqa: S608
            else:
                row = await self._write_state(conn, node.id, NodeState.ACTIVE, node.updated_at)
            assert row is not None
            await self._audit(conn, audit)
            version = await self._log(conn, node.tenant, EntityKind.NODE, node.id, ChangeOp.PUT)
        return self._node(row), version

    async def set_node_state(
        self,
        tenant: str,
        node_id: str,
        state: NodeState,
        now: datetime,
        *,
        expected_revision: int | None = None,
        audit: AuditEntry | None = None,
    ) -> tuple[SelfHostedNode, int, int | None]:
        """Drain or remove a node (REMOVED also deletes its bindings and
        health). Returns the node, the bindings deleted and the version
        logged (None when the node was in that state already)."""
        async with self._transaction() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE tenant = ? AND id = ?",  # noqa: S608
                (tenant, node_id),
            )
            if row is None:
                await self._require_tenant(conn, tenant)
                raise _codec.not_found("nodes", tenant, node_id)
            if expected_revision is not None and int(row["revision"]) != expected_revision:
                raise _codec.stale("nodes", tenant, node_id, expected_revision, int(row["revision"]))
            if NodeState(row["state"]) is state:
                await self._audit(conn, audit)
                return self._node(row), 0, None
            deleted = 0
            if state is NodeState.REMOVED:
                counted = await self._fetchone(conn, "SELECT COUNT(*) AS n FROM bindings WHERE node_id = ?", (node_id,))
                deleted = int(counted["n"]) if counted is not None else 0
            row = await self._write_state(conn, node_id, state, now)
            await self._audit(conn, audit)
            version = await self._log(conn, tenant, EntityKind.NODE, node_id, ChangeOp.PUT)
        return self._node(row), deleted, version

    async def get_node(self, tenant: str, node_id: str) -> SelfHostedNode:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE tenant = ? AND id = ?",  # noqa: S608
                (tenant, node_id),
            )
        if row is None:
            raise _codec.not_found("nodes", tenant, node_id)
        return self._node(row)

    async def list_nodes(
        self, tenant: str, route_id: str = "", *, include_removed: bool = False
    ) -> list[SelfHostedNode]:
        """A tenant's nodes (of one route when ``route_id``), oldest first;
        NotFound if no such tenant."""
        sql = f"SELECT {NODE_COLUMNS} FROM nodes WHERE tenant = ?"  # noqa: S608
        params: list[Any] = [tenant]
        if route_id:
            sql += " AND route_id = ?"
            params.append(route_id)
        if not include_removed:
            sql += " AND state <> ?"
            params.append(NodeState.REMOVED.value)
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(conn, sql + " ORDER BY created_at, id", params)
        return [self._node(r) for r in rows]

    # learnt node health ----------------------------------------------------------

    async def put_node_health(self, health: NodeHealth) -> int | None:
        """Like ``put_key_health``: HEALTHY deletes the row; a call that
        changes nothing logs nothing and returns None. NotFound for an
        unknown node."""
        enc = self._encoding
        async with self._transaction() as conn:
            sql = f"SELECT 1 FROM nodes WHERE tenant = ? AND id = ?{self._share_lock}"  # noqa: S608
            if await self._fetchone(conn, sql, (health.tenant, health.node_id)) is None:
                raise _codec.not_found("nodes", health.tenant, health.node_id)
            if health.state is HealthState.HEALTHY:
                changed = await self._execute(conn, "DELETE FROM node_health WHERE node_id = ?", (health.node_id,)) > 0
                op = ChangeOp.DELETE
            else:
                values = (
                    health.tenant,
                    health.node_id,
                    health.state.value,
                    None if health.until is None else enc.time(health.until, "until"),
                    health.reason,
                    enc.time(health.updated_at, "updated_at"),
                )
                upsert = (
                    f"INSERT INTO node_health ({NODE_HEALTH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "  # noqa: S608
                    "ON CONFLICT (node_id) DO UPDATE SET state = excluded.state, until = excluded.until, "
                    "reason = excluded.reason, updated_at = excluded.updated_at "
                    f"WHERE {self._health_changed.format(t='node_health')} RETURNING 1"
                )
                changed = await self._fetchone(conn, upsert, values) is not None
                op = ChangeOp.PUT
            if not changed:
                return None
            return await self._log(conn, health.tenant, EntityKind.NODE_HEALTH, health.node_id, op)

    async def get_node_health(self, tenant: str, node_id: str) -> NodeHealth | None:
        async with self._session() as conn:
            row = await self._fetchone(
                conn,
                f"SELECT {NODE_HEALTH_COLUMNS} FROM node_health WHERE tenant = ? AND node_id = ?",  # noqa: S608
                (tenant, node_id),
            )
        return None if row is None else self._node_health(row)

    async def list_node_health(self, tenant: str) -> list[NodeHealth]:
        """Non-healthy entries of a tenant by node id; NotFound if no such tenant."""
        async with self._session() as conn:
            await self._require_tenant(conn, tenant)
            rows = await self._fetchall(
                conn,
                f"SELECT {NODE_HEALTH_COLUMNS} FROM node_health WHERE tenant = ? "  # noqa: S608
                f"ORDER BY node_id{self._bytewise}",
                (tenant,),
            )
        return [self._node_health(r) for r in rows]
