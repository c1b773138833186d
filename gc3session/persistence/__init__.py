"""Stores: where a session's objects live.

``make_store(url)`` picks the store for a URL: a plain path or ``file://``
URL gives a :class:`FilesystemStore`; ``sqlite://``, ``postgresql://`` and
``mysql://`` (or ``mariadb://``) give a :class:`SqlStore`.
"""

from __future__ import annotations

from typing import Any

from .filesystem import FilesystemStore
from .idfactory import IdFactory
from .serialization import DEFAULT_PROTOCOL, Serializer
from .store import Store, make_store, register

SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")


def _sql_store(url: str, **kwargs: Any) -> Store:
    from .sql import SqlStore

    return SqlStore(url, **kwargs)


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
