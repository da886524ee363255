"""The store: one Protocol (``base``), one module per implementation."""

from control_plane.store.base import Store

__all__ = ["Store"]
