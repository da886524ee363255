"""The sidecar's channel to the control plane (one TCP connection, TLS when configured).

``open_channel`` makes one channel. ``ChannelSource`` is what the watch stream
and the outcome reports share: each asks it for the current channel whenever
it (re)opens a stream. With client TLS it re-reads the certificate files when
they changed on disk (a rotated client certificate, CA or key) and opens a new
channel with them; the old channel is closed once its streams have had
``retire_grace`` seconds to move over. A connection that stays up keeps the
certificate it was opened with (mTLS checks it at the handshake only), so a
rotation takes effect on the sidecar's next reconnect.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio

from keyplane.limits import MAX_WATCH_MESSAGE_BYTES
from keyplane.tls import FileSignature, TlsError, channel_credentials, channel_options, is_loopback_listen

from .config import SidecarConfig

__all__ = ["ChannelSource", "open_channel"]

_log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = MAX_WATCH_MESSAGE_BYTES  # the control plane keeps every message under it


def open_channel(config: SidecarConfig) -> grpc.aio.Channel:
    """A channel to the control plane (TLS when configured), keepalive on.
    ``TlsError`` when the TLS files cannot be used."""
    options: list[tuple[str, int | str]] = [
        ("grpc.keepalive_time_ms", int(config.grpc_keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        # Our own loop paces reconnects; keep the channel's from adding long waits.
        ("grpc.initial_reconnect_backoff_ms", int(config.watch_backoff_base * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(config.watch_backoff_base * 1000)),
        # Connection attempts at least twice per cap (gRPC adds up to 20% of jitter), so a
        # sidecar is back on its stream well within the cap of the control plane's return.
        ("grpc.max_reconnect_backoff_ms", int(config.watch_backoff_cap * 1000 / 2)),
    ]
    tls = config.control_plane_tls
    if tls is None:
        return grpc.aio.insecure_channel(config.control_plane_target, options=options)
    options.extend(channel_options(tls))
    return grpc.aio.secure_channel(config.control_plane_target, channel_credentials(tls), options=options)


class ChannelSource:
    """The current channel to the control plane, re-opened when the TLS files change.

    Built from a ``config`` it owns its channels (``close`` closes them); built
    ``fixed`` on a channel someone else owns it only hands that one out.
    """

    def __init__(
        self, config: SidecarConfig, *, fixed: grpc.aio.Channel | None = None, retire_grace: float = 30.0
    ) -> None:
        self._config = config
        self._own = fixed is None
        self._retire_grace = retire_grace
        tls = config.control_plane_tls if self._own else None
        if self._own and config.control_plane_tls is None and not is_loopback_listen(config.control_plane_target):
            _log.warning(
                "talking to the control plane at %s in plaintext: the sidecar token and provider secrets are "
                "not protected on the wire (pass --tls-ca, and --tls-cert/--tls-key for mTLS)",
                config.control_plane_target,
            )
        self._signature = tls.signature() if tls is not None else None
        self._channel = open_channel(config) if fixed is None else fixed
        # Old channels being closed (after the grace), by their closing task.
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.reopened = 0

    def current(self) -> grpc.aio.Channel:
        """The channel a new stream should use (checks the TLS files first)."""
        tls = self._config.control_plane_tls
        if self._own and tls is not None and self._signature is not None:
            signature = tls.signature()
            if signature != self._signature:
                self._reopen(signature)
        return self._channel

    def _reopen(self, signature: FileSignature) -> None:
        try:
            channel = open_channel(self._config)
        except TlsError as exc:
            # Probably mid-rotation (a certificate without its key yet): try again next time.
            _log.warning("control-plane TLS files changed but cannot be used yet (%s); keeping the current ones", exc)
            return
        old, self._channel = self._channel, channel
        self._signature = signature
        self.reopened += 1
        _log.info("control-plane TLS files changed: new streams use a new channel with them")
        task = asyncio.get_running_loop().create_task(old.close(self._retire_grace), name="keyplane-retire-channel")
        self._retiring[task] = old
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            _log.error("closing an old control-plane channel failed: %s", type(task.exception()).__name__)

    async def close(self) -> None:
        """Close the channels this source opened (after their users stopped)."""
        if not self._own:
            return
        retiring = dict(self._retiring)
        for channel in (*retiring.values(), self._channel):
            await channel.close(None)
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)
