"""Build a session of a few hundred tasks, run them on paper, reopen it, summarise.

Usage: python examples/quickstart.py [SESSION_DIR]

SESSION_DIR defaults to ./quickstart-session.  A session already there is
replaced; any other non-empty directory is left alone and the script stops.
Only the public API is used: Session, Task, TaskCollection and State.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from gc3session import Session, State, Task, TaskCollection

SWEEPS = 20  # parameter sweeps, each a TaskCollection
POINTS = 15  # tasks in each sweep
SINGLES = 12  # tasks that stand on their own


def build(path: Path) -> list[str]:
    """Create a new session at ``path`` and add every task to it; return the top-level ids."""
    session = Session(path)
    for s in range(SWEEPS):
        points = [Task(jobname=f"sweep{s:02d}-p{p:02d}", alpha=0.05 * p, seed=s) for p in range(POINTS)]
        session.add(TaskCollection(jobname=f"sweep{s:02d}", tasks=points), flush=False)
    for n in range(SINGLES):
        session.add(Task(jobname=f"report-{n:02d}", kind="report"), flush=False)
    session.flush()  # one batch: saves every new task and appends the ids to index.txt
    return session.list_ids()


def run_on_paper(path: Path) -> None:
    """Reopen the session and move its tasks through their states, as a scheduler would."""
    rng = random.Random(42)
    session = Session(path)
    for task in session.iter_workflow():
        if isinstance(task, TaskCollection):
            continue
        task.state = State.SUBMITTED
        roll = rng.random()
        if roll < 0.15:
            task.state = State.RUNNING
        elif roll < 0.25:
            task.state = State.UNKNOWN
        elif roll > 0.3:
            task.state = State.RUNNING
            task.state = State.TERMINATED
            task.execution.returncode = 0 if roll < 0.9 else rng.choice([1, 2, 137])
            if task.execution.returncode:
                task.execution.info = f"exited with code {task.execution.returncode}"
    for sweep in session:
        if isinstance(sweep, TaskCollection):
            states = {child.state for child in sweep.tasks}
            sweep.state = State.TERMINATED if states == {State.TERMINATED} else State.RUNNING
    session.save_all()  # writes only the tasks whose `changed` flag is set
    session.set_end_timestamp()


def summarise(path: Path, elapsed: float) -> None:
    """Open the session afresh and print what it holds."""
    session = Session(path, create=False)
    tasks = list(session.iter_workflow())
    leaves = [t for t in tasks if not isinstance(t, TaskCollection)]
    by_state = Counter(t.state for t in tasks)
    failed = [t for t in leaves if t.state == State.TERMINATED and t.execution.returncode]
    print(f"session    {session.path}")
    print(f"store      {session.store_url} -> {session.store}")
    print(f"top level  {len(session)} tasks ({SWEEPS} collections, {SINGLES} single tasks)")
    print(f"in all     {len(tasks)} tasks, {len(leaves)} of them leaves")
    for state in State:
        if by_state[state]:
            print(f"  {state.value:<11} {by_state[state]:4d}")
    print(f"failed     {len(failed)} terminated with a non-zero return code")
    print(f"first ids  {', '.join(session.list_ids()[:4])}")
    first = session.tasks[session.list_ids()[0]]
    print(f"           {first.persistent_id} holds {', '.join(c.persistent_id for c in first.tasks[:3])}, ...")
    print(f"load errs  {len(session.load_errors)}")
    print(f"took       {elapsed:.2f} s")


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "quickstart-session")
    if path.exists():
        is_session = (path / Session.INDEX_FILENAME).exists() or (path / Session.STORE_URL_FILENAME).exists()
        if not path.is_dir() or (not is_session and any(path.iterdir())):
            print(f"error: {path} exists and is not a session; choose another directory", file=sys.stderr)
            return 2
        shutil.rmtree(path)
    start = time.perf_counter()
    ids = build(path)
    run_on_paper(path)
    reopened = Session(path, create=False)
    if reopened.list_ids() != ids:
        print("error: the reopened session does not hold the tasks that were added", file=sys.stderr)
        return 1
    summarise(path, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
