"""gc3session: a persistent, crash-safe store for the tasks of computational jobs."""

from __future__ import annotations

from ._version import __version__
from .exceptions import (
    Error,
    InvalidArgument,
    LoadError,
    LoadWarning,
    RepairWarning,
    SaveError,
    SessionError,
    StoreError,
)
from .session import Session, TemporarySession
from .task import Execution, Persistable, State, Task, TaskCollection

__all__ = [
    "Error",
    "Execution",
    "InvalidArgument",
    "LoadError",
    "LoadWarning",
    "Persistable",
    "RepairWarning",
    "SaveError",
    "Session",
    "SessionError",
    "State",
    "StoreError",
    "Task",
    "TaskCollection",
    "TemporarySession",
    "__version__",
]
