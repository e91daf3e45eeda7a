"""Ledger stores, chosen by URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
``redis://host:6379/0`` (extra ``tokenguard[redis]``).

``open_store()`` turns a ``store=`` / ``TOKENGUARD_STORE`` value into a ``Store``.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from .._errors import ConfigurationError
from .._ledger import Store
from .._redact import redact_url
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "RedisStore", "SQLiteStore", "default_store_path", "open_store"]


def __getattr__(name: str) -> object:
    if name == "RedisStore":  # imported on first use: redis-py is an optional extra
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_store_path() -> Path:
    """The default ledger file: ``ledger.db`` in the platform's user data directory."""
    return platformdirs.user_data_path("tokenguard", appauthor=False) / "ledger.db"


def open_store(store: str | os.PathLike[str] | Store | None) -> Store:
    """The store for a URL (or an existing ``Store``); ``None`` means the default SQLite file."""
    if store is None:
        return SQLiteStore(default_store_path())
    if isinstance(store, Store) and not isinstance(store, str):
        return store
    if isinstance(store, os.PathLike):
        return SQLiteStore(store)
    if not isinstance(store, str):
        raise ConfigurationError("store", store, "expected a URL string such as 'sqlite:///ledger.db'")
    if store in ("memory://", "memory"):
        return MemoryStore()
    if store.startswith("sqlite:///"):
        path = store[len("sqlite:///") :]
        if not path:
            raise ConfigurationError("store", store, "name a file: sqlite:///relative.db or sqlite:////abs.db")
        return SQLiteStore(path)
    if store.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(store)
    raise ConfigurationError(
        "store",
        redact_url(store),
        "unknown store; use memory://, sqlite:///relative.db, sqlite:////abs/path.db or redis://host:6379/0",
    )
