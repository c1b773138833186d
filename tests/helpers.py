"""Test-only classes and worker functions that must be importable by name.

Objects pickled by a store, and functions run in ``spawn`` subprocesses, must
live in a module that a fresh interpreter can import: this one.  pytest's
default ("prepend") import mode puts ``tests/`` on ``sys.path``, and
``spawn`` children inherit the parent's ``sys.path``.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from gc3session import Persistable, Task


class Bare(Persistable):
    """A persistable whose ``__init__`` never calls ``Persistable.__init__``."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Point:
    """A plain (non-persistable) class: a global that a restricted unpickler may refuse."""

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


class OldTask(Task):
    """A task class that tests delete or rename to simulate a class that moved."""


class NewTask(Task):
    """Where ``OldTask`` objects go with a ``class_map``."""


class FitTask(Task):
    """A user task class with its own attributes."""

    def __init__(self, jobname: str | None = None, alpha: float = 0.0, **attributes: Any) -> None:
        super().__init__(jobname, **attributes)
        self.alpha = alpha


class GcWitness(Task):
    """A task that notes, as it is pickled or unpickled, whether Python's cyclic garbage collector is on."""

    seen: ClassVar[list[bool]] = []
    seen_saving: ClassVar[list[bool]] = []
    fail: ClassVar[bool] = False

    def __getstate__(self) -> dict[str, Any]:
        import gc

        GcWitness.seen_saving.append(gc.isenabled())
        if GcWitness.fail:
            raise RuntimeError("refused to pickle")
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        import gc

        GcWitness.seen.append(gc.isenabled())
        if GcWitness.fail:
            raise RuntimeError("refused to unpickle")
        self.__dict__.update(state)


def make_helper_store(url: str, **kwargs: Any) -> Any:
    """A store constructor for a made-up scheme: ``scheme:///abs/dir`` is a filesystem store in ``/abs/dir``."""
    from gc3session.persistence import FilesystemStore

    store = FilesystemStore(urlsplit(url).path, **kwargs)
    store.url = url
    return store


# -- workers for subprocesses (spawn) -----------------------------------------------
#
# Each worker waits at a "gate" (a directory) until every worker has started,
# so that they really run at the same time rather than one after the other.

GATE_TIMEOUT = 120.0


def wait_at_gate(gate: str | None, tag: str) -> None:
    """In a worker: say we are ready, then wait until the parent opens the gate."""
    if gate is None:
        return
    Path(gate, f"ready-{tag}").touch()
    deadline = time.monotonic() + GATE_TIMEOUT
    while not Path(gate, "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        time.sleep(0.002)


def open_gate(gate: str, workers: int, futures: list[Future[Any]]) -> None:
    """In the parent: once ``workers`` workers wait at ``gate`` (or one has failed), let them all go."""
    deadline = time.monotonic() + GATE_TIMEOUT
    while len(list(Path(gate).glob("ready-*"))) < workers:
        if any(f.done() for f in futures) or time.monotonic() > deadline:
            break  # a worker died early: its future will say why
        time.sleep(0.002)
    Path(gate, "go").touch()


def add_to_session(session_path: str, count: int, tag: str, gate: str | None = None) -> list[str]:
    """Open the session at ``session_path`` and add ``count`` tasks one by one; return their ids."""
    from gc3session import Session

    session = Session(session_path)
    wait_at_gate(gate, tag)
    ids = [session.add(Task(jobname=f"{tag}-{i}")) for i in range(count)]
    session.store.close()
    return ids


def create_and_add(session_path: str, count: int, tag: str, gate: str | None = None) -> list[str]:
    """Wait at the gate, then open (or make: the first one there does) the session and add ``count`` tasks."""
    from gc3session import Session

    wait_at_gate(gate, tag)
    session = Session(session_path)
    ids = [session.add(Task(jobname=f"{tag}-{i}")) for i in range(count)]
    session.store.close()
    return ids


def save_to_store(url: str, count: int, tag: str, gate: str | None = None) -> list[str]:
    """Save ``count`` tasks one by one into the store at ``url``; return their ids."""
    from gc3session.persistence import make_store

    store = make_store(url)
    try:
        wait_at_gate(gate, tag)
        return [store.save(Task(jobname=f"{tag}-{i}")) for i in range(count)]
    finally:
        store.close()


def reserve_numbers(counter_path: str, count: int, tag: str, gate: str | None = None) -> list[int]:
    """Take ``count`` numbers, one at a time, from the FileCounter at ``counter_path``."""
    from gc3session.persistence.idfactory import FileCounter

    counter = FileCounter(counter_path)
    wait_at_gate(gate, tag)
    numbers: list[int] = []
    for _ in range(count):
        numbers.extend(counter.reserve(1))
    return numbers


def run_in_processes(function: Callable[..., Any], jobs: list[tuple[Any, ...]], gate: str) -> list[Any]:
    """Run ``function(*job, tag, gate)`` for each job in its own spawned process, all at once; return results."""
    os.makedirs(gate, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        futures = [pool.submit(function, *job, f"w{n}", gate) for n, job in enumerate(jobs)]
        open_gate(gate, len(jobs), futures)
        return [future.result(timeout=GATE_TIMEOUT) for future in futures]


class Meddler:
    """Pickles as a new Meddler, calling ``Meddler.during()`` meanwhile: a change another thread makes then."""

    during: Any = None

    def __reduce__(self) -> tuple[Any, ...]:
        if Meddler.during is not None:
            Meddler.during()
        return (Meddler, ())


def refuse_deleting(monkeypatch: Any, name: str) -> None:
    """Make ``os.unlink`` of a file named ``name`` fail with EACCES (as root, chmod would not), until
    ``monkeypatch.undo()``."""
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(path) == name:
            raise OSError(errno.EACCES, "Permission denied", str(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
