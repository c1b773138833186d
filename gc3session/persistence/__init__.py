"""Stores: where a session's objects live.

``make_store(url)`` picks the store for a URL: a plain path or ``file://``
URL gives a :class:`FilesystemStore`; ``sqlite://``, ``postgresql://`` and
``mysql://`` (or ``mariadb://``) give a :class:`SqlStore`.
"""

from __future__ import annotations

from typing import Any

from .filesystem import FilesystemStore, store_directory
from .idfactory import IdFactory
from .serialization import DEFAULT_PROTOCOL, Serializer
from .store import Store, expand_variables, make_store, register, url_scheme

SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")


def _sql_store(url: str, **kwargs: Any) -> Store:
    from .sql import SqlStore

    return SqlStore(url, **kwargs)


def local_store_path(url: str) -> str | None:
    """Where the store of ``url`` keeps its records on this machine: a filesystem store's directory or a
    SQLite database file.  None for a database server, an in-memory database, or a store of a plugin."""
    url = expand_variables(url.strip())
    scheme = url_scheme(url) or "file"
    if scheme == "file":
        return str(store_directory(url))
    if scheme == "sqlite":
        from .sql import sqlite_file

        return sqlite_file(url)
    return None


def __getattr__(name: str) -> Any:
    if name == "SqlStore":  # imported on first use: SQLAlchemy takes a while to import
        from .sql import SqlStore

        return SqlStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register("file", FilesystemStore)
for _scheme in SQL_SCHEMES:
    register(_scheme, _sql_store)

__all__ = [
    "DEFAULT_PROTOCOL",
    "FilesystemStore",
    "IdFactory",
    "Serializer",
    "SqlStore",
    "Store",
    "make_store",
    "register",
]
