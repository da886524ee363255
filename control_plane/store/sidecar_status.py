"""The fleet's shared record of sidecar watch streams (xDS ACK/NACK state),
so that any control-plane replica can say who runs what.

One row per sidecar id, written from two sides that never touch each
other's columns: the replica holding the sidecar's Watch stream writes where
the stream is and what it last sent (``put_sidecar_streams``, refreshed as a
heartbeat), the replica that took the sidecar's Ack writes what it applied or
rejected (``put_sidecar_acks``). Either may come first. Not part of the
change log: nothing here is sent to sidecars.

``SidecarStatusSql`` implements the ``Store`` methods once for both SQL
stores (``?`` placeholders, upserts both dialects share).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from control_plane.store import _rows
from control_plane.store._sql_base import Conn, SqlBase
from control_plane.store.base import SidecarAck, SidecarRecord, SidecarStream

__all__ = ["SidecarStatusSql"]


_COLUMNS = (
    "sidecar_id, replica, tenants, peer, connected_at, sent_version, seen_at, "
    "applied_version, rejected_version, error_detail, acked_at"
)


def _record(row: _rows.Row, encoding: _rows.Encoding) -> SidecarRecord:
    tenants = row["tenants"]
    return SidecarRecord(
        sidecar_id=row["sidecar_id"],
        replica=row["replica"],
        tenants=None if tenants is None else encoding.strings_from(tenants),
        peer=row["peer"],
        connected_at=_rows.opt_time_from(encoding, row["connected_at"]),
        sent_version=int(row["sent_version"]),
        seen_at=_rows.opt_time_from(encoding, row["seen_at"]),
        applied_version=int(row["applied_version"]),
        rejected_version=int(row["rejected_version"]),
        error_detail=row["error_detail"],
        acked_at=_rows.opt_time_from(encoding, row["acked_at"]),
    )


class SidecarStatusSql(SqlBase[Conn]):
    """The sidecar-status methods of ``Store`` on ``SqlBase``'s primitives."""

    async def put_sidecar_streams(self, replica: str, streams: Sequence[SidecarStream], seen_at: datetime) -> None:
        """Record (or refresh) the streams ``replica`` holds, in one transaction."""
        if not streams:
            return
        enc = self._encoding
        seen: Any = enc.time(seen_at, "seen_at")
        sql = (
            "INSERT INTO sidecar_status (sidecar_id, replica, tenants, peer, connected_at, sent_version, seen_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sidecar_id) DO UPDATE SET replica = excluded.replica, "
            "tenants = excluded.tenants, peer = excluded.peer, connected_at = excluded.connected_at, "
            "sent_version = excluded.sent_version, seen_at = excluded.seen_at"
        )
        rows = [
            (
                s.sidecar_id,
                replica,
                None if s.tenants is None else enc.strings(s.tenants),
                s.peer,
                enc.time(s.connected_at, "connected_at"),
                s.sent_version,
                seen,
            )
            for s in streams
        ]
        async with self._transaction() as conn:
            await self._executemany(conn, sql, rows)

    async def put_sidecar_acks(self, acks: Sequence[SidecarAck]) -> None:
        """Record what each sidecar last acknowledged, in one transaction."""
        if not acks:
            return
        enc = self._encoding
        sql = (
            "INSERT INTO sidecar_status (sidecar_id, applied_version, rejected_version, error_detail, acked_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sidecar_id) DO UPDATE SET "
            "applied_version = excluded.applied_version, rejected_version = excluded.rejected_version, "
            "error_detail = excluded.error_detail, acked_at = excluded.acked_at"
        )
        rows = [
            (a.sidecar_id, a.applied_version, a.rejected_version, a.error_detail, enc.time(a.acked_at, "acked_at"))
            for a in acks
        ]
        async with self._transaction() as conn:
            await self._executemany(conn, sql, rows)

    async def drop_sidecar_streams(self, replica: str, sidecar_ids: Sequence[str]) -> None:
        """Forget streams that ended on ``replica`` (a sidecar that moved on to
        another replica meanwhile keeps its row)."""
        if not sidecar_ids:
            return
        async with self._transaction() as conn:
            await self._executemany(
                conn,
                "DELETE FROM sidecar_status WHERE sidecar_id = ? AND replica = ?",
                [(sidecar_id, replica) for sidecar_id in sidecar_ids],
            )

    async def list_sidecar_status(self) -> list[SidecarRecord]:
        """Every row, ordered by sidecar id."""
        async with self._session() as conn:
            rows = await self._fetchall(
                conn,
                f"SELECT {_COLUMNS} FROM sidecar_status ORDER BY sidecar_id{self._bytewise}",  # noqa: S608
                (),
            )
        return [_record(row, self._encoding) for row in rows]

    async def sweep_sidecar_status(self, before: datetime) -> int:
        """Delete rows nobody refreshed since ``before``: streams of a replica
        that died, acks of a sidecar whose stream is gone. Returns how many."""
        cutoff = self._encoding.time(before, "before")
        async with self._transaction() as conn:
            return await self._execute(
                conn,
                "DELETE FROM sidecar_status WHERE (seen_at IS NOT NULL AND seen_at < ?) "
                "OR (seen_at IS NULL AND (acked_at IS NULL OR acked_at < ?))",
                (cutoff, cutoff),
            )
