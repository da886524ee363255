"""The store: one Protocol (``base``), one module per implementation."""

from control_plane.store.base import ChangeListener, Store
from control_plane.store.factory import open_store
from control_plane.store.postgres import PostgresStore
from control_plane.store.sqlite import SqliteStore

__all__ = ["ChangeListener", "PostgresStore", "SqliteStore", "Store", "open_store"]
