"""Benchmark gc3session against the floor the hardware and the serializer force.

Runs each workload on the filesystem store, SQLite and, where reachable,
PostgreSQL, each in a fresh process (so peak memory is the workload's own),
and prints a table of time, throughput, peak memory and the ratio to the
floor measured in the same run:

    python benchmarks/run.py              # N = 10,000
    python benchmarks/run.py --n 100000 --json results.json

Workloads:
  1  add 2N tasks, flushing after each; per-add cost of the last 1,000 vs the first 1,000 (sum, and median)
  2  add N tasks with flush=False, then one flush()
  3  reopen a session of N tasks (and lazily, with lazy=True); run five times, the fastest counts
  4  change every task's state and save_all()
  5  session-tool ls of the session (table format, piped); run five times, the fastest counts.  On files,
     also a bare loop over the same files (open, read, close, JSON line, row): the most a listing that
     reads each record's file can gain against reopening
  6  remove half the tasks in one batch, then destroy() the rest; vs one-by-one removal
     (the per-task cost of removing 500 tasks one at a time from a session of N)
  floor: pickle.dumps each task, then one executemany transaction into a bare
         two-column SQLite table, or one file per object with os.replace; then
         read back and unpickled (with the cyclic garbage collector paused, as
         the stores pause it).  Measured before and after the workloads (the
         lower of the two counts; for file writes, whose cost swings several-fold
         from one minute to the next on a shared machine, the ratios show both).
         With PostgreSQL, also its own floor: the same through psycopg alone,
         into a bare two-column table on the same server.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pickle
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

POSTGRES_URL = os.environ.get("GC3SESSION_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def make_tasks(n: int, start: int = 0) -> list[Any]:
    """Tasks shaped like a grid-computing job: command line, files, environment, resources (~1 KiB pickled)."""
    from gc3session import Task

    return [
        Task(
            jobname=f"job-{i:07d}",
            arguments=["./simulate", "--seed", str(i), "--alpha", f"{i * 0.001:.3f}", "--steps", "10000"],
            inputs={f"/data/sweep/input-{k}.dat": f"input-{k}.dat" for k in range(5)},
            outputs=[f"result-{i}.h5", "simulate.log"],
            environment={"OMP_NUM_THREADS": "4", "LANG": "C", "SWEEP": "fine", "SEED": str(i)},
            requested_cores=4,
            requested_memory=8 * 2**30,
            requested_walltime=3600,
            output_dir=f"/scratch/sweep/job-{i:07d}",
            stdout="stdout.txt",
            stderr="stderr.txt",
            tags=["sweep", "fine-grid"],
            params={"alpha": i * 0.001, "seed": i},
        )
        for i in range(start, start + n)
    ]


def store_url(kind: str, workdir: Path, table: str) -> str | None:
    if kind == "file":
        return None
    if kind == "sqlite":
        return f"sqlite:///{workdir}/{table}.db"
    return f"{POSTGRES_URL}#table={table}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_read(key: str, read: Callable[[], list[Any]], n: int) -> dict[str, float]:
    """Seconds ``read`` (of ``n`` objects) takes with the garbage collector paused (``key``) and on (``key_gc``).

    Paused, the time includes the collector's one pass over the new objects once it is back on, which
    reopening pays too (it would come with the next allocation; here it is asked for).
    """
    from gc3session.persistence.store import gc_paused

    start = time.perf_counter()
    objs = read()
    times = {f"{key}_gc": time.perf_counter() - start}
    assert len(objs) == n, len(objs)
    del objs
    gc.collect()  # whatever the first read left behind is not the second one's to sweep
    with gc_paused():  # the stores' own switch: the floor reads as they load
        start = time.perf_counter()
        objs = read()
    gc.collect(0)
    times[key] = time.perf_counter() - start
    assert len(objs) == n, len(objs)
    return times


# -- workloads (each runs in its own process; returns a dict of measurements) ------


def w_floor(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    tasks = make_tasks(n)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    blobs = [pickle.dumps(t, protocol=4) for t in tasks]
    db = sqlite3.connect(workdir / "floor.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)")
    with db:
        db.executemany("INSERT INTO t VALUES (?, ?)", enumerate(blobs))
    db.close()
    out["sqlite_write"] = time.perf_counter() - start
    folder = workdir / "floor-files"
    folder.mkdir()
    start = time.perf_counter()
    for i, t in enumerate(tasks):
        temp = folder / f".tmp{i}"
        with open(temp, "wb") as f:
            f.write(pickle.dumps(t, protocol=4))
        os.replace(temp, folder / f"T.{i}")
    out["file_write"] = time.perf_counter() - start
    del tasks, blobs  # the reads start from an empty heap, as a reopening process does

    def read_files() -> list[Any]:
        objs = []
        for i in range(n):
            with open(folder / f"T.{i}", "rb") as f:
                objs.append(pickle.loads(f.read()))
        return objs

    db = sqlite3.connect(workdir / "floor.db")
    out.update(timed_read("file_read", read_files, n))
    out.update(timed_read("sqlite_read", lambda: [pickle.loads(d) for (d,) in db.execute("SELECT data FROM t")], n))
    db.close()
    tracemalloc.start()
    with open(workdir / "floor.db", "rb"):
        db = sqlite3.connect(workdir / "floor.db")
        objs = [pickle.loads(data) for (data,) in db.execute("SELECT data FROM t")]
        out["objects_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
        assert len(objs) == n
    tracemalloc.stop()
    return out


def w_floor_postgresql(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    import psycopg
    import sqlalchemy

    tasks = make_tasks(n)
    address = sqlalchemy.make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    out: dict[str, Any] = {}
    with psycopg.connect(address) as db:
        db.execute("DROP TABLE IF EXISTS gc3bench_floor")
        db.execute("CREATE TABLE gc3bench_floor (id BIGINT PRIMARY KEY, data BYTEA NOT NULL)")
        db.commit()
        start = time.perf_counter()
        blobs = [pickle.dumps(t, protocol=4) for t in tasks]
        with db.cursor() as cursor:
            cursor.executemany("INSERT INTO gc3bench_floor VALUES (%s, %s)", list(enumerate(blobs)))
        db.commit()
        out["postgresql_write"] = time.perf_counter() - start
        del tasks, blobs
        with db.cursor() as cursor:
            query = "SELECT data FROM gc3bench_floor"
            out.update(timed_read("postgresql_read", lambda: [pickle.loads(d) for (d,) in cursor.execute(query)], n))
        db.execute("DROP TABLE gc3bench_floor")
        db.commit()
    return out


def w_add_flush(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session

    session = Session(workdir / "w1", store_or_url=store_url(kind, workdir, "w1"))
    tasks = make_tasks(2 * n)
    times = []
    start = time.perf_counter()
    for task in tasks:
        t0 = time.perf_counter()
        session.add(task)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    session.destroy()
    first, last = sum(times[:1000]), sum(times[-1000:])
    # the median add too: a burst of slow disk flushes (PostgreSQL syncs each commit) weighs on a sum, not on it
    typical = statistics.median(times[-1000:]) / statistics.median(times[:1000])
    return {"time": total, "count": 2 * n, "first_1000": first, "last_1000": last, "growth": last / first,
            "median_growth": typical}


def w_add_batch(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session

    session = Session(workdir / "s", store_or_url=store_url(kind, workdir, "s"))
    tasks = make_tasks(n)
    start = time.perf_counter()
    for task in tasks:
        session.add(task, flush=False)
    session.flush()
    return {"time": time.perf_counter() - start, "count": n}


def w_reopen(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session

    start = time.perf_counter()
    session = Session(workdir / "s")
    elapsed = time.perf_counter() - start
    assert len(session) == n, len(session)
    out = {"time": elapsed, "count": n}
    del session
    start = time.perf_counter()
    try:
        lazy = Session(workdir / "s", lazy=True)
        out["lazy_time"] = time.perf_counter() - start
        del lazy
    except TypeError:
        out["lazy_time"] = None
    return out


def w_reopen_memory(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session

    tracemalloc.start()
    session = Session(workdir / "s")
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(session) == n
    return {"mib": current / 2**20, "peak_mib": peak / 2**20}


def w_save_all(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session, State

    session = Session(workdir / "s")
    start = time.perf_counter()
    for task in session:
        task.state = State.RUNNING
    session.save_all()
    return {"time": time.perf_counter() - start, "count": n}


class LineCounter(io.TextIOBase):
    """A stdout that counts lines and keeps nothing: the listing's memory is measured, not its output's."""

    def __init__(self) -> None:
        self.lines = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


def w_ls(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session.cli import main

    def listing() -> int:
        sink = LineCounter()
        with redirect_stdout(sink):
            main(["ls", str(workdir / "s")], standalone_mode=False)
        return sink.lines

    start = time.perf_counter()
    lines = listing() - 1
    elapsed = time.perf_counter() - start
    assert lines == n, lines
    tracemalloc.start()  # a second run, for memory only: tracing slows Python down
    listing()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"time": elapsed, "count": n, "peak_mib": peak / 2**20}
    if kind == "file":
        out["bare_time"] = min(bare_file_listing(workdir / "s") for _ in range(3))
    return out


def bare_file_listing(session: Path) -> float:
    """Seconds for the least a listing of one file per task can do in Python: for each id of the index,
    open its file, read once, close, parse the first line as JSON and make a row; no checks, no fallbacks."""
    start = time.perf_counter()
    ids = (session / "index.txt").read_text().split()
    folder = os.open(session / "jobs", os.O_RDONLY)
    rows = []
    try:
        for oid in ids:
            fd = os.open(oid, os.O_RDONLY, dir_fd=folder)
            head = os.read(fd, 512)
            os.close(fd)
            _, cls, jobname, state, _, modified, _ = json.loads(head[: head.index(b"\n")])
            rows.append(f"{oid}\t{jobname}\t{state}\t{cls.rpartition('.')[2]}\t{int(modified)}")
    finally:
        os.close(folder)
    LineCounter().write("\n".join(rows))
    return time.perf_counter() - start


def w_remove(n: int, workdir: Path, kind: str) -> dict[str, Any]:
    from gc3session import Session

    session = Session(workdir / "s")
    ids = session.list_ids()
    start = time.perf_counter()
    for oid in ids[: n // 2]:
        session.remove(oid, flush=False)
    session.flush()
    removed = time.perf_counter() - start
    start = time.perf_counter()
    session.destroy()
    destroyed = time.perf_counter() - start
    # one by one, on a session of the same size: the cost of the first 500 removals, per task
    single = Session(workdir / "one", store_or_url=store_url(kind, workdir, "one"))
    for task in make_tasks(n):
        single.add(task, flush=False)
    single.flush()
    sample = min(500, n)
    start = time.perf_counter()
    for oid in single.list_ids()[:sample]:
        single.remove(oid)
    one_by_one = (time.perf_counter() - start) / sample
    single.destroy()
    return {
        "time": removed + destroyed,
        "count": n,
        "remove_half": removed,
        "destroy_rest": destroyed,
        "one_by_one_per_task": one_by_one,
        "speedup": one_by_one * n / (removed + destroyed),
    }


WORKLOADS = {
    "floor": w_floor,
    "floor-postgresql": w_floor_postgresql,
    "1-add-flush": w_add_flush,
    "2-add-batch": w_add_batch,
    "3-reopen": w_reopen,
    "3-reopen-memory": w_reopen_memory,
    "4-save-all": w_save_all,
    "5-ls": w_ls,
    "6-remove": w_remove,
}


def run_worker(name: str, n: int, workdir: str, kind: str) -> None:
    import gc3session.cli
    import gc3session.persistence.sql  # noqa: F401 - imported before timing: import time is not the workload's

    if kind == "postgresql":
        import psycopg  # noqa: F401 - the driver too (about 0.15 s, which the first connection would pay)
    if hasattr(os, "sync"):  # the kernel writes back what the last workload left dirty now, not during this one
        os.sync()
    result = WORKLOADS[name](n, Path(workdir), kind)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


#: Workloads that change nothing, run this many times: the fastest counts, as with the floors.  Their
#: ratio to each other is a target (ls against reopening), and one run of each swings by a fifth here.
REPEATS = {"3-reopen": 5, "5-ls": 5}


def in_process(name: str, n: int, workdir: Path, kind: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--n", str(n), "--dir", str(workdir), "--kind", kind]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"workload {name} on {kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def postgres_reachable() -> bool:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def drop_tables(tables: list[str]) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        counters = sqlalchemy.inspect(conn).has_table("gc3session_counters")  # not there in a fresh database
        for table in tables:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            if counters:
                conn.exec_driver_sql("DELETE FROM gc3session_counters WHERE name = %(n)s", {"n": table})
    engine.dispose()


def benchmark(n: int, kinds: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"n": n, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="gc3bench-") as tmp:
        floors = [measure_floor(n, Path(tmp) / "floor-before", kinds)]
        for kind in kinds:
            workdir = Path(tmp) / kind
            workdir.mkdir()
            if kind == "postgresql":
                drop_tables(["w1", "s", "one"])
            store_results = {}
            for name in WORKLOADS:
                if name.startswith("floor"):
                    continue
                print(f"  {kind:<10} {name} ...", file=sys.stderr)
                runs = [in_process(name, n, workdir, kind) for _ in range(REPEATS.get(name, 1))]
                store_results[name] = runs[0]
                if len(runs) > 1:
                    store_results[name] = {**min(runs, key=lambda run: run["time"]), "times": [r["time"] for r in runs]}
            results["stores"][kind] = store_results
            if kind == "postgresql":
                drop_tables(["w1", "s", "one"])
            shutil.rmtree(workdir)
        floors.append(measure_floor(n, Path(tmp) / "floor-after", kinds))
    # the machine is shared: of the two measurements of each floor, the lower is the closer to the truth
    results["floor"] = {key: min(floor[key] for floor in floors) for key in floors[0]}
    results["floors"] = floors
    return results


def measure_floor(n: int, workdir: Path, kinds: list[str]) -> dict[str, Any]:
    print("  floor ...", file=sys.stderr)
    workdir.mkdir()
    floor = in_process("floor", n, workdir, "file")
    if "postgresql" in kinds:
        floor.update(in_process("floor-postgresql", n, workdir, "postgresql"))
    shutil.rmtree(workdir)
    return floor


def ratios(results: dict[str, Any]) -> list[tuple[str, str, float, float, float | None, str]]:
    """(store, workload, seconds, items per second, peak MiB, ratio to floor text)."""
    floor = results["floor"]
    n = results["n"]
    rows = []
    for kind, res in results["stores"].items():
        write_key = "file_write" if kind == "file" else "sqlite_write"
        # file writes cost what the kernel makes them cost at the moment: up to 4x apart minutes apart here
        write_floors = sorted({f[write_key] for f in results.get("floors", [floor])})

        def write_ratio(seconds: float, floors: list[float] = write_floors, digits: int = 2) -> str:
            ratio = [f"{seconds / f:.{digits}f}" for f in reversed(floors)]
            return ratio[-1] if floors[-1] < 1.25 * floors[0] else f"{ratio[0]}-{ratio[-1]}"

        read_key = "file_read" if kind == "file" else "sqlite_read"
        read_floor, read_floor_gc = floor[read_key], floor.get(f"{read_key}_gc")
        own_write, own_read = (floor.get("postgresql_write"), floor.get("postgresql_read")) if kind == "postgresql" \
            else (None, None)
        w1 = res["1-add-flush"]
        rows.append((kind, "1 add, flush each", w1["time"], w1["count"] / w1["time"], w1["peak_rss_mib"],
                     f"last/first 1000 = {w1['growth']:.2f}x (median add {w1['median_growth']:.2f}x); "
                     f"{write_ratio(w1['time'] / 2, digits=1)}x floor"))
        w2 = res["2-add-batch"]
        rows.append((kind, "2 add flush=False + flush", w2["time"], n / w2["time"], w2["peak_rss_mib"],
                     f"{write_ratio(w2['time'])}x write floor{versus(w2['time'], own_write)}"))
        w3 = res["3-reopen"]
        memory = res["3-reopen-memory"]
        lazy = w3.get("lazy_time")
        lazy_text = f"; lazy {lazy / w3['time']:.3f}x full" if lazy else "; lazy: n/a"
        rows.append((kind, "3 reopen", w3["time"], n / w3["time"], w3["peak_rss_mib"],
                     f"{w3['time'] / read_floor:.2f}x read floor{versus(w3['time'], own_read)}"
                     + (f" ({w3['time'] / read_floor_gc:.2f}x with GC on)" if read_floor_gc else "") + "; "
                     f"memory {memory['mib'] / floor['objects_mib']:.2f}x objects{lazy_text}"))
        w4 = res["4-save-all"]
        rows.append((kind, "4 change state + save_all", w4["time"], n / w4["time"], w4["peak_rss_mib"],
                     f"{write_ratio(w4['time'])}x write floor{versus(w4['time'], own_write)}"))
        w5 = res["5-ls"]
        bare = w5.get("bare_time")
        bare_text = f"; a bare loop over the files {w3['time'] / bare:.1f}x" if bare else ""
        rows.append((kind, "5 session-tool ls", w5["time"], n / w5["time"], w5["peak_rss_mib"],
                     f"{w3['time'] / w5['time']:.1f}x faster than reopen{bare_text}; "
                     f"traced peak {w5['peak_mib']:.1f} MiB"))
        w6 = res["6-remove"]
        rows.append((kind, "6 remove half + destroy", w6["time"], n / w6["time"], w6["peak_rss_mib"],
                     f"{w6['speedup']:.0f}x faster than one by one"))
    return rows


def versus(seconds: float, own_floor: float | None) -> str:
    """The ratio to PostgreSQL's own floor, for PostgreSQL rows."""
    return f" ({seconds / own_floor:.2f}x PostgreSQL's)" if own_floor else ""


def print_table(results: dict[str, Any]) -> None:
    floor = results["floor"]
    n = results["n"]
    file_writes = sorted(f["file_write"] for f in results.get("floors", [floor]))
    file_write = "-".join(f"{seconds:.2f}" for seconds in file_writes)
    print(f"N = {n:,}; floor: write {file_write} s (files), {floor['sqlite_write']:.2f} s (SQLite); "
          f"read+unpickle {floor['file_read']:.2f} s (files), {floor['sqlite_read']:.2f} s (SQLite), "
          f"with GC on {floor.get('file_read_gc', 0):.2f} s, {floor.get('sqlite_read_gc', 0):.2f} s; "
          f"objects {floor['objects_mib']:.1f} MiB")
    if "postgresql_write" in floor:
        print(f"PostgreSQL floor (psycopg alone): write {floor['postgresql_write']:.2f} s; "
              f"read+unpickle {floor['postgresql_read']:.2f} s")
    print(f"{'store':<11}{'workload':<28}{'time s':>9}{'items/s':>11}{'peak MiB':>10}  vs floor")
    for kind, name, seconds, rate, peak, text in ratios(results):
        print(f"{kind:<11}{name:<28}{seconds:>9.2f}{rate:>11,.0f}{peak:>10.0f}  {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="tasks per workload (default 10,000)")
    parser.add_argument("--stores", default="file,sqlite,postgresql", help="comma-separated: file, sqlite, postgresql")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-' for stdout)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.n, args.dir, args.kind)
        return
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    if "postgresql" in kinds and not postgres_reachable():
        print(f"PostgreSQL not reachable at {POSTGRES_URL}: skipped", file=sys.stderr)
        kinds.remove("postgresql")
    results = benchmark(args.n, kinds)
    print_table(results)
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
