"""Ids of stored objects: ``Task.17`` is object 17 of a store, a ``Task`` when saved.

The number is what makes an id unique; the prefix makes it readable.  Numbers
come from a counter that only moves forward: a file beside the records for
the filesystem store, a row in the database for SQL stores, so several
processes and machines writing into one store never get the same id.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import platformdirs
from filelock import FileLock

from ..exceptions import InvalidArgument, RepairWarning, SaveError
from .atomic import write_atomically

log = logging.getLogger(__name__)

#: A valid id: a prefix that could be a Python name (at most 200 characters), a dot, a positive number
#: without leading zeros of at most 18 digits (it must fit a 64-bit database column).
ID_PATTERN = re.compile(r"([^\W\d]\w{0,199})\.([1-9][0-9]{0,17})")
#: Lines that are all ids of ASCII letters, digits and ``_``, each ended by a newline and nothing else: a
#: block of an index file that matches holds only valid ids (the common case, checked in one pass).
PLAIN_ID_LINES = re.compile(rb"(?:[A-Za-z_][A-Za-z0-9_]{0,199}\.[1-9][0-9]{0,17}\n)*")
#: Valid ids, each followed by a newline: a list of ids joined by newlines is checked in one pass.
ID_LINES = re.compile(r"(?:[^\W\d]\w{0,199}\.[1-9][0-9]{0,17}\n)*")
#: Environment variable that moves the per-user data directory (for the global counter).
DATA_DIR_VARIABLE = "GC3SESSION_DATA_DIR"


def parse_id(id: str) -> tuple[str, int]:  # noqa: A002
    """Split a valid id into prefix and number; raise InvalidArgument for anything else."""
    match = ID_PATTERN.fullmatch(id) if isinstance(id, str) else None
    if match is None:
        raise InvalidArgument(f"{id!r} is not a valid object id (expected a name, a dot and a number, like 'Task.17')")
    return match[1], int(match[2])


def number_of(id: str) -> int:  # noqa: A002
    """The number of an id already checked to be valid (cheaper than :func:`parse_id`)."""
    return int(id.rpartition(".")[2])


def is_id(text: str) -> bool:
    """True when ``text`` is a valid id."""
    return ID_PATTERN.fullmatch(text) is not None


def _usable_prefix(prefix: str) -> str:
    """``prefix`` if ids can start with it, else ``Object``."""
    return prefix if ID_PATTERN.fullmatch(f"{prefix}.1") else "Object"


def id_list(value: Any) -> list[str]:
    """The valid ids in a metadata field that should be a list of ids (anything else counts as none)."""
    return [v for v in value if isinstance(v, str) and is_id(v)] if isinstance(value, list) else []


class IdFactory:
    """Formats ids from numbers: ``prefix.N``, the prefix being the object's class name unless given."""

    def __init__(self, prefix: str | None = None, counter: Counter | None = None) -> None:
        if prefix is not None and not ID_PATTERN.fullmatch(f"{prefix}.1"):
            raise InvalidArgument(f"id prefix {prefix!r} must be a Python-style name")
        self.prefix = prefix
        self._counter = counter
        self._prefixes: dict[str, str] = {}  # class name -> the prefix of its ids, checked once

    def format(self, obj: Any, number: int) -> str:
        """The id of ``obj`` when it gets ``number``."""
        if self.prefix:  # checked on every call: it may have been set after the factory was made
            prefix = _usable_prefix(self.prefix)
        else:
            name = type(obj).__name__
            prefix = self._prefixes.get(name) or self._prefixes.setdefault(name, _usable_prefix(name))
        return f"{prefix}.{number}"

    def new(self, obj: Any) -> str:
        """A fresh id from this factory's own counter (the per-user one by default).

        Stores do not use this: each allocates numbers from its own counter.
        """
        if self._counter is None:
            self._counter = FileCounter(user_data_dir() / "next_id.txt")
        return self.format(obj, self._counter.reserve(1)[0])


class Counter:
    """A sequence of numbers that never goes back."""

    def reserve(self, n: int) -> range:  # pragma: no cover - interface
        raise NotImplementedError


class FileCounter(Counter):
    """The next free number, kept in a text file and advanced under a file lock.

    ``start`` tells where to begin when the file is missing or damaged (for a
    store: above the highest number already used), so numbers are not reused.
    ``fsync=True`` makes each change reach the disk before it is used, so that
    power loss cannot take the counter back.
    """

    def __init__(
        self, path: str | os.PathLike[str], start: Callable[[], int] | None = None, *, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._start = start or (lambda: 1)
        self._lock_pid = os.getpid()
        self._file_lock = FileLock(f"{self.path}.lock")

    @property
    def _lock(self) -> FileLock:
        if self._lock_pid != os.getpid():  # a forked child needs a lock of its own
            self._file_lock = FileLock(f"{self.path}.lock")
            self._lock_pid = os.getpid()
        return self._file_lock

    def reserve(self, n: int) -> range:
        """Take ``n`` consecutive numbers and return them."""
        try:
            with self._lock:
                first = self._read()
                write_atomically(self.path, f"{first + n}\n".encode(), fsync=self.fsync)
        except OSError as error:
            raise SaveError(str(self.path), f"cannot advance the id counter: {error}") from error
        return range(first, first + n)

    def advance(self, number: int) -> bool:
        """Make sure ``number`` and everything below it is never handed out; True if the counter moved."""
        try:
            with self._lock:
                if self._read() <= number:
                    write_atomically(self.path, f"{number + 1}\n".encode(), fsync=self.fsync)
                    return True
        except OSError as error:
            raise SaveError(str(self.path), f"cannot advance the id counter: {error}") from error
        return False

    def _read(self) -> int:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return self._start()
        try:
            value = int(content.decode("ascii").strip())
            if not 1 <= value < 10**18:  # an id's number has at most 18 digits
                raise ValueError(value)
        except ValueError:  # UnicodeDecodeError included
            warnings.warn(
                f"id counter {self.path} is damaged ({content[:40]!r}); restarting above the highest id in use",
                RepairWarning,
                stacklevel=4,
            )
            return self._start()
        return value


def user_data_dir() -> Path:
    """Per-user data directory: ``$GC3SESSION_DATA_DIR`` or platformdirs' choice."""
    override = os.environ.get(DATA_DIR_VARIABLE)
    path = Path(override) if override else Path(platformdirs.user_data_dir("gc3session", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = [
    "ID_PATTERN", "Counter", "FileCounter", "IdFactory", "id_list", "is_id", "number_of", "parse_id", "user_data_dir",
]
