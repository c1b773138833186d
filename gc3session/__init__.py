"""gc3session: a persistent, crash-safe store for the tasks of computational jobs."""

from __future__ import annotations

from ._version import __version__
from .exceptions import (
    Error,
    Gc3sessionWarning,
    InvalidArgument,
    LoadError,
    LoadWarning,
    NoSuchObject,
    OrphanWarning,
    RepairWarning,
    RunRecordWarning,
    SaveError,
    SessionError,
    StoreError,
    StoreNotFound,
    TableNotFound,
)
from .session import Session, TemporarySession
from .task import Execution, Persistable, State, Task, TaskCollection


def __getattr__(name: str) -> object:
    # the asyncio layer is imported on first use: plain scripts and session-tool never pay for asyncio
    if name in ("AsyncSession", "async_session"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AsyncSession",
    "Error",
    "Execution",
    "Gc3sessionWarning",
    "InvalidArgument",
    "LoadError",
    "LoadWarning",
    "NoSuchObject",
    "Persistable",
    "OrphanWarning",
    "RepairWarning",
    "RunRecordWarning",
    "SaveError",
    "Session",
    "SessionError",
    "State",
    "StoreError",
    "StoreNotFound",
    "TableNotFound",
    "Task",
    "TaskCollection",
    "TemporarySession",
    "__version__",
    "async_session",
]
