"""Writing a file so that readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: Temporary files start with this, so listings skip them and ``check`` can find stale ones.
TEMP_PREFIX = ".tmp-"


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, fsync: bool = False) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    On any error the temporary file is removed and ``path`` keeps its old
    content.  With ``fsync`` the data (and the rename) reach the disk before
    returning, which guards against power loss as well as crashes.
    """
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if fsync:
        sync_directory(path.parent)


def sync_directory(path: str | os.PathLike[str]) -> None:
    """Make renames and deletions inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
