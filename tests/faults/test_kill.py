"""kill -9 at a random moment: a session keeps every task it acknowledged and opens cleanly.

A child process works on a session and prints a line each time a call has
returned (its acknowledgement); the test kills it with SIGKILL after a random
delay (seeded: the seed is printed, and ``GC3SESSION_FAULT_SEED`` replays it),
then reopens the session and checks it.  Children are forked by the fork
server of ``fault_helpers`` (a subprocess that has imported gc3session and the
database drivers once), so that interpreter start-up does not dominate the run
time; each child opens the session itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_helpers import Child, ForkServer, assert_no_temp_ids, index_file_lines, open_checked, seeded_random

# isort: split
from fault_helpers import children_fixture, fork_server  # noqa: F401 - the fixtures "children", "fork_server"

from gc3session import Session, Task
from gc3session.persistence import make_store
from gc3session.session import read_store_url, resolve_store_url

KINDS = ["file", "sqlite", "postgresql"]
KILLS = 20
#: Longest random delay between the child's "ready" and its SIGKILL, while adding.
ADD_DELAY = 0.15
#: Longest delay for a kill while the child is still starting.
EARLY_DELAY = 0.05

#: The child: open the session, then work in ``mode`` and print one line per acknowledged call.
CHILD = r"""
import sys
from gc3session import Session, State, Task

path, mode, run, *extra = sys.argv[1:]
run = int(run)
session = Session(path)
print("ready", flush=True)

if mode == "add":
    i = 0
    while True:
        name = f"r{run}-{i}"
        oid = session.add(Task(jobname=name, payload=name * 50))
        print("added", oid, name, flush=True)
        i += 1

elif mode == "remove":
    batch = int(extra[0])
    ids = session.list_ids()
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        if batch == 1:
            session.remove(chunk[0])
        else:
            for oid in chunk:
                session.remove(oid, flush=False)
            session.flush()
        for oid in chunk:
            print("removed", oid, flush=True)

elif mode == "save_all":
    for task in session.tasks.values():
        task.generation = run
        task.execution.state = State.RUNNING if run % 2 else State.TERMINATED
    print("start", flush=True)
    session.save_all()
    print("done", flush=True)

elif mode == "flush":
    count = int(extra[0])
    for i in range(count):
        name = f"f{run}-{i}"
        oid = session.add(Task(jobname=name), flush=False)
        print("pending", oid, name, flush=True)
    print("start", flush=True)
    session.flush()
    print("done", flush=True)
"""


class Runner:
    """Starts the children of one test, numbering their runs."""

    def __init__(self, server: ForkServer, path: Path) -> None:
        self.server = server
        self.path = path
        self.count = 0

    def next(self, mode: str, *extra: object) -> Child:
        """A child doing run ``count`` in ``mode``."""
        self.count += 1
        return self.server.start(CHILD, [self.path, mode, self.count, *extra], mode)


def new_session(path: Path, kind: str, store_url_of: Callable[[str], str]) -> Path:
    """A new session: default store inside it for ``file``, the test server or file for the others."""
    url = None if kind == "file" else store_url_of(kind)
    Session(path, store_or_url=url).store.close()
    return path


def parse(lines: list[str], word: str) -> list[list[str]]:
    return [line.split()[1:] for line in lines if line.split()[:1] == [word]]


# -- kill -9 while adding ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kill_while_adding_loses_no_acknowledged_task(kind, tmp_path, store_url_of, children):
    rng, seed_note = seeded_random(f"kill-add-{kind}")
    path = tmp_path / "session"
    runner = Runner(children, path)
    new_session(path, kind, store_url_of)
    acknowledged: dict[str, str] = {}  # id -> jobname, over every run
    for run in range(1, KILLS + 1):
        child = runner.next("add")
        early = rng.random() < 0.2  # now and then, while the child is still opening the session
        if not early:
            child.wait_for("ready")
        delay = rng.uniform(0, EARLY_DELAY if early else ADD_DELAY)
        time.sleep(delay)
        child.kill()
        child.assert_quiet(f"(run {run})")
        moment = f"{delay:.3f}s after {'the fork' if early else 'ready'}"
        context = f"after kill {run} of {KILLS} ({kind}, {moment}) {seed_note}"
        for oid, name in parse(child.lines(), "added"):
            assert oid not in acknowledged, f"id {oid} handed out twice ({acknowledged[oid]} and {name}) {context}"
            acknowledged[oid] = name

        session = open_checked(path, context)
        try:
            in_session = set(session.list_ids())
            missing = sorted(set(acknowledged) - in_session)
            assert not missing, f"acknowledged tasks lost {context}: {missing[:10]}"
            wrong = {oid: session.tasks[oid].jobname for oid, name in acknowledged.items()
                     if session.tasks[oid].jobname != name}
            assert not wrong, f"tasks hold another task's content {context}: {wrong}"
            # at most one task per kill was saved but not yet acknowledged
            extra = in_session - set(acknowledged)
            assert len(extra) <= run, f"tasks nobody added are in the session {context}: {sorted(extra)[:10]}"
            assert_no_temp_ids(session, context)
            assert set(acknowledged) <= set(session.store.list()), f"acknowledged records missing {context}"
            lines = index_file_lines(path)
            assert len(lines) == len(set(lines)), f"index.txt names a task twice {context}"
        finally:
            session.store.close()
    # a second handle on the store, opened afresh, loads every acknowledged task too
    store = make_store(resolve_store_url(path, read_store_url(path)))
    try:
        loaded = store.load_many(acknowledged)
        assert {oid: task.jobname for oid, task in loaded.items()} == acknowledged
    finally:
        store.close()
    print(f"{kind}: {len(acknowledged)} tasks acknowledged over {KILLS} kills")


# -- kill -9 in the middle of remove, save_all and flush of a 5,000-task session -------------

BIG = 5000
BULK_KILLS = 2
FLUSH_COUNT = 1000


@pytest.mark.parametrize("kind", KINDS)
def test_kill_during_remove_save_all_and_flush_of_a_big_session(kind, tmp_path, store_url_of, children):
    rng, seed_note = seeded_random(f"kill-bulk-{kind}")
    path = tmp_path / "session"
    runner = Runner(children, path)
    url = None if kind == "file" else store_url_of(kind)
    session = Session(path, store_or_url=url)
    for i in range(BIG):
        session.add(Task(jobname=f"t{i}", generation=0), flush=False)
    session.flush()
    session.store.close()
    names: dict[str, str] = {oid: task.jobname for oid, task in session.tasks.items()}  # every id ever handed out
    current = set(names)  # what the session must hold now
    generation = {oid: 0 for oid in names}

    def check(context: str) -> Session:
        """Open; every task in index.txt loads, holds its own content, and is no temporary file."""
        reopened = open_checked(path, context)
        try:
            in_index = set(index_file_lines(path))
            assert set(reopened.list_ids()) == in_index, f"tasks in index.txt not in the session {context}"
            wrong = {oid: t.jobname for oid, t in reopened.tasks.items() if names.get(oid) != t.jobname}
            assert not wrong, f"tasks hold another task's content (or were never added) {context}: {list(wrong)[:5]}"
            assert_no_temp_ids(reopened, context)
        except BaseException:
            reopened.store.close()
            raise
        return reopened

    # -- remove: one at a time (index rewritten each time), then in batches (one flush per batch)
    for run, batch in enumerate([1, 100][:BULK_KILLS] + [1] * (BULK_KILLS - 2), 1):
        child = runner.next("remove", batch)
        child.wait_for("ready")
        delay = rng.uniform(0.02, 0.4)
        time.sleep(delay)
        child.kill()
        child.assert_quiet(f"(run {run})")
        context = f"after kill {run} during remove (batch {batch}, {kind}, {delay:.3f}s) {seed_note}"
        removed = {fields[0] for fields in parse(child.lines(), "removed")}
        reopened = check(context)
        try:
            now = set(reopened.list_ids())
            assert not (now & removed), f"acknowledged removals undone {context}: {sorted(now & removed)[:5]}"
            gone = current - now - removed
            assert len(gone) <= batch, f"tasks lost that nobody removed {context}: {sorted(gone)[:10]}"
            assert now <= current, f"tasks appeared {context}"
            still_stored = removed & set(reopened.store.list())
            assert not still_stored, (
                f"acknowledged removals left records in the store {context}: {sorted(still_stored)[:5]}"
            )
            current = now
        finally:
            reopened.store.close()

    # -- save_all of every task: one run to completion to time it, then kills inside it
    duration = None
    for run in range(BULK_KILLS + 1):
        child = runner.next("save_all")
        gen = runner.count
        duration, context = complete_or_kill(child, duration, rng, f"save_all ({kind})", run, seed_note)
        done = bool(parse(child.lines(), "done"))
        reopened = check(context)
        try:
            assert set(reopened.list_ids()) == current, f"save_all changed which tasks the session holds {context}"
            seen = {oid: getattr(t, "generation", None) for oid, t in reopened.tasks.items()}
            bad = {oid: g for oid, g in seen.items() if g not in (generation[oid], gen)}
            assert not bad, f"tasks hold neither their old nor their new content {context}: {list(bad.items())[:5]}"
            if done:
                stale = [oid for oid, g in seen.items() if g != gen]
                assert not stale, f"save_all returned but tasks were not saved {context}: {stale[:5]}"
            generation.update(seen)
        finally:
            reopened.store.close()

    # -- flush of tasks added with flush=False: one run to completion to time it, then kills
    duration = None
    for run in range(BULK_KILLS + 1):
        child = runner.next("flush", FLUSH_COUNT)
        duration, context = complete_or_kill(child, duration, rng, f"flush ({kind})", run, seed_note)
        pending = {oid: name for oid, name in parse(child.lines(), "pending")}
        assert len(pending) == FLUSH_COUNT
        reused = set(pending) & set(names)
        assert not reused, f"ids handed out twice {context}: {sorted(reused)[:5]}"
        names.update(pending)
        done = bool(parse(child.lines(), "done"))
        reopened = check(context)
        try:
            now = set(reopened.list_ids())
            lost = current - now
            assert not lost, f"tasks lost by a flush {context}: {sorted(lost)[:10]}"
            assert now - current <= set(pending), f"tasks appeared that the child never added {context}"
            if done:
                unflushed = set(pending) - now
                assert not unflushed, (
                    f"flush returned but tasks are not in the session {context}: {sorted(unflushed)[:5]}"
                )
            current = now
        finally:
            reopened.store.close()


def complete_or_kill(child, duration, rng, what, run, seed_note):
    """The first time, let the child finish and time it; later, kill it at a random moment within that time.

    Returns the duration and a context line for assertion messages.
    """
    child.wait_for("start")
    started = time.monotonic()
    if duration is None:
        child.wait_for("done")
        duration = time.monotonic() - started
        child.finish()
        child.assert_quiet("(complete run)")
        return duration, f"after a complete {what} {seed_note}"
    delay = rng.uniform(0, duration)
    time.sleep(delay)
    child.kill()
    child.assert_quiet(f"(run {run})")
    return duration, f"after kill {run} during {what} ({delay:.3f}s of ~{duration:.3f}s) {seed_note}"
