"""Every error gc3session raises on purpose.

Each class subclasses :class:`Error` and, where one fits, the builtin it
resembles, so ``except ValueError`` still catches a bad argument.  The context
(the id, file or URL at fault) is kept in ``args``, which makes every error
pickle cleanly and read-only attributes cheap.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of all gc3session errors."""


class InvalidArgument(Error, ValueError):
    """A value given by the caller (a URL, an id, an option) is not acceptable."""


class SessionError(Error):
    """A session directory is damaged or is not a session.

    ``path`` names the file or directory at fault.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)

    @property
    def path(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class StoreNotFound(SessionError):
    """The store an existing session names is not there: moved, deleted, or on a disk that is not mounted.

    ``path`` names the session's ``store.url``; ``store`` the directory or
    database file that was not found (or is an empty directory while the
    index names tasks).  Mount the disk or correct ``store.url``; opening
    the session with ``load=False`` starts it over, with an empty index.
    """

    def __init__(self, path: str, reason: str, store: str) -> None:
        Error.__init__(self, path, reason, store)

    @property
    def store(self) -> str:
        return self.args[2]

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}; Session(path, load=False) starts the session over, with an empty index"


class LoadError(Error, LookupError):
    """An object could not be loaded: missing, unreadable, or refused.

    ``id`` names the object; ``reason`` says what went wrong.
    """

    def __init__(self, id: str, reason: str) -> None:  # noqa: A002 - the domain word
        super().__init__(id, reason)

    @property
    def id(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"cannot load {self.id}: {self.reason}"


class NoSuchObject(LoadError):
    """The store holds no object under this id."""


class SaveError(Error):
    """An object or a session file could not be written.

    ``target`` names the id or file; the underlying ``OSError`` or database
    error is chained as ``__cause__``.  Whatever was saved before is intact.
    """

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(target, reason)

    @property
    def target(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"cannot save {self.target}: {self.reason}"


class StoreError(Error):
    """A store cannot be opened or reached (server down, bad schema).

    ``url`` is the store's URL with any password shown as ``***``.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)

    @property
    def url(self) -> str:
        return self.args[0]

    @property
    def reason(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"store {self.url}: {self.reason}"


class TableNotFound(StoreError):
    """A SQL store's table is not in its database, where it must be: opened with ``create=False``, or as the
    store of a session whose index names tasks (a typo in ``store.url``, or a table dropped)."""


class Gc3sessionWarning(UserWarning):
    """The base of gc3session's warnings: ``warnings.simplefilter("ignore", Gc3sessionWarning)`` silences them
    all, ``"error"`` makes them all exceptions."""


class LoadWarning(Gc3sessionWarning):
    """Some tasks of a session could not be loaded; they stay in its index."""


class RepairWarning(Gc3sessionWarning):
    """gc3session found something damaged (an id counter, a torn index line) and repaired it."""


class RunRecordWarning(Gc3sessionWarning):
    """This run of a session could not be recorded in its ``session.json`` (a full disk, a session that this
    user may only read): run records are history, so the session opens and closes all the same."""


class OrphanWarning(Gc3sessionWarning):
    """Records that should have been deleted stay in the store (a removal whose deletion failed): harmless, taken
    for no task; the session tries again at its next flush."""


__all__ = [
    "Error", "Gc3sessionWarning", "InvalidArgument", "LoadError", "LoadWarning", "NoSuchObject", "OrphanWarning",
    "RepairWarning", "RunRecordWarning", "SaveError", "SessionError", "StoreError", "StoreNotFound", "TableNotFound",
]
