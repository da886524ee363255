"""The shared record of sidecar streams and acknowledgements, on SQLite and
Postgres: the two writers (stream side, ack side) meet in one row in either
order, a stream that ended is dropped only by the replica that held it, and
rows nobody refreshes are swept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control_plane.store import Store
from control_plane.store.base import SidecarAck, SidecarStream

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def stream(sidecar_id: str, sent: int, tenants: tuple[str, ...] | None = ("acme",)) -> SidecarStream:
    return SidecarStream(
        sidecar_id=sidecar_id, tenants=tenants, peer="ipv4:127.0.0.1:4000", connected_at=T0, sent_version=sent
    )


async def test_stream_and_ack_sides_meet_in_one_row_in_either_order(store: Store) -> None:
    assert await store.list_sidecar_status() == []
    # The ack of "b" reaches the store before its replica registered the stream.
    await store.put_sidecar_acks([SidecarAck("b", 4, 0, "", T0)])
    await store.put_sidecar_streams("replica-1", [stream("a", 7), stream("b", 5, None)], T0)
    await store.put_sidecar_acks([SidecarAck("a", 6, 7, "route r1: provider gemini is not served here", T0)])

    a, b = await store.list_sidecar_status()
    assert (a.sidecar_id, a.replica, a.tenants, a.peer, a.connected_at) == (
        "a",
        "replica-1",
        ("acme",),
        "ipv4:127.0.0.1:4000",
        T0,
    )
    assert (a.sent_version, a.applied_version, a.rejected_version) == (7, 6, 7)
    assert a.error_detail == "route r1: provider gemini is not served here"
    assert (b.tenants, b.sent_version, b.applied_version, b.acked_at, b.seen_at) == (None, 5, 4, T0, T0)

    # A heartbeat with a newer sent version leaves the ack side alone, and vice versa.
    await store.put_sidecar_streams("replica-1", [stream("a", 9)], T0 + timedelta(seconds=5))
    await store.put_sidecar_acks([SidecarAck("a", 9, 0, "", T0 + timedelta(seconds=6))])
    a, _ = await store.list_sidecar_status()
    assert (a.sent_version, a.applied_version, a.rejected_version, a.error_detail) == (9, 9, 0, "")
    assert a.seen_at == T0 + timedelta(seconds=5)


async def test_only_the_replica_holding_a_stream_drops_it(store: Store) -> None:
    await store.put_sidecar_streams("replica-1", [stream("a", 3)], T0)
    # The sidecar moved to replica-2 before replica-1 noticed its stream ended.
    await store.put_sidecar_streams("replica-2", [stream("a", 4)], T0)
    await store.drop_sidecar_streams("replica-1", ["a"])
    [a] = await store.list_sidecar_status()
    assert (a.replica, a.sent_version) == ("replica-2", 4)
    await store.drop_sidecar_streams("replica-2", ["a"])
    assert await store.list_sidecar_status() == []


async def test_sweep_removes_rows_nobody_refreshed(store: Store) -> None:
    await store.put_sidecar_streams("dead-replica", [stream("old", 1)], T0)
    await store.put_sidecar_streams("live-replica", [stream("new", 1)], T0 + timedelta(minutes=2))
    await store.put_sidecar_acks(
        [SidecarAck("orphan-ack", 1, 0, "", T0), SidecarAck("fresh-ack", 1, 0, "", T0 + timedelta(minutes=2))]
    )
    assert await store.sweep_sidecar_status(T0 + timedelta(minutes=1)) == 2
    assert [r.sidecar_id for r in await store.list_sidecar_status()] == ["fresh-ack", "new"]
