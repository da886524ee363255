"""Quota claims of control-plane replicas (migration 10), written once for
both SQL stores on ``SqlBase``'s primitives.

``quota_claims`` holds one row per (bucket, window, replica): what the
replica claimed of the bucket's limit for that window, what its sidecars
used and its demand. ``claim_quota`` runs one transaction for a replica's
whole batch; each bucket's window is locked (``_lock_quota``: Postgres takes
``pg_advisory_xact_lock``, SQLite's transactions are serialised already)
before its rows are summed, so concurrent claims from several replicas never
hand out more than the limit. A replica's row is never lowered while it
lives: what it claimed may already be leased out; once it has been silent
for ``release_ms`` (gone) the unused rest of its claim is released. The row of replica '' is the seed: spend
the usage rollups held for a budget's window when its first claim came.
"""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.store._rows import Row
from control_plane.store._sql_base import Conn, SqlBase
from control_plane.store.quota_records import QuotaClaim, QuotaClaimResult

__all__ = ["QuotaClaimsSql"]

_KEY = "tenant = ? AND client_key_id = ? AND kind = ? AND window_start_ms = ?"
_UPSERT = (
    "INSERT INTO quota_claims (tenant, client_key_id, kind, window_start_ms, replica_id, window_end_ms, "
    "claimed, used, rate, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (tenant, client_key_id, kind, window_start_ms, replica_id) DO UPDATE SET "
    "claimed = excluded.claimed, used = excluded.used, rate = excluded.rate, updated_at_ms = excluded.updated_at_ms"
)


class QuotaClaimsSql(SqlBase[Conn]):
    """The quota-claim methods of ``Store``."""

    async def _lock_quota(self, conn: Conn, claim: QuotaClaim) -> None:
        """Serialise every claim on one bucket's window until the transaction
        ends. The SQLite store's transactions are serialised already."""

    async def claim_quota(
        self,
        replica_id: str,
        claims: Sequence[QuotaClaim],
        now_ms: int,
        live_ms: int,
        release_ms: int = 120_000,
    ) -> list[QuotaClaimResult]:
        """Claim and record, in one transaction, in the order given (callers
        sort by bucket so two replicas lock in the same order)."""
        results: list[QuotaClaimResult] = []
        async with self._transaction() as conn:
            for claim in claims:
                await self._lock_quota(conn, claim)
                key = (claim.tenant, claim.client_key_id, claim.kind, claim.window_start_ms)
                rows = await self._fetchall(
                    conn,
                    f"SELECT replica_id, claimed, used, rate, updated_at_ms FROM quota_claims WHERE {_KEY}",  # noqa: S608
                    key,
                )
                if not rows and claim.seed_from_rollups:
                    seed = await self._spent(conn, claim)
                    if seed > 0:
                        await self._execute(conn, _UPSERT, (*key, "", claim.window_end_ms, seed, seed, 0.0, now_ms))
                        rows = [{"replica_id": "", "claimed": seed, "used": seed, "rate": 0.0, "updated_at_ms": now_ms}]
                rows = [await self._release_if_stale(conn, key, r, replica_id, now_ms, release_ms) for r in rows]
                mine = next((r for r in rows if r["replica_id"] == replica_id), None)
                total = sum(int(r["claimed"]) for r in rows)
                granted = max(0, min(claim.want, claim.limit - total))
                claimed = (int(mine["claimed"]) if mine is not None else 0) + granted
                await self._execute(
                    conn, _UPSERT, (*key, replica_id, claim.window_end_ms, claimed, claim.used, claim.rate, now_ms)
                )
                others = [r for r in rows if r["replica_id"] != replica_id]
                live_rate = sum(float(r["rate"]) for r in others if now_ms - int(r["updated_at_ms"]) <= live_ms)
                results.append(
                    QuotaClaimResult(
                        granted=granted,
                        claimed=claimed,
                        fleet_claimed=total + granted,
                        others_used=sum(int(r["used"]) for r in others),
                        fleet_rate=live_rate + claim.rate,
                    )
                )
        return results

    async def _release_if_stale(
        self, conn: Conn, key: tuple[str, str, int, int], row: Row, replica_id: str, now_ms: int, release_ms: int
    ) -> Row:
        """Another replica silent for ``release_ms`` (gone; its sidecars have
        moved on) keeps only what its sidecars used: the rest of its claim
        goes back to the window."""
        if row["replica_id"] in ("", replica_id) or now_ms - int(row["updated_at_ms"]) <= release_ms:
            return row
        if int(row["claimed"]) <= int(row["used"]):
            return row
        await self._execute(
            conn,
            f"UPDATE quota_claims SET claimed = used WHERE {_KEY} AND replica_id = ?",  # noqa: S608
            (*key, row["replica_id"]),
        )
        fields = ("replica_id", "used", "rate", "updated_at_ms")
        released: dict[str, object] = {name: row[name] for name in fields}
        released["claimed"] = row["used"]
        return released

    async def _spent(self, conn: Conn, claim: QuotaClaim) -> int:
        """Cost the usage rollups hold for the claim's tenant (or client key)
        since its window began."""
        sql = "SELECT COALESCE(SUM(cost_micros), 0) AS spent FROM usage_rollups WHERE tenant = ? AND minute >= ?"
        params: list[object] = [claim.tenant, claim.window_start_ms // 60_000 * 60]
        if claim.client_key_id:
            sql += " AND client_key_id = ?"
            params.append(claim.client_key_id)
        row = await self._fetchone(conn, sql, params)
        return int(row["spent"]) if row is not None else 0

    async def quota_used(self, windows: Sequence[tuple[str, str, int, int]]) -> dict[tuple[str, str, int, int], int]:
        """What every replica's sidecars used of each (tenant, client key,
        kind, window start), as last recorded (the seed included); absent
        windows are left out."""
        out: dict[tuple[str, str, int, int], int] = {}
        async with self._session() as conn:
            for key in windows:
                sql = f"SELECT COALESCE(SUM(used), 0) AS used, COUNT(*) AS n FROM quota_claims WHERE {_KEY}"  # noqa: S608
                row = await self._fetchone(conn, sql, key)
                if row is not None and int(row["n"]):
                    out[key] = int(row["used"])
        return out

    async def sweep_quota_claims(self, before_ms: int) -> int:
        """Delete the claims of windows that ended before ``before_ms``; how many."""
        async with self._transaction() as conn:
            return await self._execute(conn, "DELETE FROM quota_claims WHERE window_end_ms < ?", (before_ms,))
