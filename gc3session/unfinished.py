"""The mark of a session that ``session-tool copy`` or ``import-gc3pie`` is still making.

The command creates the file ``unfinished`` in the new session directory
before it writes any record, holds the lock ``unfinished.lock`` while it
runs, and removes both once the session is whole.  A command killed half way
(``kill -9``) leaves the mark behind, unlocked: the session then holds only
part of what it should, so it does not open, and ``session-tool destroy``
deletes it together with the records the command wrote.  The file holds a
JSON header line (the command, its source, the store it writes to, when it
started), then, for a copy, the ids of the records written, one a line,
each added once its batch is written.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from filelock import FileLock, Timeout

from .exceptions import SaveError, SessionError
from .persistence import local_store_path
from .persistence.idfactory import is_id
from .persistence.serialization import decode_json, encode_json
from .persistence.store import expand_variables, mask_password

#: The name of the mark in a session directory.
UNFINISHED_FILENAME = "unfinished"
#: The commands that write the mark.
COMMANDS = ("copy", "import-gc3pie")


class Unfinished:
    """The mark of the session at ``session_path``, made now and locked; ``wrote`` adds ids, ``done`` removes it.

    ``store`` names the store the command writes to (its URL, password
    masked), so that destroying the session later deletes the records listed
    from that store only.
    """

    def __init__(self, session_path: str, command: str, source: str, store: str) -> None:
        self.path = os.path.join(session_path, UNFINISHED_FILENAME)
        self._lock = FileLock(self.path + ".lock", timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise Refused(session_path, "is being made by another session-tool command right now") from None
        except OSError as error:
            raise SaveError(self._lock.lock_file, f"cannot lock: {error.strerror or error}") from error
        header = encode_json({"command": command, "source": source, "store": store, "started": time.time()})
        try:  # never over another command's mark
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._lock.release()
            raise Refused(session_path, "is being made, or was left unfinished, by another command") from None
        except OSError as error:
            self.release()
            raise SaveError(self.path, f"cannot create: {error.strerror or error}") from error
        try:
            _write_all(fd, f"{header}\n".encode())
        except OSError as error:  # no mark: the command stops before it writes any record
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.release()
            raise SaveError(self.path, f"cannot write: {error.strerror or error}") from error
        os.close(fd)

    def wrote(self, ids: list[str]) -> None:
        """Record ``ids`` as written by the command (on disk before this returns)."""
        if not ids:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # never made again: a mark removed is an error
            try:
                _write_all(fd, "".join(f"{oid}\n" for oid in ids).encode())
            finally:
                os.close(fd)
        except OSError as error:
            raise SaveError(self.path, f"cannot record the records written: {error.strerror or error}") from error

    def done(self) -> None:
        """The session is whole: remove the mark, then its lock."""
        try:
            os.unlink(self.path)
        except OSError as error:
            raise SaveError(self.path, f"cannot remove the mark of the command: {error.strerror or error}") from error
        self.release()

    def release(self) -> None:
        """Let go of the lock (and remove its file): the command ends, whole or not."""
        self._lock.release()
        with contextlib.suppress(OSError):  # gone with its directory, say
            os.unlink(self._lock.lock_file)


class Refused(SessionError):
    """The session is another command's to make: a command refused this way must leave it as it is."""


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a short write is a full disk) and fsync."""
    while data:
        data = data[os.write(fd, data) :]
    os.fsync(fd)


def store_identity(url: str) -> str:
    """The store that ``url`` (resolved against its session) names, in one spelling: the real path of a local
    store (a store directory, a SQLite file), else the URL with its variables expanded and its password masked."""
    local = local_store_path(url)
    return os.path.realpath(local) if local is not None else mask_password(expand_variables(url))


def read_unfinished(session_path: str) -> tuple[dict[str, Any], list[str]] | None:
    """The header and the ids written of the mark in ``session_path``, or None if there is none.

    A file of that name whose first line is not a header of one of
    :data:`COMMANDS` is no mark.  A last line without its newline (a write
    cut short) is left out: cut, an id may name another record.
    """
    path = os.path.join(session_path, UNFINISHED_FILENAME)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first, *lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SessionError(path, f"cannot read: {error.strerror or error}") from error
    try:
        header = decode_json(first)
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("command") not in COMMANDS or not lines:
        return None
    return header, [line for line in lines[:-1] if is_id(line)]


def running(session_path: str) -> bool:
    """True while the command that made the mark in ``session_path`` runs (it holds the lock)."""
    lock = FileLock(os.path.join(session_path, UNFINISHED_FILENAME + ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a directory this user cannot write (read-only, another's): no command of its own runs there
        return False
    lock.release()
    return False


def check_finished(session_path: str) -> None:
    """Raise SessionError if ``session_path`` is a session that a copy or an import is making, or did not finish
    making."""
    found = read_unfinished(session_path)
    if found is None:
        return
    header, _ = found
    command, source = header["command"], header.get("source")
    what = f"session-tool {command}{f' of {source}' if source else ''}"
    if running(session_path):
        raise SessionError(session_path, f"is being made by {what} right now: wait for it to end")
    try:
        when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header['started']))},"
    except (KeyError, TypeError, ValueError, OverflowError, OSError):  # no time, or a damaged one
        when = ""
    if command == "copy":
        cleanup = (f"'session-tool destroy {session_path}' deletes it and the records it wrote; then copy again "
                   "(with --renumber into a store other sessions use: the numbers taken are not given again)")
    else:
        cleanup = (f"'session-tool destroy {session_path}' deletes it (its records stay in the store); then "
                   f"import again, which takes them as they are")
    raise SessionError(session_path, f"is the unfinished result of {what}{when} which stopped before it ended "
                                     f"(killed?): it may lack tasks; {cleanup}")
