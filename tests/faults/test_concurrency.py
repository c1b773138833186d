"""Many processes, and simulated machines, writing into one session and one store at once.

Workers are processes running the scripts below, forked by the fork server of
``fault_helpers`` (one per simulated machine, started with that machine's
environment); each prints a line for every call that has returned (its
acknowledgement).  They wait at a gate (a
directory) until all have started, so that they really run at the same time.

What must hold, precisely:

- every acknowledged ``add`` that no process later removed is in ``index.txt``,
  and every id the session holds loads with the content it was saved with;
- an acknowledged ``remove`` (that its process did not undo by adding the task
  back) is not in ``index.txt`` and its record is gone from the store;
- ``index.txt`` never names an id twice, and no id is ever handed out twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_helpers import Child, ForkServer, index_file_lines, open_checked, seeded_random

# isort: split
from fault_helpers import children_fixture, fork_server  # noqa: F401 - the fixtures "children", "fork_server"

from gc3session import Session
from gc3session.persistence import make_store

KINDS = ["file", "sqlite", "postgresql"]
ADDERS, ADDS = 8, 250
CHURNERS, CHURNS = 2, 150
GATE_TIMEOUT = 120.0

#: A worker: ``add`` adds tasks one by one; ``churn`` adds, removes and re-adds its own tasks.
WORKER = r"""
import random, sys, time
from pathlib import Path
from gc3session import Session, Task

mode, path, tag, count, gate, seed = sys.argv[1:7]
count = int(count)
session = Session(path)
Path(gate, f"ready-{tag}").touch()
while not Path(gate, "go").exists():
    time.sleep(0.002)

if mode == "add":
    for i in range(count):
        name = f"{tag}-{i}"
        oid = session.add(Task(jobname=name))
        print("added", oid, name, flush=True)

elif mode == "churn":
    rng = random.Random(seed)
    live, gone = {}, {}  # this worker's tasks in the session, and those it removed
    for i in range(count):
        r = rng.random()
        if r < 0.35 or not live:
            task = Task(jobname=f"{tag}-{i}")
            oid = session.add(task)
            live[oid] = task
            print("added", oid, task.jobname, flush=True)
        elif r < 0.6:
            oid = rng.choice(sorted(live))
            session.remove(oid)
            gone[oid] = live.pop(oid)
            print("removed", oid, flush=True)
        elif r < 0.8 and gone:
            oid = rng.choice(sorted(gone))
            task = gone.pop(oid)
            assert session.add(task) == oid
            live[oid] = task
            print("added", oid, task.jobname, flush=True)
        else:
            # one flush for several changes: remove some, put one of them back, add a new one
            picked = rng.sample(sorted(live), min(3, len(live)))
            for oid in picked:
                session.remove(oid, flush=False)
            back = picked[0] if picked and rng.random() < 0.5 else None
            if back is not None:
                session.add(live[back], flush=False)
            task = Task(jobname=f"{tag}-{i}")
            new = session.add(task, flush=False)
            session.flush()
            for oid in picked:
                if oid != back:
                    gone[oid] = live.pop(oid)
                    print("removed", oid, flush=True)
                else:
                    print("added", oid, live[oid].jobname, flush=True)
            live[new] = task
            print("added", new, task.jobname, flush=True)
session.store.close()
print("finished", flush=True)
"""


def run_at_once(gate: Path, jobs: list[tuple[ForkServer, str, list[object]]]) -> list[list[str]]:
    """Start each ``(server, script, args)``, open the gate once all wait at it, return each one's lines."""
    gate.mkdir(parents=True, exist_ok=True)
    started: list[Child] = [server.start(script, args, f"worker{n}") for n, (server, script, args) in enumerate(jobs)]
    deadline = time.monotonic() + GATE_TIMEOUT
    while len(list(gate.glob("ready-*"))) < len(jobs):
        dead = [c for c in started if c.poll() is not None]
        if dead:
            raise AssertionError(f"a worker died before the gate opened:\n{dead[0].stderr()}")
        assert time.monotonic() < deadline, "workers never reached the gate"
        time.sleep(0.005)
    (gate / "go").touch()
    outputs = [child.finish() for child in started]
    for child, lines in zip(started, outputs, strict=True):
        assert lines and lines[-1] == "finished", f"worker stopped early:\n{child.stderr()}"
        child.assert_quiet("(a worker)")
    return outputs


def replay(outputs: list[list[str]]) -> tuple[dict[str, str], set[str], dict[str, int]]:
    """From the workers' acknowledgements: ``{id: jobname}`` of tasks that must be there, ids that must not,
    and which worker each id belongs to."""
    present: dict[str, str] = {}
    removed: set[str] = set()
    owner: dict[str, int] = {}
    for worker, lines in enumerate(outputs):
        for line in lines:
            word, *fields = line.split()
            if word == "added":
                oid, name = fields
                assert owner.setdefault(oid, worker) == worker, f"id {oid} handed out to two workers"
                present[oid] = name
                removed.discard(oid)
            elif word == "removed":
                present.pop(fields[0])
                removed.add(fields[0])
    return present, removed, owner


def check_session(path: Path, present: dict[str, str], removed: set[str]) -> None:
    lines = index_file_lines(path)
    assert len(lines) == len(set(lines)), f"index.txt names {len(lines) - len(set(lines))} id(s) twice"
    lost = sorted(set(present) - set(lines))
    assert not lost, f"{len(lost)} acknowledged adds are missing from index.txt: {lost[:10]}"
    undone = sorted(removed & set(lines))
    assert not undone, f"{len(undone)} acknowledged removals are back in index.txt: {undone[:10]}"
    assert set(lines) == set(present), f"index.txt names tasks nobody added: {sorted(set(lines) - set(present))[:10]}"
    session = open_checked(path)
    try:
        assert {oid: t.jobname for oid, t in session.tasks.items()} == present
        listed = set(session.store.list())
        assert set(present) <= listed
        assert not (removed & listed), f"removed tasks left in the store: {sorted(removed & listed)[:10]}"
    finally:
        session.store.close()


def new_session(path: Path, kind: str, store_url_of: Callable[[str], str]) -> None:
    Session(path, store_or_url=None if kind == "file" else store_url_of(kind)).store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_eight_processes_adding_to_one_session(kind, tmp_path, store_url_of, children):
    path = tmp_path / "session"
    new_session(path, kind, store_url_of)
    jobs = [(children, WORKER, ["add", path, f"a{n}", ADDS, tmp_path / "gate", 0]) for n in range(ADDERS)]
    outputs = run_at_once(tmp_path / "gate", jobs)
    present, removed, _ = replay(outputs)
    assert len(present) == ADDERS * ADDS
    assert len(index_file_lines(path)) == ADDERS * ADDS
    check_session(path, present, removed)


@pytest.mark.parametrize("kind", KINDS)
def test_eight_adders_while_two_processes_remove_and_re_add(kind, tmp_path, store_url_of, children):
    rng, seed_note = seeded_random(f"churn-{kind}")
    path = tmp_path / "session"
    new_session(path, kind, store_url_of)
    gate = tmp_path / "gate"
    jobs = [(children, WORKER, ["add", path, f"a{n}", ADDS, gate, 0]) for n in range(ADDERS)]
    jobs += [
        (children, WORKER, ["churn", path, f"c{n}", CHURNS, gate, rng.randrange(2**32)]) for n in range(CHURNERS)
    ]
    outputs = run_at_once(gate, jobs)
    present, removed, owner = replay(outputs)
    adders = {oid for oid, worker in owner.items() if worker < ADDERS}
    assert len(adders) == ADDERS * ADDS and adders <= set(present), seed_note
    assert removed, f"the churners removed nothing {seed_note}"
    try:
        check_session(path, present, removed)
    except AssertionError as error:
        raise AssertionError(f"{error} {seed_note}") from None


# -- two machines sharing one store -------------------------------------------------------

MACHINES, PROCESSES, TASKS = 2, 2, 120

#: A process on a "machine": adds tasks to the machine's session, saves others to the store only,
#: and changes and saves again some it added; prints each object's content once the call returned.
MACHINE_WORKER = r"""
import json, os, secrets, sys, time
from pathlib import Path
from gc3session import Session, Task

path, url, tag, count, gate, creator = sys.argv[1:7]
count = int(count)
if creator == "1":
    Session(path, store_or_url=url).store.close()
    Path(gate, f"created-{os.environ['MACHINE']}").touch()
else:
    while not Path(gate, f"created-{os.environ['MACHINE']}").exists():
        time.sleep(0.002)
session = Session(path)
Path(gate, f"ready-{tag}").touch()
while not Path(gate, "go").exists():
    time.sleep(0.002)

def say(kind, task):
    record = {"kind": kind, "id": task.persistent_id, "jobname": task.jobname, "token": task.token}
    print(json.dumps(record), flush=True)

mine = []
for i in range(count):
    task = Task(jobname=f"{tag}-{i}", token=secrets.token_hex(8), machine=os.environ["MACHINE"])
    session.add(task)
    mine.append(task)
    say("added", task)
    if i % 3 == 0:
        other = Task(jobname=f"{tag}-s{i}", token=secrets.token_hex(8))
        session.save(other)
        say("saved", other)
    if i % 5 == 4:
        old = mine[i // 2]
        old.token = secrets.token_hex(8)
        session.add(old)  # already in the session and changed: saved again
        say("changed", old)
for task in mine[::7]:
    task.token = secrets.token_hex(8)
session.save_all()
for task in mine[::7]:
    say("changed", task)
session.store.close()
print("finished", flush=True)
"""


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[[str], ForkServer]]:
    """``machines(name)``: a fork server whose environment is that machine's own."""
    servers: list[ForkServer] = []

    def machine(name: str) -> ForkServer:
        env = machine_env(tmp_path / "machines", name)
        server = ForkServer(tmp_path / "machines" / name / "processes", env=env)
        servers.append(server)
        return server

    yield machine
    for server in servers:
        server.close()


def machine_env(root: Path, name: str) -> dict[str, str]:
    """An environment in which nothing per-user is shared with another machine."""
    home = root / name / "home"
    env = dict(os.environ)
    env.update(
        MACHINE=name,
        HOSTNAME=name,
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        GC3SESSION_DATA_DIR=str(root / name / "gc3session-data"),
        TMPDIR=str(root / name / "tmp"),
    )
    for variable in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "TMPDIR"):
        os.makedirs(env[variable], exist_ok=True)
    return env


@pytest.mark.parametrize("kind", KINDS)
def test_two_machines_sharing_one_store(kind, tmp_path, store_url_of, machines):
    url = str(tmp_path / "shared-store") if kind == "file" else store_url_of(kind)
    gate = tmp_path / "gate"
    gate.mkdir()
    jobs = []
    for m in range(MACHINES):
        name = f"m{m}"
        server = machines(name)
        session_path = Path(server.env["HOME"], "session")
        for p in range(PROCESSES):
            jobs.append((server, MACHINE_WORKER, [session_path, url, f"{name}p{p}", TASKS, gate, int(p == 0)]))
    outputs = run_at_once(gate, jobs)

    content: dict[str, dict[str, str]] = {}  # id -> the last content its process saved
    owner: dict[str, int] = {}
    added_by_machine: dict[str, set[str]] = {f"m{m}": set() for m in range(MACHINES)}
    for worker, lines in enumerate(outputs):
        machine = f"m{worker // PROCESSES}"
        for line in lines[:-1]:
            record = json.loads(line)
            oid = record["id"]
            assert owner.setdefault(oid, worker) == worker, f"id {oid} handed out to two processes"
            content[oid] = {"jobname": record["jobname"], "token": record["token"]}
            if record["kind"] == "added":
                added_by_machine[machine].add(oid)
    expected = MACHINES * PROCESSES * (TASKS + len(range(0, TASKS, 3)))
    assert len(content) == expected, f"{expected - len(content)} ids handed out twice"

    store = make_store(url)
    try:
        assert set(content) <= set(store.list())
        loaded = store.load_many(content)
        overwritten = {
            oid: (content[oid], {"jobname": task.jobname, "token": task.token})
            for oid, task in loaded.items()
            if content[oid] != {"jobname": task.jobname, "token": task.token}
        }
        assert not overwritten, (
            f"{len(overwritten)} objects do not hold what was saved: {list(overwritten.items())[:3]}"
        )
    finally:
        store.close()
    for m in range(MACHINES):
        session_path = tmp_path / "machines" / f"m{m}" / "home" / "session"
        assert set(index_file_lines(session_path)) == added_by_machine[f"m{m}"], (
            f"machine m{m}'s session holds others' tasks"
        )
        session = open_checked(session_path)
        try:
            assert {t.machine for t in session.tasks.values()} == {f"m{m}"}
            assert len(session) == PROCESSES * TASKS
        finally:
            session.store.close()
