"""Run records: who opened a session, from where, with what, and how it ended.

Each session keeps ``session.json`` in its directory: a session id and one
record per open in a writing process (the first and the newest, up to
:data:`MAX_RUNS`; ``runs_dropped`` counts the ones let go).  The file is rewritten atomically under
the session's lock, merging with records other processes added meanwhile.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from typing import Any

from ._version import __version__
from .exceptions import InvalidArgument, RepairWarning, SaveError, SessionError
from .persistence.atomic import write_atomically
from .persistence.store import mask_password

#: The file of run records in a session directory.
RUNS_FILENAME = "session.json"
#: How many run records ``session.json`` keeps: the first (the creation) and the newest others.
MAX_RUNS = 1000


def read_runs(session_path: str) -> dict[str, Any]:
    """The content of ``session.json`` (``{"session_id": ..., "runs": [...]}``); empty when missing."""
    path = os.path.join(session_path, RUNS_FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        return {"session_id": None, "runs": []}
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise SessionError(path, f"cannot read the run records: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("runs"), list):
        raise SessionError(path, "is not a run record file (expected an object with a list of runs)")
    return content


def check_params(params: Any) -> None:
    """Raise InvalidArgument if ``params`` cannot be kept in a run record (JSON; values that are not are kept
    as their ``repr``, keys and cycles cannot be)."""
    try:
        json.dumps(params, default=repr)
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidArgument(f"params cannot be kept in the session's run records (JSON): {error}") from None


def new_run(params: dict[str, Any] | None) -> dict[str, Any]:
    """A record of this process opening a session now."""
    cwd = os.getcwd()
    return {
        "run_id": uuid.uuid4().hex,
        "start": time.time(),
        "end": None,
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": [mask_password(arg) for arg in sys.argv],  # a store URL given on the command line
        "cwd": cwd,
        "python": platform.python_version(),
        "gc3session": __version__,
        "git": _git_state(cwd),
        "params": params or {},
        "error": None,
    }


def _start(run: Any) -> float:
    """When ``run`` started, for sorting; 0 for a record edited by hand that says nothing usable."""
    start = run.get("start") if isinstance(run, dict) else None
    return start if isinstance(start, (int, float)) and not isinstance(start, bool) and start == start else 0


def update_runs(session_path: str, run: dict[str, Any]) -> str:
    """Add or replace ``run`` (by its ``run_id``) in ``session.json``; return the session id.

    The caller holds the session's lock.
    """
    try:
        content = read_runs(session_path)
    except SessionError as damaged:  # run records are history, not tasks: keep the file aside and go on
        if isinstance(damaged.__cause__, OSError):  # unreadable (no permission, a disk error) is not damaged
            raise SaveError(damaged.path, damaged.reason) from damaged.__cause__
        content = {"session_id": _set_aside(session_path, damaged), "runs": []}
    session_id = content.get("session_id") or uuid.uuid4().hex
    runs = [r for r in content["runs"] if not (isinstance(r, dict) and r.get("run_id") == run["run_id"])]
    runs.append(run)
    runs.sort(key=_start)
    dropped = content.get("runs_dropped")
    dropped = dropped if isinstance(dropped, int) else 0
    if len(runs) > MAX_RUNS:  # bounded, so that opening a session stays cheap however often it is opened
        dropped += len(runs) - MAX_RUNS
        runs = runs[:1] + runs[len(runs) - MAX_RUNS + 1 :]
    path = os.path.join(session_path, RUNS_FILENAME)
    record = {"session_id": session_id, "runs": runs}
    if dropped:
        record["runs_dropped"] = dropped
    data = json.dumps(record, indent=1, default=repr).encode()
    try:
        write_atomically(path, data, mode=0o600)  # command lines may hold secrets
    except OSError as error:
        raise SaveError(path, f"cannot write the run records: {error.strerror or error}") from error
    return session_id


def _set_aside(session_path: str, damaged: SessionError) -> str | None:
    """Rename a damaged ``session.json`` beside itself, warn, and return the session id it still shows."""
    path = os.path.join(session_path, RUNS_FILENAME)
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        with open(path, "rb") as f:
            found = re.search(rb'"session_id"\s*:\s*"([0-9a-f]{32})"', f.read())
        os.replace(path, aside)
    except OSError as error:
        raise SaveError(path, f"cannot set the damaged run records aside: {error.strerror or error}") from damaged
    warnings.warn(f"{damaged}; kept as {aside}, and new run records started", RepairWarning, stacklevel=5)
    return found[1].decode() if found else None


def error_record(error: BaseException) -> dict[str, Any]:
    """How a run ended with an exception: its type, message and traceback."""
    return {
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


@functools.lru_cache(maxsize=8)
def _git_state(cwd: str) -> dict[str, Any] | None:
    """The commit and dirty flag of the git checkout at ``cwd``, or None."""
    # two plain commands that git has had for ever (clusters keep old versions), read as UTF-8 whatever the locale
    text: dict[str, Any] = {
        "capture_output": True, "encoding": "utf-8", "errors": "replace", "timeout": 5, "check": False,
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, **text)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, **text)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


__all__ = ["RUNS_FILENAME", "error_record", "new_run", "read_runs", "update_runs"]
