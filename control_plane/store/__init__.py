"""The store: one Protocol (``base``), one module per implementation
(``sqlite``, ``postgres``), which share the ``Store`` methods (``_sql``,
``_sql_base``) and the row codecs (``_rows``) and keep their driver and
dialect."""

from control_plane.store.base import ChangeListener, ProviderKeyUpdate, RouteUpdate, SealedSecret, Store
from control_plane.store.factory import open_store
from control_plane.store.postgres import PostgresStore
from control_plane.store.sqlite import SqliteStore

__all__ = [
    "ChangeListener",
    "PostgresStore",
    "ProviderKeyUpdate",
    "RouteUpdate",
    "SealedSecret",
    "SqliteStore",
    "Store",
    "open_store",
]
