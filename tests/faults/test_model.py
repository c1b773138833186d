"""Property-based tests: a Session behaves exactly like an in-memory model of it.

Hypothesis drives random sequences of ``add`` (with and without flush, new
objects, the same object again, objects removed or forgotten before),
``remove``, ``forget``, ``flush``, ``save_all`` after changing tasks,
reopening (a new Session on the same path, after nothing, a flush or a
close) and ``destroy``, on every kind of store, a fresh store for each
example.  After every step the session, its index file and its store must
match the model.

What the model promises, from the documented semantics:

* ``add(t)`` (flush) writes ``t`` (and its children) and everything pending;
  ``add(t, flush=False)`` keeps ``t`` in the session only, until ``flush``.
  Adding an object again that was removed or forgotten brings it back whole.
* ``remove(id)`` drops the task from the session and, once flushed, its
  record and its children's records from the store and its line from the
  index.  ``forget(id)`` does the same but keeps the records (a task never
  written yet is written at once).
* ``flush()`` writes the tasks added without flush, the index, and the
  deletions.  ``save_all()`` writes every task as it is now.  Nothing else
  writes a changed task.
* Reopening (eagerly, or lazily: tasks load when first touched) gives
  exactly the ids of the index file on disk, with the values last written;
  whatever was not flushed is gone (a task added with ``flush=False`` and
  never written is lost; a pending remove or forget did not happen).
* ``destroy()`` removes the session's tasks (and any it was asked to
  remove) from the store, keeps what it only forgot, and removes the
  directory; a store inside the directory goes with it.
* An id is never handed out twice by one store.

Shrinking is off by default (it can take minutes on a server store): set
``GC3SESSION_MODEL_SHRINK=1`` for the shortest failing sequence.  The plain
tests at the end replay the short sequences the model found.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from gc3session import Session, State, Task, TaskCollection

#: "file" keeps the store inside the session directory (the default); "file-outside" is a store directory elsewhere.
KINDS = ["file", "file-outside", "sqlite", "postgresql", "mysql"]
#: Examples and steps per kind: a fresh store per example costs little in files, more on a server.
BUDGET = {"file": (40, 50), "file-outside": (40, 50), "sqlite": (12, 40), "postgresql": (5, 30), "mysql": (5, 30)}
#: Shrinking a failure can take minutes, so it is off: set this to 1 to get the shortest failing sequence.
SHRINK_VARIABLE = "GC3SESSION_MODEL_SHRINK"


def settings_for(kind: str) -> settings:
    examples, steps = BUDGET[kind]
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get(SHRINK_VARIABLE):
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        phases=phases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


jobnames = st.text(alphabet=string.ascii_letters + string.digits + " '\";-_é", max_size=8)
states = st.sampled_from(list(State))
#: Whether a call flushes; mostly not, since trouble hides in what is pending.
flushes = st.sampled_from([False, False, True])
#: Few tasks at once, so that the steps keep meeting the same ones.
MAX_TASKS = 4


def values(task: Any) -> tuple[str, str]:
    return task.jobname, str(task.state)


def family(task: Any) -> list[Any]:
    """The task and its children (the model's collections are one level deep)."""
    return [task, *getattr(task, "tasks", [])]


class Model:
    """What the session, its index file and its store must hold."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[str, str]] = {}  # id -> (jobname, state) as last written
        self.issued: set[str] = set()  # every id the store handed out
        self.owner: dict[str, Any] = {}  # id -> the object in memory that has it
        self.children: dict[str, list[str]] = {}  # id -> its children's ids, as last written
        self.fresh_session()

    def claim(self, task: Any) -> None:
        """``task`` got its id from the store: no other object may ever have had it."""
        oid = task.persistent_id
        assert oid is not None, f"{task!r} should have been written by now, but it has no id"
        if self.owner.get(oid) is task:
            return
        assert oid not in self.issued, f"{oid} handed out twice"
        self.issued.add(oid)
        self.owner[oid] = task

    def adopt(self, task: Any) -> None:
        """``task`` was loaded from the store: it holds what was last written."""
        for member in family(task):
            self.owner[member.persistent_id] = member
            assert values(member) == self.stored[member.persistent_id], member.persistent_id
        assert [c.persistent_id for c in family(task)[1:]] == self.children.get(task.persistent_id, [])

    def family_ids(self, oid: str) -> list[str]:
        """``oid`` and its children's ids, from the object if loaded, else from what was written."""
        task = self.session[oid] if oid in self.session else self.detached.get(oid)
        if task is None:
            return [oid, *self.children.get(oid, [])]
        return [m.persistent_id for m in family(task) if m.persistent_id is not None]

    def fresh_session(self) -> None:
        self.index: list[str] = []  # index.txt on disk
        self.session: dict[str, Any] = {}  # id -> the task object in the session (None: not loaded yet)
        self.unsaved: set[str] = set()  # added without flush, never written since
        self.index_add: list[str] = []  # to append to the index at the next flush
        self.index_drop: set[str] = set()  # to drop from the index at the next flush
        self.delete: set[str] = set()  # records to delete at the next flush
        self.detached: dict[str, Any] = {}  # objects removed or forgotten, which may be added again

    def write(self, task: Any) -> None:
        for member in family(task):
            self.claim(member)
            self.stored[member.persistent_id] = values(member)
        self.children[task.persistent_id] = [c.persistent_id for c in family(task)[1:]]

    def flush(self) -> None:
        for oid in sorted(self.unsaved):
            self.write(self.session[oid])
        self.unsaved.clear()
        kept = [oid for oid in self.index if oid not in self.index_drop]
        self.index = kept + [oid for oid in self.index_add if oid not in kept]
        self.index_add.clear()
        self.index_drop.clear()
        for oid in self.delete:
            self.stored.pop(oid, None)
        self.delete.clear()

    def enter(self, oid: str, task: Any) -> None:
        """``task`` (new or detached) joins the session under ``oid``; the index learns it at the next flush."""
        self.session[oid] = task
        self.detached.pop(oid, None)
        if oid in self.index_drop:
            self.index_drop.discard(oid)
        elif oid not in self.index and oid not in self.index_add:
            self.index_add.append(oid)
        for member in family(task):
            self.delete.discard(member.persistent_id)

    def leave(self, oid: str) -> Any:
        task = self.session.pop(oid)
        if task is not None:
            self.detached[oid] = task
        while len(self.detached) > MAX_TASKS:  # the oldest cannot be added again any more: a small pool meets more
            del self.detached[next(iter(self.detached))]
        if oid in self.index_add:
            self.index_add.remove(oid)
        else:
            self.index_drop.add(oid)
        return task


def make_machine(kind: str, root: Path, url_of: Any) -> type[RuleBasedStateMachine]:
    counter = iter(range(10**6))

    class SessionMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.path = root / f"example-{next(counter)}" / "session"
            if kind == "file":
                self.url = None
            elif kind == "file-outside":
                self.url = str(self.path.parent / "store")
            else:
                self.url = url_of(kind)
            self.model = Model()
            self.handles: list[Any] = []
            self.session = self.open(create=True)

        def open(self, create: bool = False, lazy: bool = False) -> Session:
            session = Session(self.path, store_or_url=self.url) if create else Session(self.path, lazy=lazy)
            self.handles.append(session.store)
            return session

        def teardown(self) -> None:
            for store in self.handles:
                store.close()

        def touch(self, oid: str) -> Any:
            """The task ``oid`` of the session, loaded now if the session is lazy and has not yet."""
            task = self.session.tasks[oid]
            if self.model.session[oid] is None:
                self.model.adopt(task)
                self.model.session[oid] = task
            assert task is self.model.session[oid]
            return task

        # -- adding ---------------------------------------------------------

        @precondition(lambda self: len(self.model.session) < MAX_TASKS)
        @rule(jobname=jobnames, children=st.integers(0, 2), flush=flushes)
        def add_new(self, jobname: str, children: int, flush: bool) -> None:
            if children:
                kids = [Task(jobname=f"{jobname}/{i}") for i in range(children)]
                task: Any = TaskCollection(jobname=jobname, tasks=kids)
            else:
                task = Task(jobname=jobname)
            oid = self.session.add(task, flush=flush)
            assert oid == task.persistent_id
            self.model.claim(task)
            self.entered(oid, task, flush)

        @precondition(lambda self: self.model.session)
        @rule(data=st.data(), flush=flushes)
        def add_again(self, data: Any, flush: bool) -> None:
            oid = data.draw(st.sampled_from(sorted(self.model.session)))
            task = self.touch(oid)
            assert self.session.add(task, flush=flush) == oid
            if flush:
                self.model.unsaved.discard(oid)
                self.model.write(task)
                self.model.flush()

        @precondition(lambda self: self.model.detached)
        @rule(data=st.data(), flush=flushes)
        def add_detached(self, data: Any, flush: bool) -> None:
            oid = data.draw(st.sampled_from(sorted(self.model.detached)))
            task = self.model.detached[oid]
            assert self.session.add(task, flush=flush) == oid
            self.entered(oid, task, flush)

        def entered(self, oid: str, task: Any, flush: bool) -> None:
            """The model's side of adding a task that was not in the session."""
            self.model.enter(oid, task)
            if flush:
                self.model.write(task)
                self.model.flush()
            else:
                self.model.unsaved.add(oid)

        # -- removing -------------------------------------------------------

        @precondition(lambda self: self.model.session)
        @rule(data=st.data(), flush=flushes)
        def remove(self, data: Any, flush: bool) -> None:
            oid = data.draw(st.sampled_from(sorted(self.model.session)))
            self.session.remove(oid, flush=flush)
            self.model.delete.update(self.model.family_ids(oid))
            self.model.leave(oid)
            self.model.unsaved.discard(oid)
            if flush:
                self.model.flush()

        @precondition(lambda self: self.model.session)
        @rule(data=st.data(), flush=flushes)
        def forget(self, data: Any, flush: bool) -> None:
            oid = data.draw(st.sampled_from(sorted(self.model.session)))
            self.session.forget(oid, flush=flush)
            task = self.model.leave(oid)
            if oid in self.model.unsaved:  # a task never written is written now, so the store keeps it
                self.model.unsaved.discard(oid)
                self.model.write(task)
            if flush:
                self.model.flush()

        # -- changing, saving -------------------------------------------------

        @precondition(lambda self: self.model.session or self.model.detached)
        @rule(data=st.data(), jobname=st.none() | jobnames, state=states)
        def change(self, data: Any, jobname: str | None, state: State) -> None:
            pool = {**self.model.detached, **self.model.session}
            oid = data.draw(st.sampled_from(sorted(pool)))
            task = self.touch(oid) if oid in self.model.session else pool[oid]
            if jobname is not None:
                task.jobname = jobname
            task.execution.state = state

        @rule()
        def flush(self) -> None:
            self.session.flush()
            self.model.flush()

        @rule(flush=flushes)
        def save_all(self, flush: bool) -> None:
            self.session.save_all(flush=flush)
            for task in self.model.session.values():
                if task is not None:  # a task not loaded cannot have changed
                    self.model.write(task)
            self.model.unsaved.clear()
            if flush:
                self.model.flush()

        # -- reopening, destroying ----------------------------------------------

        @rule(before=st.sampled_from(["nothing", "flush", "close"]), lazy=st.booleans())
        def reopen(self, before: str, lazy: bool) -> None:
            if before == "flush":
                self.session.flush()
                self.model.flush()
            elif before == "close":
                self.session.close()
                for task in self.model.session.values():
                    if task is not None:
                        self.model.write(task)
                self.model.unsaved.clear()
                self.model.flush()
            self.session.store.close()
            self.session = self.open(lazy=lazy)
            index = self.model.index
            self.model.fresh_session()
            self.model.owner.clear()
            self.model.index = index
            assert self.session.load_errors == {}, f"tasks lost: {self.session.load_errors}"
            assert self.session.list_ids() == index
            for oid in index:
                self.model.session[oid] = None
                if not lazy:
                    self.touch(oid)

        @rule()
        def destroy(self) -> None:
            inside = kind == "file"
            doomed = set(self.model.delete)
            for oid in self.model.session:
                doomed.update(self.model.family_ids(oid))
            self.session.destroy()
            assert not self.path.exists()
            if inside:
                self.model.stored.clear()
                self.model.issued.clear()  # a new store: it starts counting again
            else:
                for oid in doomed:
                    self.model.stored.pop(oid, None)
            self.model.fresh_session()
            self.model.owner.clear()
            self.session = self.open(create=True)

        # -- what must hold after every step ------------------------------------

        @invariant()
        def session_matches(self) -> None:
            assert set(self.session.list_ids()) == set(self.model.session)
            for oid, task in self.model.session.items():
                if task is not None:
                    assert self.session.tasks[oid] is task
            assert self.session.load_errors == {}

        @invariant()
        def index_file_matches(self) -> None:
            lines = [line for line in (self.path / "index.txt").read_text().splitlines() if line.strip()]
            assert lines == self.model.index, f"index.txt {lines} but the model says {self.model.index}"

        @invariant()
        def store_matches(self) -> None:
            store = self.session.store
            assert set(store.list()) == set(self.model.stored), (
                f"store holds {sorted(store.list())}, the model says {sorted(self.model.stored)}"
            )
            for oid, meta in store.iter_metadata():
                assert isinstance(meta, dict), meta
                assert (meta["jobname"], meta["state"]) == self.model.stored[oid], oid

    SessionMachine.__name__ = f"SessionMachine_{kind.replace('-', '_')}"
    return SessionMachine


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_behaves_like_its_model(tmp_path, store_url_of, kind):
    if kind in ("postgresql", "mysql"):
        store_url_of(kind)  # skip (or fail) here, before Hypothesis starts, if the server is missing
    run_state_machine_as_test(make_machine(kind, tmp_path, store_url_of), settings=settings_for(kind))


# -- the shortest sequences the model found, as plain tests ---------------------------------------
#
# Each names the promise it checks; they fail for the same reasons as the model, every time.

SERVER_OR_FILE = ["file", "sqlite", "postgresql", "mysql"]


@pytest.fixture
def session_of(tmp_path, store_url_of):
    """A new session over a store of a kind ("file": the default store inside the session)."""
    opened: list[Session] = []

    def make(kind: str, outside: bool = False) -> Session:
        if kind == "file":
            url = str(tmp_path / "store") if outside else None
        else:
            url = store_url_of(kind)
        session = Session(tmp_path / "s", store_or_url=url)
        opened.append(session)
        return session

    yield make
    for session in opened:
        session.store.close()


def reopened(session: Session) -> Session:
    session.store.close()
    return Session(session.path)


@pytest.mark.parametrize("kind", SERVER_OR_FILE)
def test_adding_a_pending_task_again_with_flush_writes_it_to_the_index(session_of, kind):
    session = session_of(kind)
    task = Task(jobname="t")
    oid = session.add(task, flush=False)
    assert session.add(task, flush=True) == oid
    assert oid in (Path(session.path) / "index.txt").read_text().split()
    assert reopened(session).list_ids() == [oid]


@pytest.mark.parametrize("collection", [False, True], ids=["task", "collection"])
@pytest.mark.parametrize("kind", SERVER_OR_FILE)
def test_a_task_removed_and_added_back_before_a_flush_is_kept(session_of, kind, collection):
    session = session_of(kind)
    task = TaskCollection(jobname="c", tasks=[Task(jobname="child")]) if collection else Task(jobname="t")
    first = session.add(task, flush=collection)  # a collection written once, so its child has an id
    session.remove(first, flush=False)
    session.add(task)  # changed my mind: keep it
    again = reopened(session)
    assert again.load_errors == {}
    assert again.list_ids() == [first]
    assert [t.jobname for t in family(again.tasks[first])] == [t.jobname for t in family(task)]


@pytest.mark.parametrize("kind", SERVER_OR_FILE)
def test_a_collection_removed_and_added_back_keeps_its_children(session_of, kind):
    session = session_of(kind)
    grid = TaskCollection(jobname="grid", tasks=[Task(jobname="a"), Task(jobname="b")])
    oid = session.add(grid)
    session.remove(oid)
    assert session.add(grid) == oid
    again = reopened(session)
    assert again.load_errors == {}
    assert [t.jobname for t in again.tasks[oid].tasks] == ["a", "b"]


@pytest.mark.parametrize("kind", SERVER_OR_FILE)
def test_destroy_removes_what_was_removed_without_flush_and_keeps_what_was_forgotten(session_of, kind):
    session = session_of(kind, outside=True)
    store = session.store
    kept, removed, forgotten = (session.add(Task(jobname=name)) for name in ("kept", "removed", "forgotten"))
    session.remove(removed, flush=False)
    session.forget(forgotten, flush=False)
    listed_before = set(store.list())
    session.destroy()
    from gc3session.persistence import make_store

    check = make_store(store.url)
    try:
        left = set(check.list())
    finally:
        check.close()
    assert left == listed_before - {kept, removed}, f"left in the store: {sorted(left)}"


@pytest.mark.parametrize("kind", SERVER_OR_FILE)
def test_a_lazy_session_is_destroyed_without_loading_its_tasks(session_of, kind):
    session = session_of(kind, outside=True)
    session.add(Task(jobname="t"))
    session.add(TaskCollection(jobname="grid", tasks=[Task(jobname="a")]))
    url = session.store.url
    session.store.close()
    lazy = Session(session.path, lazy=True)
    lazy.destroy()
    assert not Path(session.path).exists()
    from gc3session.persistence import make_store

    check = make_store(url)
    try:
        assert check.list() == []
    finally:
        check.close()
