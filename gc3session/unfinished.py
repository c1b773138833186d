"""The mark of a session that ``session-tool copy`` or ``import-gc3pie`` is still making.

The command writes the file ``unfinished`` into the new session directory
before it writes any record, and removes it once the session is whole.  A
command killed half way (``kill -9``, a power cut) leaves it behind: the
session then holds only part of what it should, so it does not open, and
``session-tool destroy`` deletes it together with the records the command
wrote.  The file holds a JSON header line (the command, its source, when it
started), then the ids of the records written, one a line, each added once
its batch is written.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .exceptions import SessionError
from .persistence.atomic import write_atomically
from .persistence.idfactory import is_id
from .persistence.serialization import decode_json, encode_json

#: The name of the mark in a session directory.
UNFINISHED_FILENAME = "unfinished"


class Unfinished:
    """The mark of the session at ``session_path``, written now; ``wrote`` adds ids, ``done`` removes it."""

    def __init__(self, session_path: str, command: str, source: str) -> None:
        self.path = os.path.join(session_path, UNFINISHED_FILENAME)
        header = encode_json({"command": command, "source": source, "started": time.time()})
        write_atomically(self.path, f"{header}\n".encode(), fsync=True)

    def wrote(self, ids: list[str]) -> None:
        """Record ``ids`` as written by the command (on disk before this returns)."""
        if not ids:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(f"{oid}\n" for oid in ids))
            f.flush()
            os.fsync(f.fileno())

    def done(self) -> None:
        """The session is whole: remove the mark."""
        os.unlink(self.path)


def read_unfinished(session_path: str) -> tuple[dict[str, Any], list[str]] | None:
    """The header and the ids written of the mark in ``session_path``, or None if there is none.

    A header that cannot be read (a kill while it was written is not
    possible: it is renamed into place) is reported as empty; a line that is
    not an id (the last one, cut short by a kill) is left out.
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
        header = None
    return (header if isinstance(header, dict) else {}), [line for line in lines if is_id(line)]


def check_finished(session_path: str) -> None:
    """Raise SessionError if ``session_path`` is a session that a copy or an import did not finish making."""
    found = read_unfinished(session_path)
    if found is None:
        return
    header, _ = found
    command = header.get("command") or "copy"
    source = header.get("source")
    try:
        when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header['started']))}"
    except (KeyError, TypeError, ValueError, OverflowError, OSError):  # no time, or a damaged one
        when = ""
    raise SessionError(
        session_path,
        f"is the unfinished result of session-tool {command}{f' of {source}' if source else ''}{when}, which "
        f"stopped before it ended (killed?): it may lack tasks; 'session-tool destroy {session_path}' deletes it "
        f"and the records it wrote, then run the {command} again",
    )
