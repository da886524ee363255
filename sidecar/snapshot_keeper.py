"""Keeps the sidecar's last-known-good snapshot on disk and brings it back on start.

``SnapshotKeeper`` is told of every watch message the sidecar applied
(``note``, from the watch client; a dict update, nothing else on that path)
and folds it (``sidecar.snapshot_fold``). A background task writes the folded
snapshot at most once per ``interval`` (coalescing bursts of deltas), sealing
and writing it in a worker thread so that neither the event loop nor any
request waits for the disk. ``close`` writes what is still pending.

On start, before the watch stream opens, ``restore`` reads the file and
applies it to the state, so a sidecar that cannot reach the control plane
still serves: it says so in its log, in ``/readyz`` and in
``keyplane_sidecar_snapshot_age_seconds``. The watch stream then resumes from
the restored version. A file that does not open (see ``sidecar.snapshot_file``)
is refused with one error line and left alone; the next write replaces it.

``age`` is how long ago the snapshot being served was last known to be in
sync with the control plane (0 while a stream is live), for the file as for
a live state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from keyplane.v1 import sidecar_service_pb2

from .snapshot_file import (
    PersistedSnapshot,
    SnapshotFileError,
    SnapshotKey,
    read_snapshot_file,
    seal_snapshot,
    write_snapshot_file,
)
from .snapshot_fold import SnapshotFold
from .state import SidecarState

__all__ = ["SnapshotKeeper"]

_log = logging.getLogger(__name__)


class SnapshotKeeper:
    """The persisted snapshot of one sidecar; ``path`` None: nothing is persisted."""

    def __init__(
        self,
        state: SidecarState,
        *,
        path: Path | None,
        key: SnapshotKey | None,
        tenants: tuple[str, ...] = (),
        interval: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if path is not None and key is None:
            raise ValueError("a snapshot file needs a key")
        self._state = state
        self.path = path
        self._key = key
        self._tenants = frozenset(tenants) or None
        self._interval = interval
        self._wall_clock = wall_clock
        self._fold = SnapshotFold()
        self._dirty = asyncio.Event()
        self._closing = asyncio.Event()
        self._write_lock = asyncio.Lock()  # one write at a time (they share a temporary file)
        # Set while the state served is the restored file, not yet refreshed by a stream.
        self._restored: PersistedSnapshot | None = None
        self.writes = 0
        self.write_errors = 0
        self._writes_metric: Counter | None = None
        self._errors_metric: Counter | None = None
        self._written_version = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def restored_version(self) -> int | None:
        """The version restored from the file while it is still what the sidecar serves."""
        return self._restored.version if self._restored is not None else None

    # --- start --------------------------------------------------------------------

    async def restore(self) -> bool:
        """Apply the persisted snapshot, if there is a usable one; True if applied."""
        if self.path is None or self._key is None:
            return False
        path, key = self.path, self._key
        try:
            persisted = await asyncio.to_thread(read_snapshot_file, path, key)
        except SnapshotFileError as exc:
            _log.error("ignoring the persisted snapshot %s: %s", path, exc)
            return False
        except OSError as exc:
            _log.error("ignoring the persisted snapshot %s: cannot be read (%s)", path, exc.strerror)
            return False
        if persisted is None:
            _log.info("no persisted snapshot at %s yet", path)
            return False
        if self._state.version >= persisted.version and self._state.is_ready:
            return False  # never go back to an older snapshot than the one held
        fold = SnapshotFold()
        fold.apply(persisted.response)
        response = fold.response(self._tenants)
        try:
            self._state.apply(response)
        except Exception as exc:
            _log.error("ignoring the persisted snapshot %s: it does not apply (%s)", path, type(exc).__name__)
            return False
        self._fold = SnapshotFold()
        self._fold.apply(response)
        self._restored = persisted
        self._written_version = persisted.version
        _log.warning(
            "serving from the persisted snapshot %s (version %d, last in sync with the control plane %.0fs ago) "
            "until the control plane answers",
            path,
            persisted.version,
            max(0.0, self._wall_clock() - persisted.synced_at),
        )
        return True

    # --- what the watch stream drives ---------------------------------------------

    def note(self, message: sidecar_service_pb2.WatchResponse) -> None:
        """The state just applied ``message``."""
        self._fold.apply(message)
        if self._restored is not None:
            _log.info(
                "the control plane answered: resynced from persisted version %d to version %d",
                self._restored.version,
                self._fold.version,
            )
            self._restored = None
        if self.path is not None and self._fold.has_snapshot:
            self._dirty.set()

    # --- age ----------------------------------------------------------------------

    def age(self) -> float | None:
        """Seconds since the snapshot served was last known in sync; None before any."""
        restored = self._restored
        if restored is not None and not self._state.connected:
            return max(0.0, self._wall_clock() - restored.synced_at)
        return self._state.age()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        age = Gauge(
            "keyplane_sidecar_snapshot_age_seconds",
            "Seconds since the snapshot the sidecar serves was last known in sync with the control plane "
            "(0 while the watch stream is live, -1 before any snapshot), including a snapshot restored "
            "from the persisted file.",
            registry=registry,
        )
        age.set_function(lambda: _or_minus_one(self.age()))
        restored = Gauge(
            "keyplane_sidecar_snapshot_restored",
            "1 while the sidecar serves the snapshot restored from its persisted file (the control plane "
            "has not answered since the start).",
            registry=registry,
        )
        restored.set_function(lambda: 0.0 if self._restored is None else 1.0)
        self._writes_metric = Counter(
            "keyplane_sidecar_snapshot_writes", "Writes of the persisted snapshot file.", registry=registry
        )
        self._errors_metric = Counter(
            "keyplane_sidecar_snapshot_write_errors",
            "Writes of the persisted snapshot file that failed (see the log).",
            registry=registry,
        )

    # --- writing ------------------------------------------------------------------

    async def run(self) -> None:
        """Write the folded snapshot when it changed, at most once per ``interval``, until ``close``."""
        if self.path is None:
            return
        while not self._closing.is_set():
            await self._dirty.wait()
            if self._closing.is_set():
                break
            await self._write()
            with contextlib.suppress(TimeoutError):
                # Coalesce: whatever arrives meanwhile goes in the next write.
                await asyncio.wait_for(self._closing.wait(), self._interval)

    async def close(self) -> None:
        """Stop ``run`` (the caller awaits its task) and write what is pending."""
        self._closing.set()
        self._dirty.set()
        if self.path is not None and self._fold.has_snapshot and self._fold.version != self._written_version:
            await self._write()

    async def _write(self) -> None:
        async with self._write_lock:
            await self._write_locked()

    async def _write_locked(self) -> None:
        self._dirty.clear()
        path, key = self.path, self._key
        if path is None or key is None or not self._fold.has_snapshot:
            return
        version = self._fold.version
        payload = self._fold.response().SerializeToString()
        age = self._state.age()
        synced_at = self._wall_clock() - (age if age is not None else 0.0)
        if self._restored is not None:
            synced_at = self._restored.synced_at
        try:
            await asyncio.to_thread(_seal_and_write, path, payload, version, synced_at, key)
        except OSError as exc:
            self.write_errors += 1
            if self._errors_metric is not None:
                self._errors_metric.inc()
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                _log.error("could not write the persisted snapshot %s: %s", path, exc.strerror or exc)
            return
        self.writes += 1
        if self._writes_metric is not None:
            self._writes_metric.inc()
        self._written_version = version
        _log.debug("persisted snapshot version %d to %s (%d bytes)", version, path, len(payload))


def _seal_and_write(path: Path, payload: bytes, version: int, synced_at: float, key: SnapshotKey) -> None:
    write_snapshot_file(path, seal_snapshot(payload, version, synced_at, key))


def _or_minus_one(value: float | None) -> float:
    return -1.0 if value is None else value
