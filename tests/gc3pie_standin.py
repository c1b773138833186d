"""Stand-ins for gc3pie's classes and filesystem store, to write gc3pie session directories in tests.

The classes say they live where gc3libs keeps theirs (``gc3libs.Application``,
``gc3libs.persistence.idfactory.Id``, ...), so the pickles name the same
globals as gc3pie's; :func:`fake_gc3libs` makes those names importable while
a test needs it (to write, or to load "with gc3libs installed").  Writing
follows gc3pie: one bare pickle per object, in a file named by its id; every
other ``Persistable`` inside it is saved on its own and pickled as a
persistent id, which is the ``Id`` object itself.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

GC3LIBS_MODULES = ("gc3libs", "gc3libs.persistence", "gc3libs.persistence.idfactory", "gc3libs.workflow")


class _IdBase(str):
    """What both versions of gc3pie's ``Id`` share: built from and pickled as ``(prefix, n)``."""

    __slots__ = ()

    def __new__(cls, prefix: str, seqno: int) -> _IdBase:
        instance = str.__new__(cls, f"{prefix}.{seqno}")
        instance._prefix = prefix  # type: ignore[attr-defined]
        instance._seqno = seqno  # type: ignore[attr-defined]
        return instance

    def __getnewargs__(self) -> tuple[str, int]:
        return (self._prefix, self._seqno)  # type: ignore[attr-defined]


class Id(_IdBase):
    """Like gc3pie's ``Id``: a string ``PREFIX.N`` that pickles as ``Id(prefix, n)`` and hashes differently."""

    __slots__ = ("_prefix", "_seqno")

    def __hash__(self) -> int:
        return hash((self._prefix, self._seqno))

    def __eq__(self, other: object) -> bool:
        return str(self) == str(other)


class OldId(_IdBase):
    """Like gc3pie's ``Id`` before it had ``__slots__`` (picklable with protocols 0 and 1)."""


class Persistable:
    """gc3pie's mix-in: not gc3session's."""

    def __init__(self) -> None:
        self.changed = True


class Run:
    """Like gc3libs' ``Run``: the state in ``_state``, exit code and signal apart, state times in ``timestamp``."""

    def __init__(self) -> None:
        self._state = "NEW"
        self._exitcode: int | None = None
        self._signal: int | None = None
        self.history: list[str] = []
        self.timestamp: OrderedDict[str, float] = OrderedDict()
        self.state_last_changed = time.time()

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self.timestamp[value] = time.time()
        self.history.append(value)
        self._state = value

    @property
    def returncode(self) -> int | None:
        if self._exitcode is None and self._signal is None:
            return None
        return ((-1 if self._exitcode is None else self._exitcode) << 8) | (self._signal or 0)


class Task(Persistable):
    """Like gc3libs' ``Task``: saved without its controller."""

    def __init__(self, jobname: str, **attributes: Any) -> None:
        super().__init__()
        self.jobname = jobname
        self.execution = Run()
        self._attached = False
        self._controller = None
        self.__dict__.update(attributes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_controller"] = None
        state["_attached"] = None
        state["changed"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__ = state


class Application(Task):
    """A job: arguments and an output directory."""


class TaskCollection(Task):
    """A collection: children in ``tasks``."""

    def __init__(self, jobname: str, tasks: Iterable[Task] = (), **attributes: Any) -> None:
        super().__init__(jobname, **attributes)
        self.tasks = list(tasks)


for _cls, _module in ((Id, "gc3libs.persistence.idfactory"), (OldId, "gc3libs.persistence.idfactory"),
                      (Run, "gc3libs"), (Task, "gc3libs"), (Application, "gc3libs"),
                      (TaskCollection, "gc3libs.workflow"), (Persistable, "gc3libs.persistence.store")):
    _cls.__module__ = _module
OldId.__qualname__ = "Id"

#: What a test passes as ``class_map`` to load the stand-ins without the fake gc3libs modules.
STANDIN_CLASS_MAP = {
    "gc3libs.Application": "gc3pie_standin.Application",
    "gc3libs.Run": "gc3pie_standin.Run",
    "gc3libs.Task": "gc3pie_standin.Task",
    "gc3libs.workflow.TaskCollection": "gc3pie_standin.TaskCollection",
}


@contextmanager
def fake_gc3libs(old_ids: bool = False) -> Iterator[None]:
    """Make the gc3libs names of the stand-ins importable (``old_ids``: ``Id`` is the dict-based one)."""
    modules = {name: types.ModuleType(name) for name in GC3LIBS_MODULES}
    modules["gc3libs.persistence.idfactory"].Id = OldId if old_ids else Id
    modules["gc3libs"].Application = Application
    modules["gc3libs"].Run = Run
    modules["gc3libs"].Task = Task
    modules["gc3libs.workflow"].TaskCollection = TaskCollection
    saved = {name: sys.modules.get(name) for name in GC3LIBS_MODULES}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class GC3PieStore:
    """gc3pie's filesystem store, as far as writing goes."""

    def __init__(self, directory: str, protocol: int = pickle.HIGHEST_PROTOCOL, first: int = 1) -> None:
        self.directory = directory
        self.protocol = protocol
        self.id_class = OldId if protocol < 2 else Id
        self.next = first
        os.makedirs(directory, exist_ok=True)

    def save(self, obj: Any) -> str:
        if not hasattr(obj, "persistent_id"):
            obj.persistent_id = self.id_class(type(obj).__name__, self.next)
            self.next += 1
        buffer = io.BytesIO()
        _Pickler(self, obj, buffer, self.protocol).dump(obj)
        with open(os.path.join(self.directory, obj.persistent_id), "wb") as f:
            f.write(buffer.getvalue())
        obj.changed = False
        return obj.persistent_id


class _Pickler(pickle.Pickler):
    def __init__(self, store: GC3PieStore, root: Any, file: io.BytesIO, protocol: int) -> None:
        super().__init__(file, protocol)
        self._store = store
        self._root = root

    def persistent_id(self, obj: Any) -> Any:
        if obj is self._root or not isinstance(obj, Persistable):
            return None
        if not hasattr(obj, "persistent_id") or getattr(obj, "changed", True):
            self._store.save(obj)
        return obj.persistent_id


def write_session(path: str | os.PathLike[str], tasks: Iterable[Any], *, protocol: int = pickle.HIGHEST_PROTOCOL,
                  finished: bool = True) -> list[str]:
    """A gc3pie session directory at ``path`` holding ``tasks``, as gc3pie lays it out; return the task ids."""
    path = os.path.abspath(os.fspath(path))
    store = GC3PieStore(os.path.join(path, "jobs"), protocol)
    with fake_gc3libs(old_ids=protocol < 2):
        ids = [store.save(task) for task in tasks]
    with open(os.path.join(path, "session_ids.txt"), "w") as f:
        f.writelines(f"{oid}\n" for oid in ids)
    with open(os.path.join(path, "store.url"), "w") as f:
        f.write(f"file://{path}/jobs")
    with open(os.path.join(path, "created"), "w") as f:
        f.write("gsweep -s sweep1 -C 30\n")
    os.utime(os.path.join(path, "created"), (1_600_000_000, 1_600_000_000))
    if finished:
        open(os.path.join(path, "finished"), "w").close()
        os.utime(os.path.join(path, "finished"), (1_600_003_600, 1_600_003_600))
    return [str(oid) for oid in ids]
