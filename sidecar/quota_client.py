"""The sidecar's StreamQuota call (Envoy RLQS's shape): every
``report_interval`` it sends what it admitted and what was asked of each
leased bucket (``Limiter.report``), and applies every lease message the
control plane sends (``Limiter.apply``). Requests never wait on it: they are
admitted from the leases already held. When the stream breaks it reconnects
with jittered backoff; meanwhile the limiter keeps enforcing its last leases
(fail-static) unless it fails open. The same stream brings the price table of
the sidecar's tenants when it changes (``sidecar.pricing``: spend budgets and
the cost counter). Shares the watch stream's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from keyplane.v1 import limits_pb2 as lpb
from keyplane.v1 import sidecar_service_pb2_grpc

from .channel import ChannelSource
from .config import SidecarConfig
from .limits import Limiter
from .watch import Backoff

__all__ = ["QuotaClient"]

_log = logging.getLogger(__name__)


class QuotaClient:
    def __init__(self, config: SidecarConfig, limiter: Limiter, rng: random.Random | None = None) -> None:
        self._config = config
        self.limiter = limiter
        self._backoff = Backoff(config.watch_backoff_base, config.watch_backoff_cap, rng)
        self._stopping = asyncio.Event()
        self._call: grpc.aio.StreamStreamCall[lpb.StreamQuotaRequest, lpb.StreamQuotaResponse] | None = None
        self.streams = 0
        self.leases_received = 0

    def stop(self) -> None:
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()

    async def run(self, channel: ChannelSource) -> None:
        """Stream until ``stop``, on the shared channel (its owner closes it)."""
        while not self._stopping.is_set():
            stub = sidecar_service_pb2_grpc.SidecarServiceStub(channel.current())
            if await self._stream_once(stub):
                self._backoff.reset()
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._backoff.next_delay())

    async def _stream_once(self, stub: sidecar_service_pb2_grpc.SidecarServiceAsyncStub) -> bool:
        metadata = (("authorization", f"Bearer {self._config.sidecar_token}"),)
        call = stub.StreamQuota(self._requests(), metadata=metadata, wait_for_ready=True)
        self._call = call
        received = False
        try:
            async for response in call:
                self.limiter.apply(response)
                self.leases_received += 1
                if not received:
                    received = True
                    self.streams += 1
                    _log.info("quota stream to the control plane is live (%d leases)", len(response.leases))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                _log.warning("the control plane does not lease quotas; limits are not enforced here")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 60)
            elif not self._stopping.is_set():
                _log.warning("quota stream ended (%s); enforcing the last leases", exc.code().name)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            self._call = None
        return received

    async def _requests(self) -> AsyncIterator[lpb.StreamQuotaRequest]:
        config = self._config
        yield lpb.StreamQuotaRequest(
            sidecar_id=config.sidecar_id,
            tenants=list(config.tenants),
            usage=self.limiter.report(),
            prices_on_change=True,  # the price table comes when it changes (Limiter.apply keeps it)
        )
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), config.quota_report_interval)
            if self._stopping.is_set():
                return
            yield lpb.StreamQuotaRequest(usage=self.limiter.report())
