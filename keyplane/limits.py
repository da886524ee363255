"""Sizes both sides of the watch stream agree on.

The sidecar refuses any Watch message larger than ``MAX_WATCH_MESSAGE_BYTES``
(its channel's receive limit); the control plane keeps every message it sends
well under it: a tenant's whole state is capped at
``MAX_TENANT_SNAPSHOT_BYTES`` (admin writes that would pass it are refused),
and a delta is split into several messages before it passes that size.
"""

from __future__ import annotations

__all__ = ["MAX_DELTA_MESSAGE_BYTES", "MAX_TENANT_SNAPSHOT_BYTES", "MAX_WATCH_MESSAGE_BYTES"]

MAX_WATCH_MESSAGE_BYTES = 64 * 1024 * 1024
# A quarter of the receive limit: room for protobuf framing and for a sidecar
# that watches a few tenants at their cap.
MAX_TENANT_SNAPSHOT_BYTES = MAX_WATCH_MESSAGE_BYTES // 4
# A delta message is closed once it holds this many bytes of changes (a single
# change is far smaller: see control_plane.limits).
MAX_DELTA_MESSAGE_BYTES = MAX_WATCH_MESSAGE_BYTES // 4
