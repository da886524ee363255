"""A swarm of watch clients in their own process, for ``test_resync_swarm``.

``python -m tests.e2e.watch_swarm --control-plane HOST:PORT --streams N --channels C``
(the sidecar token in ``KEYPLANE_SIDECAR_TOKEN``) runs N real ``WatchClient``s
(the sidecar's own watch code) over C gRPC channels through a ``TcpProxy`` to
the control plane. It prints one JSON line per event on stdout:

- ``{"event": "ready", ...}`` once every stream holds the control plane's snapshot;
- after a ``drop`` line on stdin: cuts every connection through the proxy at once,
  waits until every stream reconnected and is in sync again, and prints
  ``{"event": "resynced", ...}`` with the time each stream took;
- ``stop`` on stdin (or EOF): stops every client and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import time

from grpc import aio

from sidecar.config import SidecarConfig
from sidecar.state import SidecarState
from sidecar.watch import WatchClient
from tests.fakes.tcp_proxy import TcpProxy


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _line() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def main(args: argparse.Namespace) -> None:
    host, port = args.control_plane.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    config = SidecarConfig(
        control_plane_target=proxy.address,
        sidecar_token=os.environ["KEYPLANE_SIDECAR_TOKEN"],
        tenants=(args.tenant,),
        report_outcomes=False,
    )
    # The sidecar's own channel settings (sidecar.channel.open_channel), each channel
    # on its own connection (a local subchannel pool).
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", int(config.watch_backoff_base * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.watch_backoff_base * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.watch_backoff_cap * 1000 / 2)),
    ]
    channels = [aio.insecure_channel(proxy.address, options=options) for _ in range(args.channels)]
    states = [SidecarState() for _ in range(args.streams)]
    clients = [
        WatchClient(dataclasses.replace(config, sidecar_id=f"swarm-{i}"), state) for i, state in enumerate(states)
    ]
    tasks = [asyncio.create_task(c.run(channels[i % len(channels)])) for i, c in enumerate(clients)]
    started = time.monotonic()
    ok = await asyncio.gather(*(c.wait_ready(60) for c in clients))
    versions = {s.version for s in states}
    _emit("ready", streams=sum(ok), seconds=round(time.monotonic() - started, 3), versions=sorted(versions))
    try:
        while (command := await _line()) == "drop":
            target = max(s.version for s in states)
            opened = [c.streams_opened for c in clients]
            pushbacks = [c.pushbacks for c in clients]
            t0 = time.monotonic()
            cut = proxy.drop_all()
            done: dict[int, float] = {}
            while len(done) < len(clients) and time.monotonic() - t0 < 30:
                now = time.monotonic()
                for i, c in enumerate(clients):
                    if i not in done and c.streams_opened > opened[i] and states[i].version >= target:
                        done[i] = now - t0
                await asyncio.sleep(0.005)
            times = sorted(done.values())
            _emit(
                "resynced",
                connections_cut=cut,
                streams=len(clients),
                resynced=len(done),
                max=round(times[-1], 3) if times else None,
                p50=round(statistics.median(times), 3) if times else None,
                p99=round(times[int(len(times) * 0.99) - 1], 3) if times else None,
                pushbacks=sum(c.pushbacks for c in clients) - sum(pushbacks),
                version=target,
            )
        del command
    finally:
        for c in clients:
            c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
        await proxy.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--control-plane", required=True)
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=10)
    asyncio.run(main(parser.parse_args()))
