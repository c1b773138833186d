"""Full disk and permission errors: the call fails with a gc3session error that says what failed, and
everything saved before is intact.

We run as root, so ``chmod`` would not stop a write: the faults are made by
replacing ``os.open``, ``os.write`` and ``os.replace`` with versions that raise
``OSError(ENOSPC)`` or ``OSError(EACCES)`` for one file only.  A full disk also
shows as a *short* write (part of the data written, then ENOSPC): the
``short`` fault writes all but the last two bytes of what it is given the
first time and raises ENOSPC after that.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_helpers import index_file_lines, open_checked, temp_files

from gc3session import Session, Task
from gc3session.exceptions import Error
from gc3session.persistence import make_store
from gc3session.persistence.atomic import TEMP_PREFIX
from gc3session.persistence.filesystem import COUNTER_FILENAME
from gc3session.persistence.idfactory import is_id

ENOSPC, EACCES = errno.ENOSPC, errno.EACCES


class Faults:
    """Make ``os.open``/``os.write``/``os.replace`` fail for the files a predicate picks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rule: tuple[str, int, Callable[[str], bool]] | None = None
        self.fired = 0
        self._names: dict[int, str] = {}
        self._shorted: set[int] = set()
        real_open, real_write, real_replace, real_close = os.open, os.write, os.replace, os.close

        def fake_open(path, flags, mode=0o777, **kwargs):
            name = os.path.basename(os.fspath(path))
            self._maybe_fail("open", name)
            fd = real_open(path, flags, mode, **kwargs)
            self._names[fd] = name
            return fd

        def fake_write(fd, data):
            name = self._names.get(fd)
            if name is not None and self._picks("short", name):
                self.fired += 1
                if fd not in self._shorted:
                    self._shorted.add(fd)
                    return real_write(fd, bytes(data)[: max(1, len(data) - 2)])
                raise OSError(ENOSPC, os.strerror(ENOSPC))
            if name is not None:
                self._maybe_fail("write", name)
            return real_write(fd, data)

        def fake_close(fd):
            self._names.pop(fd, None)
            self._shorted.discard(fd)
            return real_close(fd)

        def fake_replace(src, dst, **kwargs):
            self._maybe_fail("replace", os.path.basename(os.fspath(dst)))
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(os, "close", fake_close)
        monkeypatch.setattr(os, "replace", fake_replace)

    def arm(self, call: str, code: int, picks: Callable[[str], bool]) -> None:
        self.rule = (call, code, picks)
        self.fired = 0

    def disarm(self) -> None:
        self.rule = None

    def _picks(self, call: str, name: str) -> bool:
        return self.rule is not None and self.rule[0] == call and self.rule[2](name)

    def _maybe_fail(self, call: str, name: str) -> None:
        if self._picks(call, name):
            self.fired += 1
            code = self.rule[1]
            raise OSError(code, os.strerror(code), name)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    return Faults(monkeypatch)


def temp_of(name: str) -> Callable[[str], bool]:
    """The temporary file written before renaming it to ``name``."""
    return lambda n: n.startswith(f"{TEMP_PREFIX}{name}-")


def named(name: str) -> Callable[[str], bool]:
    return lambda n: n == name


def record_file(n: str) -> bool:
    return is_id(n)


def record_temp(n: str) -> bool:
    return n.startswith(TEMP_PREFIX) and is_id(n[len(TEMP_PREFIX) :].rpartition("-")[0])


#: How writing one file through a temporary file and a rename can fail: (call, errno, picks the file).
def atomic_faults(name: str) -> list[tuple[str, int, Callable[[str], bool]]]:
    return [
        ("replace", ENOSPC, named(name)),
        ("replace", EACCES, named(name)),
        ("open", EACCES, temp_of(name)),
        ("open", ENOSPC, temp_of(name)),
        ("write", ENOSPC, temp_of(name)),
        ("short", ENOSPC, temp_of(name)),
    ]


ATOMIC_IDS = ["replace-ENOSPC", "replace-EACCES", "open-EACCES", "open-ENOSPC", "write-ENOSPC", "short-write"]


def make_session(path: Path, url: str | None = None, count: int = 5) -> tuple[Session, dict[str, str]]:
    """A session holding ``count`` tasks; returns it and ``{id: jobname}``."""
    session = Session(path, store_or_url=url)
    saved = {session.add(Task(jobname=f"before-{i}", payload=list(range(i)))): f"before-{i}" for i in range(count)}
    return session, saved


def assert_intact(path: Path, saved: dict[str, str], where: list[Path]) -> None:
    """No temporary file is left; the session reopens with every task saved before, and still works."""
    left = temp_files(*where)
    assert not left, f"temporary files left behind: {left}"
    session = open_checked(path, "after the fault")
    try:
        held = {oid: session.tasks[oid].jobname for oid in saved if oid in session.tasks}
        assert held == saved, f"tasks saved before the fault were lost or changed: {set(saved) - set(held)}"
        assert all(session.tasks[oid].payload == list(range(int(name.split("-")[1]))) for oid, name in saved.items())
        later = session.add(Task(jobname="after"))
    finally:
        session.store.close()
    again = open_checked(path, "after a write that followed the fault")
    try:
        assert again.tasks[later].jobname == "after"
        assert set(saved) <= set(again.tasks)
    finally:
        again.store.close()


def assert_says(error: BaseException, code: int, *names: str) -> None:
    """The error is a gc3session error naming one of ``names`` and saying why."""
    text = str(error)
    assert isinstance(error, Error), f"a {type(error).__name__} escaped, not a gc3session error: {text}"
    assert any(name in text for name in names), f"the error does not say what failed ({names}): {text}"
    assert os.strerror(code) in text, f"the error does not say why ({os.strerror(code)}): {text}"


def call_failing(faults: Faults, function: Callable[[], object]) -> BaseException:
    """Run ``function``, which must raise because of the armed fault; return what it raised."""
    try:
        result = function()
    except Exception as error:  # what exactly is checked by the caller
        faults.disarm()
        assert faults.fired, f"the fault never fired, yet the call raised {error!r}"
        return error
    faults.disarm()
    raise AssertionError(f"the call succeeded ({result!r}) although the fault fired {faults.fired} time(s)")


# -- saving a task ----------------------------------------------------------------------------

RECORD_FAULTS = [
    ("replace", ENOSPC, record_file),
    ("replace", EACCES, record_file),
    ("open", EACCES, record_temp),
    ("open", ENOSPC, record_temp),
    ("write", ENOSPC, record_temp),
    ("short", ENOSPC, record_temp),
]


@pytest.mark.parametrize(("call", "code", "picks"), RECORD_FAULTS, ids=ATOMIC_IDS)
def test_saving_a_task(tmp_path, faults, call, code, picks):
    path = tmp_path / "session"
    session, saved = make_session(path)
    task = Task(jobname="doomed")
    faults.arm(call, code, picks)
    error = call_failing(faults, lambda: session.add(task))
    assert_says(error, code, str(task.persistent_id))
    assert task.persistent_id not in index_file_lines(path)
    session.store.close()
    assert_intact(path, saved, [path])


@pytest.mark.parametrize(("call", "code", "picks"), RECORD_FAULTS, ids=ATOMIC_IDS)
def test_saving_changed_tasks_again(tmp_path, faults, call, code, picks):
    """save_all over tasks already saved: a failure leaves every record as it was before or as new."""
    path = tmp_path / "session"
    session, saved = make_session(path)
    for task in session.tasks.values():
        task.execution.state = "RUNNING"
    faults.arm(call, code, picks)
    error = call_failing(faults, session.save_all)
    assert_says(error, code, *saved)
    session.store.close()
    assert_intact(path, saved, [path])


def nth_file(picks: Callable[[str], bool], nth: int) -> Callable[[str], bool]:
    """Picks what ``picks`` picks of the ``nth`` file it is asked about (0: the first), and nothing else."""
    names: list[str] = []

    def pick(name: str) -> bool:
        if not picks(name):
            return False
        if name not in names:
            names.append(name)
        return names.index(name) == nth

    return pick


@pytest.mark.parametrize("holds", ["collection", "attribute"])
@pytest.mark.parametrize(("call", "code", "picks"), RECORD_FAULTS, ids=ATOMIC_IDS)
def test_a_save_that_fails_half_way_never_leaves_a_record_naming_one_not_written(
    tmp_path, faults, call, code, picks, holds
):
    """A filesystem store writes a batch file by file: what a record refers to is written before it, so a
    failure on any one file leaves each task loading, as before or as new."""
    path = tmp_path / "session"
    session, saved = make_session(path, count=2)
    holder = next(iter(session.tasks.values()))
    for n in range(3):  # new objects the holder refers to, saved with it in one batch
        if holds == "collection":
            holder.tasks = [*getattr(holder, "tasks", []), Task(jobname=f"new-{n}")]
        else:
            setattr(holder, f"prepare{n}", Task(jobname=f"new-{n}"))
    for nth in range(4):  # the failure on the first file written, the second, ...
        faults.arm(call, code, nth_file(picks, nth))
        with pytest.raises(Error):
            session.save_all()
        faults.disarm()
        session.store.close()
        again = open_checked(path, f"after a failure on file {nth + 1} of the batch")
        assert sorted(again.tasks) == sorted(saved)
        again.store.close()
        for obj in [holder, *getattr(holder, "tasks", []), *(getattr(holder, f"prepare{n}", None) for n in range(3))]:
            if obj is not None:
                obj.changed = True  # the next round writes them all again


# -- appending to index.txt -------------------------------------------------------------------

INDEX = Session.INDEX_FILENAME
APPEND_FAULTS = [
    ("open", EACCES, named(INDEX)),
    ("open", ENOSPC, named(INDEX)),
    ("write", ENOSPC, named(INDEX)),
]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
@pytest.mark.parametrize(("call", "code", "picks"), APPEND_FAULTS, ids=["open-EACCES", "open-ENOSPC", "write-ENOSPC"])
def test_appending_to_the_index(tmp_path, faults, store_url_of, kind, call, code, picks):
    path = tmp_path / "session"
    session, saved = make_session(path, None if kind == "file" else store_url_of(kind))
    faults.arm(call, code, picks)
    error = call_failing(faults, lambda: session.add(Task(jobname="not-indexed")))
    assert_says(error, code, str(path / INDEX))
    assert sorted(index_file_lines(path)) == sorted(saved)
    session.store.close()
    assert_intact(path, saved, [path])


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_short_write_to_the_index_is_never_acknowledged(tmp_path, faults, store_url_of, kind):
    """The disk fills up in the middle of a line: add must fail, or the whole id must be in the index.

    The torn line would read ``Task.1`` (of ``Task.13``), a task removed before: it must not come back.
    """
    path = tmp_path / "session"
    session, saved = make_session(path, None if kind == "file" else store_url_of(kind), count=12)
    assert "Task.1" in saved
    session.remove("Task.1")
    del saved["Task.1"]
    task = Task(jobname="half-written")
    faults.arm("short", ENOSPC, named(INDEX))
    try:
        oid = session.add(task)
    except Error as error:
        faults.disarm()
        assert task.persistent_id == "Task.13"
        assert_says(error, ENOSPC, str(path / INDEX))
    else:
        # acknowledged: it must be in the index, whole, and nothing else may have changed
        faults.disarm()
        assert oid == "Task.13"
        assert index_file_lines(path) == [*saved, oid], f"add returned {oid} but index.txt holds a torn line"
        saved[oid] = "half-written"
    session.store.close()
    reopened = open_checked(path, "after a short write to the index")
    try:
        assert set(reopened.tasks) - {"Task.13"} == set(saved) - {"Task.13"}
    finally:
        reopened.store.close()


# -- rewriting index.txt on remove ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "sqlite"])
@pytest.mark.parametrize(("call", "code", "picks"), atomic_faults(INDEX), ids=ATOMIC_IDS)
def test_rewriting_the_index_on_remove(tmp_path, faults, store_url_of, kind, call, code, picks):
    path = tmp_path / "session"
    session, saved = make_session(path, None if kind == "file" else store_url_of(kind))
    victim = next(iter(saved))
    faults.arm(call, code, picks)
    error = call_failing(faults, lambda: session.remove(victim))
    assert_says(error, code, str(path / INDEX))
    assert index_file_lines(path) == list(saved), "index.txt changed although its rewrite failed"
    session.store.close()
    # the index still names the task, so its record must still be there and load
    assert_intact(path, saved, [path])


# -- advancing the id counter -----------------------------------------------------------------


@pytest.mark.parametrize(("call", "code", "picks"), atomic_faults(COUNTER_FILENAME), ids=ATOMIC_IDS)
def test_advancing_the_id_counter(tmp_path, faults, call, code, picks):
    path = tmp_path / "session"
    session, saved = make_session(path)
    session.store.close()
    counter = path / Session.DEFAULT_STORE_DIR / COUNTER_FILENAME
    before = counter.read_text()
    session = Session(path)  # a new store handle: its first add takes numbers from the counter
    faults.arm(call, code, picks)
    error = call_failing(faults, lambda: session.add(Task(jobname="no-number")))
    assert_says(error, code, str(counter))
    assert counter.read_text() == before, "the counter file changed although writing it failed"
    session.store.close()
    assert_intact(path, saved, [path])


# -- writing store.url at creation ------------------------------------------------------------

STORE_URL = Session.STORE_URL_FILENAME


@pytest.mark.parametrize(("call", "code", "picks"), atomic_faults(STORE_URL), ids=ATOMIC_IDS)
def test_writing_store_url_at_creation(tmp_path, faults, call, code, picks):
    # an existing store holding tasks, and a directory holding a user's file: both must survive
    store_dir = tmp_path / "store"
    store = make_store(str(store_dir))
    kept = {store.save(Task(jobname=f"kept-{i}")): f"kept-{i}" for i in range(3)}
    store.close()
    path = tmp_path / "session"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    faults.arm(call, code, picks)
    error = call_failing(faults, lambda: Session(path, store_or_url=str(store_dir)))
    assert_says(error, code, str(path / STORE_URL))
    assert not temp_files(path, store_dir), f"temporary files left behind: {temp_files(path, store_dir)}"
    assert (path / "notes.txt").read_text() == "mine"
    store = make_store(str(store_dir))
    try:
        assert {oid: t.jobname for oid, t in store.load_many(kept).items()} == kept
    finally:
        store.close()
    # once the disk has room again, creating the session works
    session = Session(path, store_or_url=str(store_dir))
    try:
        assert (path / STORE_URL).read_text().strip() == str(store_dir)
        oid = session.add(Task(jobname="first"))
    finally:
        session.store.close()
    reopened = open_checked(path)
    try:
        assert list(reopened.tasks) == [oid]
    finally:
        reopened.store.close()
