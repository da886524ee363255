"""The usage recorder on a real SQLite store: a flush that fails (the table is gone)
keeps its rows and its cost remainders, and the next flush writes them exactly once;
rows are folded per minute of the attempt's start; retention deletes old minutes."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane.store import SqliteStore
from control_plane.store._sqlite_schema import MIGRATIONS
from control_plane.usage import Price, UsageQuery, UsageRecorder
from keyplane.domain import Provider, Tenant
from keyplane.v1 import resources_pb2 as rpb
from keyplane.v1 import sidecar_service_pb2 as spb
from keyplane.v1 import usage_pb2 as upb

NOW = 1_767_225_630.0  # 2026-01-01T00:00:30Z


def outcome(seconds: int, tokens_in: int, tokens_out: int, *, failed: bool = False) -> spb.Outcome:
    message = spb.Outcome(
        tenant="acme",
        key_id="pk_1",
        provider=rpb.PROVIDER_OPENAI,
        model="gpt-4o-mini",
        outcome_class=spb.OUTCOME_CLASS_UPSTREAM_ERROR if failed else spb.OUTCOME_CLASS_SUCCESS,
        client_key_id="ck_1",
        public_model="gpt",
    )
    if not failed:
        message.usage.CopyFrom(upb.Usage(input_tokens=tokens_in, output_tokens=tokens_out))
    message.time.FromSeconds(seconds)
    return message


async def test_a_failed_flush_is_written_once_later(tmp_path: Path) -> None:
    path = tmp_path / "keyplane.db"
    store = SqliteStore(str(path))
    await store.migrate()
    try:
        await store.create_tenant(Tenant(name="acme", created_at=datetime.now(UTC)))
        # $0.15 / M in, $0.60 / M out: 10 in + 1 out = 2.1 micro-dollars.
        await store.put_price(Price("acme", Provider.OPENAI, "gpt-4o-mini", 150_000, 75_000, 600_000))
        recorder = UsageRecorder(store, clock=lambda: NOW)
        recorder.folder.fold([outcome(int(NOW), 10, 1)] * 3)
        assert await recorder.flush() == 1
        # The table goes away: the next flush fails and keeps what it held.
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE usage_rollups")
        recorder.folder.fold([outcome(int(NOW), 10, 1)] * 4 + [outcome(int(NOW), 0, 0, failed=True)])
        with pytest.raises(Exception, match="usage_rollups"):
            await recorder.flush()
        with sqlite3.connect(path) as db:
            for migration in (m for m in MIGRATIONS if m.name.startswith("usage")):  # the table, its attempts
                db.execute(migration.statements[0])
        recorder.folder.fold([outcome(int(NOW) - 60, 10, 1)])  # the minute before
        assert await recorder.flush() == 2
        assert await recorder.flush() == 0  # nothing twice
        rows = await store.query_usage(UsageQuery(start=int(NOW) - 120, end=int(NOW) + 60, bucket=60))
        by_minute = {bucket: totals for _, bucket, totals in rows}
        now_minute = int(NOW) // 60 * 60
        this = by_minute[now_minute]
        # The first flush's row went with the dropped table; the kept one arrived whole, once.
        assert (this.requests, this.failed_requests, this.input_tokens, this.output_tokens) == (5, 1, 40, 4)
        assert this.attempts == 5
        # First flush: 3 x 2.1 = 6.3 (6 written, 0.3 carried). The failed flush did not spend the 0.3:
        # 4 x 2.1 + 0.3 = 8.7, 8 written (a failed flush that kept its 0.7 would make it 9.1: 9).
        assert this.cost_micros == 8
        assert by_minute[now_minute - 60].requests == 1
        # Retention: minutes before the cut are deleted.
        assert await store.sweep_usage(now_minute) == 1
    finally:
        await store.close()
