"""Importing gc3pie session directories: gc3session.migrate and ``session-tool import-gc3pie``."""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gc3pie_standin as g
import pytest
from click.testing import CliRunner

from gc3session import Session, State, migrate
from gc3session.cli import main
from gc3session.exceptions import InvalidArgument, LoadError, LoadWarning, SaveError, SessionError, StoreError
from gc3session.migrate import GC3PIE_CLASS_MAP, GC3PieId, describe_gc3pie_record, import_gc3pie
from gc3session.persistence import SqlStore, filesystem, make_store
from gc3session.persistence.opcodes import attributes, class_path, trace

CLASS_MAP = {**GC3PIE_CLASS_MAP, **g.STANDIN_CLASS_MAP}


def run(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(path.rglob("*"))}


def sample_tasks() -> list[Any]:
    """Two jobs (one failed) and two collections that share a child, as a gc3pie script makes them."""
    ok = g.Application("fit-ok", arguments=["fit", "--alpha", "0.1"], output_dir="/data/out/ok")
    ok.execution.state = "RUNNING"
    ok.execution.state = "TERMINATED"
    ok.execution._exitcode = 0
    failed = g.Application("fit-bad", arguments=["fit", "--alpha", "9"])
    failed.execution.state = "TERMINATED"
    failed.execution._exitcode = 2
    shared = g.Application("shared")
    grid = g.TaskCollection("grid", [g.Application(f"p{i}", params={"i": i}) for i in range(3)] + [shared])
    grid.tasks[0].execution.state = "RUNNING"
    return [ok, failed, grid, g.TaskCollection("more", [shared])]


@pytest.fixture
def gc3pie_session(tmp_path: Path) -> tuple[Path, list[str]]:
    """A gc3pie session directory (default filesystem store) and its task ids."""
    path = tmp_path / "gc3pie-sweep"
    return path, g.write_session(path, sample_tasks())


def check_sample(session: Session, ids: list[str]) -> None:
    ok, failed, grid, more = (session.tasks[oid] for oid in ids)
    assert session.list_ids() == ids
    assert [ok.jobname, failed.jobname, grid.jobname, more.jobname] == ["fit-ok", "fit-bad", "grid", "more"]
    assert ok.arguments == ["fit", "--alpha", "0.1"] and ok.output_dir == "/data/out/ok"
    assert ok.execution.state == "TERMINATED" and ok.execution.returncode == 0
    assert failed.execution.returncode == 2 << 8
    assert [c.jobname for c in grid.tasks] == ["p0", "p1", "p2", "shared"]
    assert grid.tasks[1].params == {"i": 1} and grid.tasks[0].execution.state == "RUNNING"
    assert more.tasks[0] is grid.tasks[3]  # one shared child, one object
    child_id = str(grid.tasks[0].persistent_id)
    assert session.store.load(child_id) is grid.tasks[0]
    assert all(t.persistent_id == oid for oid, t in session.tasks.items())


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_import_keeps_ids_attributes_and_children(tmp_path: Path, protocol: int) -> None:
    source = tmp_path / "old"
    ids = g.write_session(source, sample_tasks(), protocol=protocol)
    before = snapshot(source)
    report = import_gc3pie(source, tmp_path / "new")
    assert report.tasks == ids and report.records == 8 and not report.damaged
    assert snapshot(source) == before  # the gc3pie session is only read
    session = Session(tmp_path / "new", class_map=CLASS_MAP)
    check_sample(session, ids)
    assert type(session.tasks[ids[0]].persistent_id) is GC3PieId


def test_metadata_is_read_from_the_pickles(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    import_gc3pie(source, tmp_path / "new")
    store = make_store(tmp_path / "new" / "jobs")
    ok, failed, grid, more = (store.metadata(oid) for oid in ids)
    assert ok["cls"] == "gc3libs.Application" and grid["cls"] == "gc3libs.workflow.TaskCollection"
    assert (ok["jobname"], ok["state"], ok["returncode"]) == ("fit-ok", "TERMINATED", 0)
    assert (failed["state"], failed["returncode"]) == ("TERMINATED", 512)
    assert [state for _, state in ok["history"]] == ["RUNNING", "TERMINATED"]
    assert grid["children"] == [*grid["references"][:3], more["children"][0]]
    assert grid["state"] == "NEW" and grid["returncode"] is None and ok["created"] is None
    assert ok["origin"] == "gc3pie" and ok["size"] == os.path.getsize(source / "jobs" / ids[0])
    assert store.metadata(grid["children"][0])["state"] == "RUNNING"


def test_session_files_and_run_record(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    import_gc3pie(source, tmp_path / "new")
    new = tmp_path / "new"
    assert (new / "index.txt").read_text().split() == ids
    assert (new / "store.url").read_text().strip() == "jobs"
    assert os.stat(new / "created").st_mtime == 1_600_000_000
    assert os.stat(new / "finished").st_mtime == 1_600_003_600
    runs = json.loads((new / "session.json").read_text())["runs"]
    assert runs[0]["params"]["imported_from"] == str(source) and runs[0]["end"] is not None
    assert runs[0]["params"]["gc3pie_command"] == "gsweep -s sweep1 -C 30"


def test_loading_with_gc3libs_installed(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    """gc3pie's own Id hashes unlike a string: references must still reach the cached objects."""
    source, ids = gc3pie_session
    import_gc3pie(source, tmp_path / "new")
    with g.fake_gc3libs():
        session = Session(tmp_path / "new")
        check_sample(session, ids)
        assert type(session.tasks[ids[0]].persistent_id) is g.Id


def test_new_tasks_get_new_numbers(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, _ = gc3pie_session
    import_gc3pie(source, tmp_path / "new")
    from gc3session import Task

    session = Session(tmp_path / "new", lazy=True)
    assert session.add(Task(jobname="after")) == "Task.9"  # the imported records are numbered 1 to 8


def test_an_import_that_fails_half_way_deletes_the_records_it_wrote(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path, monkeypatch: Any
) -> None:
    """A shared store keeps no orphans."""
    source, _ = gc3pie_session
    url = f"sqlite:///{tmp_path}/tasks.db"
    monkeypatch.setattr(migrate, "BATCH", 3)
    real = SqlStore.import_records
    calls: list[int] = []

    def full_at_the_second_batch(store: Any, records: Any) -> None:
        calls.append(len(records))
        if len(calls) == 2:
            raise SaveError(records[0][0], "cannot write: No space left on device")
        real(store, records)

    monkeypatch.setattr(SqlStore, "import_records", full_at_the_second_batch)
    with pytest.raises(SaveError, match="No space left"):
        import_gc3pie(source, tmp_path / "new", store_url=url)
    assert calls == [3, 3] and make_store(url).list() == [] and not (tmp_path / "new").exists()


def test_an_import_cut_short_in_a_batch_of_files_leaves_none_of_them(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path, monkeypatch: Any
) -> None:
    source, _ = gc3pie_session
    real, calls = filesystem.write_atomically, []

    def third_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(filesystem, "write_atomically", third_fails)
    with pytest.raises(SaveError, match="No space left"):
        import_gc3pie(source, tmp_path / "new", store_url=str(tmp_path / "records"))
    assert len(calls) == 3 and make_store(str(tmp_path / "records")).list() == []
    assert not (tmp_path / "new").exists()


def test_import_into_sqlite(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    url = f"sqlite:///{tmp_path}/tasks.db"
    report = import_gc3pie(source, tmp_path / "new", store_url=url)
    assert report.store_url == url
    check_sample(Session(tmp_path / "new", class_map=CLASS_MAP), ids)


@pytest.mark.parametrize("failing", ["index.txt", "store.url"])
def test_an_import_whose_destination_cannot_be_made_whole_leaves_nothing_and_runs_again(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path, monkeypatch: Any, failing: str
) -> None:
    source, ids = gc3pie_session
    real_replace = os.replace

    def full(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if str(dst).endswith(os.path.join("new", failing)):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SaveError, match="No space left on device"):
        import_gc3pie(source, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # was left half made: a run again said "not empty"
    monkeypatch.undo()
    import_gc3pie(source, tmp_path / "new")
    check_sample(Session(tmp_path / "new", class_map=CLASS_MAP), ids)


def test_dry_run_writes_nothing(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    before = snapshot(tmp_path)
    report = import_gc3pie(source, tmp_path / "new", dry_run=True)
    assert report.dry_run and report.tasks == ids and report.records == 8
    assert report.classes == {"collections.OrderedDict", "gc3libs.Application", "gc3libs.Run",
                              "gc3libs.persistence.idfactory.Id", "gc3libs.workflow.TaskCollection"}
    result = run("import-gc3pie", source, tmp_path / "new2", "--store-url", f"sqlite:///{tmp_path}/x.db", "-n")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("would import 4 task(s), 8 record(s)")
    assert snapshot(tmp_path) == before


def test_cli_import_then_ls_show_log_verify(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    result = run("import-gc3pie", source, tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert "imported 4 task(s), 8 record(s)" in result.output
    listing = run("ls", tmp_path / "new", "-r")
    assert listing.exit_code == 0, listing.output
    rows = [line.split("\t") for line in listing.output.splitlines()[1:]]
    assert [r[0].strip() for r in rows[:2]] == ids[:2]
    assert [r[1:4] for r in rows[:2]] == [["fit-ok", "TERMINATED", "Application"],
                                          ["fit-bad", "TERMINATED", "Application"]]
    assert len(rows) == 4 + 4 + 1  # the collections' children under them (the shared one twice)
    failed = run("ls", tmp_path / "new", "--failed", "--format", "json")
    assert [row["id"] for row in json.loads(failed.output)] == [ids[1]]
    shown = run("show", tmp_path / "new", ids[2])
    assert shown.exit_code == 0 and "children:" in shown.output and "gc3libs.workflow.TaskCollection" in shown.output
    assert "TERMINATED" in run("log", tmp_path / "new").output
    stats = run("stats", tmp_path / "new")
    assert stats.exit_code == 0 and "tasks:     4 top-level" in stats.output
    without_classes = run("verify", tmp_path / "new")
    assert without_classes.exit_code == 1 and "gc3libs" in without_classes.output
    with g.fake_gc3libs():
        verified = run("verify", tmp_path / "new")
    assert verified.exit_code == 0, verified.output
    assert verified.output.strip() == "4 of 4 task(s) load"


def py2_record(number: int, jobname: bytes, child: int | None = None) -> bytes:
    """A record as gc3pie wrote it under Python 2 (protocol 2, byte strings, ``Id`` with a ``__dict__``)."""

    def text(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING

    def gc3pie_id(n: int) -> bytes:  # Id('Application', n), its state set again by BUILD
        return (b"cgc3libs.persistence.idfactory\nId\n" + text(b"Application") + b"K" + bytes([n]) + b"\x86\x81"
                + b"}(" + text(b"_seqno") + b"K" + bytes([n]) + text(b"_prefix") + text(b"Application") + b"ub")

    children = b"" if child is None else text(b"tasks") + b"](" + gc3pie_id(child) + b"Qe"  # BINPERSID, APPENDS
    return (b"\x80\x02cgc3libs\nApplication\n)\x81}(" + text(b"jobname") + text(jobname)
            + text(b"persistent_id") + gc3pie_id(number) + children + b"ub.")


def test_python2_records(tmp_path: Path) -> None:
    source = tmp_path / "py2"
    (source / "jobs").mkdir(parents=True)
    (source / "jobs" / "Application.5").write_bytes(py2_record(5, b"parent", child=6))
    (source / "jobs" / "Application.6").write_bytes(py2_record(6, b"child"))
    (source / "session_ids.txt").write_text("Application.5\n")
    (source / "store.url").write_text(f"file://{source}/jobs")
    assert describe_gc3pie_record("Application.5", py2_record(5, b"parent", child=6))["children"] == ["Application.6"]
    import_gc3pie(source, tmp_path / "new")
    session = Session(tmp_path / "new", class_map=CLASS_MAP)
    parent = session.tasks["Application.5"]
    assert parent.jobname == "parent" and parent.tasks[0].jobname == "child"
    assert parent.tasks[0] is session.store.load("Application.6")


def test_cli_help_has_an_example() -> None:
    result = run("import-gc3pie", "--help")
    assert result.exit_code == 0 and "session-tool import-gc3pie" in result.output and "Example:" in result.output


def test_moved_session_reads_its_own_jobs_directory(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    moved = tmp_path / "moved"
    source.rename(moved)  # store.url still names the old place
    report = import_gc3pie(moved, tmp_path / "new")
    assert report.records_dir == str(moved / "jobs") and report.tasks == ids


def test_jobs_dir_option(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    (source / "jobs").rename(tmp_path / "elsewhere")
    with pytest.raises(SessionError, match=r"store\.url: names .* which does not exist"):
        import_gc3pie(source, tmp_path / "new")
    result = run("import-gc3pie", source, tmp_path / "new", "--jobs-dir", tmp_path / "elsewhere")
    assert result.exit_code == 0, result.output
    assert Session(tmp_path / "new", lazy=True).list_ids() == ids


def test_backup_file_is_used_when_the_last_write_was_cut(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, ids = gc3pie_session
    record = source / "jobs" / ids[0]
    (source / "jobs" / f"{ids[0]}.OLD").write_bytes(record.read_bytes())
    record.write_bytes(record.read_bytes()[:40])  # gc3pie died while writing; it would load the .OLD file
    result = run("import-gc3pie", source, tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert f"note: {ids[0]} was read from its backup" in result.output
    check_sample(Session(tmp_path / "new", class_map=CLASS_MAP), ids)


# -- bad input ---------------------------------------------------------------------


def test_not_a_gc3pie_session(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no such directory"):
        import_gc3pie(tmp_path / "nowhere", tmp_path / "new")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SessionError, match=r"session_ids.txt: missing: this is not a gc3pie session directory"):
        import_gc3pie(tmp_path / "empty", tmp_path / "new")
    Session(tmp_path / "ours").store.close()
    with pytest.raises(SessionError, match=r"gc3session session already.*session-tool copy"):
        import_gc3pie(tmp_path / "ours", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_bad_index_and_store_url(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, _ = gc3pie_session
    index = source / "session_ids.txt"
    index.write_text(index.read_text() + "../../etc/passwd\n")
    with pytest.raises(SessionError, match=r"session_ids.txt: '../../etc/passwd' is not an id"):
        import_gc3pie(source, tmp_path / "new")
    index.write_text("Application.1\n")
    (source / "store.url").unlink()
    with pytest.raises(SessionError, match=r"store\.url: missing"):
        import_gc3pie(source, tmp_path / "new")
    (source / "store.url").write_text("\n")
    with pytest.raises(SessionError, match=r"store\.url: is empty"):
        import_gc3pie(source, tmp_path / "new")
    (source / "store.url").write_text("swift://objects.example.org/jobs\n")
    with pytest.raises(StoreError, match="not a gc3pie filesystem store"):
        import_gc3pie(source, tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("url", ["sqlite:////data/gc3pie.db", "postgresql://me:secret@db/gc3pie#table=jobs",
                                 "mssql+pyodbc://me:secret@db/gc3pie"])
def test_sql_stores_are_refused(gc3pie_session: tuple[Path, list[str]], tmp_path: Path, url: str) -> None:
    source, _ = gc3pie_session
    (source / "store.url").write_text(url)
    (source / "session_ids.txt").write_text("12\n13\n")  # a SQL store's ids are bare numbers
    with pytest.raises(StoreError, match="gc3pie SQL stores cannot be imported") as caught:
        import_gc3pie(source, tmp_path / "new")
    assert caught.value.url.startswith(url.split("://")[0]) and "secret" not in str(caught.value)
    result = run("import-gc3pie", source, tmp_path / "new")
    assert result.exit_code == 1 and "filesystem store" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()


class IntId(int):
    """Like the ids of gc3pie's SQL store: bare numbers, pickled as ``IntId(None, n)``."""

    def __new__(cls, prefix: Any, seqno: int) -> IntId:
        return int.__new__(cls, seqno)

    def __getnewargs__(self) -> tuple[None, int]:
        return (None, int(self))


class NumberPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return IntId(None, 7) if obj == "child" else None


def test_sql_style_numeric_references_are_refused() -> None:
    buffer = io.BytesIO()
    NumberPickler(buffer, 4).dump({"tasks": ["child"]})
    with pytest.raises(LoadError, match=r"as a test_migrate.IntId\(None, 7\), not by an id"):
        describe_gc3pie_record("Application.1", buffer.getvalue())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "other-id", "no-object"])
def test_damaged_record_is_refused_then_skipped(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path, damage: str
) -> None:
    source, ids = gc3pie_session
    import_gc3pie(source, tmp_path / "probe")  # to learn the id of the grid's second child
    child = make_store(tmp_path / "probe" / "jobs").metadata(ids[2])["children"][1]
    record = source / "jobs" / child
    damages: dict[str, Callable[[], Any]] = {
        "truncated": lambda: record.write_bytes(record.read_bytes()[:-30]),
        "garbage": lambda: record.write_bytes(b"\x80\x04this is not a pickle"),
        "missing": record.unlink,
        "other-id": lambda: record.write_bytes((source / "jobs" / ids[0]).read_bytes()),
        "no-object": lambda: record.write_bytes(pickle.dumps({"a": 1})),
    }
    damages[damage]()
    with pytest.raises(LoadError) as caught:
        import_gc3pie(source, tmp_path / "new")
    assert caught.value.id == child and "nothing was written" in caught.value.reason
    assert child in str(caught.value) and (damage != "missing" or str(record) in str(caught.value))
    assert not (tmp_path / "new").exists()
    refused = run("import-gc3pie", source, tmp_path / "new")
    assert refused.exit_code == 1 and child in refused.output and not (tmp_path / "new").exists()
    result = run("import-gc3pie", source, tmp_path / "new", "--skip-damaged")
    assert result.exit_code == 1
    assert "imported 4 task(s), 7 record(s)" in result.output and f"not imported: {child}:" in result.output
    with pytest.warns(LoadWarning):  # the collection whose child is gone cannot load
        session = Session(tmp_path / "new", class_map=CLASS_MAP)
    assert set(session.load_errors) == {ids[2]} and session.tasks[ids[0]].jobname == "fit-ok"


def test_damaged_top_level_task_is_left_out_of_the_index(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, ids = gc3pie_session
    (source / "jobs" / ids[1]).write_bytes(b"")
    report = import_gc3pie(source, tmp_path / "new", skip_damaged=True)
    assert report.tasks == [ids[0], *ids[2:]] and list(report.damaged) == [ids[1]]
    assert "not a readable pickle" in report.damaged[ids[1]]
    assert Session(tmp_path / "new", lazy=True).list_ids() == report.tasks


def test_destination_must_be_new(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, _ = gc3pie_session
    Session(tmp_path / "ours").store.close()
    with pytest.raises(SessionError, match="is already a session"):
        import_gc3pie(source, tmp_path / "ours")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(SessionError, match="not empty"):
        import_gc3pie(source, tmp_path / "full")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SessionError, match="not a directory"):
        import_gc3pie(source, tmp_path / "file")
    with pytest.raises(SessionError, match="is a gc3pie session"):
        import_gc3pie(source, source)
    with pytest.raises(InvalidArgument, match="is the gc3pie store"):
        import_gc3pie(source, tmp_path / "new", store_url=str(source / "jobs"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me" and not (tmp_path / "new").exists()


def test_empty_destination_directory_is_fine(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    (tmp_path / "new").mkdir()
    assert import_gc3pie(source, tmp_path / "new").tasks == ids


def test_shared_destination_store_is_not_overwritten(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    url = f"sqlite:///{tmp_path}/shared.db"
    from gc3session import Task

    other = Session(tmp_path / "other", store_or_url=url)
    other.store.replace(ids[0], Task(jobname="someone else's"))
    other.store.close()
    with pytest.raises(SaveError, match=f"{ids[0]}: the store .* holds other objects with these ids"):
        import_gc3pie(source, tmp_path / "new", store_url=url)
    assert not (tmp_path / "new").exists()
    again = make_store(url)
    assert again.metadata(ids[0])["jobname"] == "someone else's"
    again.close()


def test_a_shared_sql_store_is_not_overwritten_through_a_number_either(
    gc3pie_session: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, ids = gc3pie_session
    url = f"sqlite:///{tmp_path}/shared.db"
    from gc3session import Task

    other = Session(tmp_path / "other", store_or_url=url)
    for i in range(len(ids)):
        other.add(Task(jobname=f"theirs-{i}"))  # Task.1...: the rows that Application.1... would take
    other.close()
    with pytest.raises(SaveError, match="holds other objects with these ids"):
        import_gc3pie(source, tmp_path / "new", store_url=url)
    assert not (tmp_path / "new").exists()
    assert [t.jobname for t in Session(tmp_path / "other")] == [f"theirs-{i}" for i in range(len(ids))]


def test_ids_that_share_a_number_are_refused(gc3pie_session: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, ids = gc3pie_session
    number = int(ids[0].split(".")[1])
    job = g.Application("numbered by another factory")
    job.persistent_id = g.Id("job", number)
    with g.fake_gc3libs():
        g.GC3PieStore(str(source / "jobs")).save(job)
    (source / "session_ids.txt").write_text("\n".join([*ids, f"job.{number}"]))
    with pytest.raises(SessionError, match=f"records {ids[0]} and job.{number} share the number {number}"):
        import_gc3pie(source, tmp_path / "new")


def test_state_names_match() -> None:
    assert {s.value for s in State} == {"NEW", "SUBMITTED", "RUNNING", "STOPPED", "TERMINATING", "TERMINATED",
                                        "UNKNOWN"}


class PidPickler(pickle.Pickler):
    """Writes the string ``"child"`` wherever it occurs as a persistent id of the pickler's choice."""

    def __init__(self, file: io.BytesIO, pid: Any) -> None:
        super().__init__(file, 4)
        self.pid = pid

    def persistent_id(self, obj: Any) -> Any:
        return self.pid if obj == "child" else None


@pytest.mark.parametrize(("pid", "reason"), [("../../etc/passwd", "which is not an id"), (7, "bad reference 7"),
                                              ("Task.99", "no such object")])
def test_persistent_ids_resolve_only_to_records_of_the_store(tmp_path: Path, pid: Any, reason: str) -> None:
    from gc3session import Task

    task = Task(jobname="holder", child="child")
    task.persistent_id = "Task.1"
    buffer = io.BytesIO()
    PidPickler(buffer, pid).dump(task)
    store = make_store(tmp_path / "store")
    store.import_records([("Task.1", {"id": "Task.1"}, buffer.getvalue())])
    with pytest.raises(LoadError, match=reason):
        store.load("Task.1")


class Sample:
    """A plain class with values of many kinds, to run every common opcode through the tracer."""

    def __init__(self) -> None:
        loop: list[Any] = []
        loop.append((loop,))  # recursion through a tuple: POP / POP_MARK and GET
        self.name = "sample"
        self.values = [1, -1, 2**40, 2**80, 1.5, True, False, None, "é", b"\x00" * 300, bytearray(b"ab"),
                       (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), {1, 2}, frozenset({3}), {"k": [1]}, loop,
                       OrderedDict(a=1), complex(1, 2)]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_trace_reads_every_protocol(protocol: int) -> None:
    data = pickle.dumps(Sample(), protocol)
    found = trace(data, lambda pid: pytest.fail(f"no persistent id expected, got {pid!r}"))
    assert class_path(found.root) == "test_migrate.Sample"
    fields = attributes(found.root)
    assert fields is not None and fields["name"] == "sample" and fields["values"][:5] == [1, -1, 2**40, 2**80, 1.5]
    assert "test_migrate.Sample" in found.globals


def test_cut_or_flipped_pickles_are_load_errors(gc3pie_session: tuple[Path, list[str]]) -> None:
    source, ids = gc3pie_session
    data = (source / "jobs" / ids[2]).read_bytes()
    for end in range(len(data)):
        with pytest.raises(LoadError):
            describe_gc3pie_record(ids[2], data[:end])
    for at in range(0, len(data), 7):  # a changed byte may still make a pickle: it must never escape as another error
        try:
            describe_gc3pie_record(ids[2], data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :])
        except LoadError:
            pass
