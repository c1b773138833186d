"""Run records in session.json: one per open, with how the run ended."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import filelock
import pytest
from click.testing import CliRunner

from gc3session import Session, Task, __version__
from gc3session import runs as runs_module
from gc3session.cli import main
from gc3session.exceptions import RepairWarning, RunRecordWarning, SaveError
from gc3session.runs import RUNS_FILENAME


def test_creation_and_every_open_are_recorded(tmp_path):
    first = Session(tmp_path / "s", params={"alpha": 0.1})
    first.add(Task())
    first.close()
    with Session(tmp_path / "s", params={"alpha": 0.2}) as second:
        assert second.session_id == first.session_id
    runs = Session(tmp_path / "s").runs
    assert len(runs) == 3
    record = runs[0]
    assert record["params"] == {"alpha": 0.1} and runs[1]["params"] == {"alpha": 0.2}
    assert record["pid"] == os.getpid() and record["argv"] == sys.argv and record["cwd"] == os.getcwd()
    assert record["gc3session"] == __version__ and record["python"]
    assert record["host"] and record["start"] <= record["end"]
    assert record["error"] is None and runs[2]["end"] is None  # the last one is still open
    assert json.loads((tmp_path / "s" / RUNS_FILENAME).read_text())["session_id"] == first.session_id
    assert (tmp_path / "s" / RUNS_FILENAME).stat().st_mode & 0o777 == 0o600  # argv may hold a secret


def test_git_commit_and_dirty_flag_are_recorded(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "f.txt").write_text("one")
    subprocess.run([*git, "add", "f.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    assert Session(tmp_path / "s").runs[0]["git"] == {"commit": head, "dirty": False}
    (repo / "f.txt").write_text("two")
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")  # another directory: the state is looked up again
    assert Session(tmp_path / "d").runs[0]["git"] == {"commit": head, "dirty": True}
    empty = tmp_path / "empty"
    empty.mkdir()
    subprocess.run([*git, "init", "-q"], cwd=empty, check=True)
    monkeypatch.chdir(empty)
    assert Session(tmp_path / "e").runs[0]["git"] is None  # nothing committed yet
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    assert Session(tmp_path / "t").runs[0]["git"] is None


def test_an_exception_in_the_block_is_recorded_and_goes_on(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with Session(tmp_path / "s") as session:
            task = Task(jobname="saved anyway")
            session.add(task, flush=False)
            1 / 0  # noqa: B018 - the failure under test
    run = Session(tmp_path / "s").runs[0]
    assert run["error"]["type"] == "builtins.ZeroDivisionError"
    assert run["error"]["message"] == "division by zero"
    assert "1 / 0" in run["error"]["traceback"] and run["end"] is not None
    assert [t.jobname for t in Session(tmp_path / "s")] == ["saved anyway"]


def test_a_damaged_run_file_is_set_aside_and_the_session_opens(tmp_path):
    session = Session(tmp_path / "s")
    oid = session.add(Task(jobname="kept"))
    session.close()
    damaged = '{"session_id": "' + session.session_id + '", "runs": [{"run_id": "x", "start": 1'  # cut short
    (tmp_path / "s" / RUNS_FILENAME).write_text(damaged)
    for command in (["stats"], ["show", oid]):  # reading commands say so, and show the rest
        shown = CliRunner().invoke(main, [command[0], str(tmp_path / "s"), *command[1:]])
        assert shown.exit_code == 0 and "unreadable" in shown.output and RUNS_FILENAME in shown.output, shown.output
    with pytest.warns(RepairWarning, match="kept as .*session.json.damaged-"):
        again = Session(tmp_path / "s")
    assert again.tasks[oid].jobname == "kept" and again.session_id == session.session_id
    again.close()
    aside = [p for p in os.listdir(tmp_path / "s") if p.startswith(f"{RUNS_FILENAME}.damaged-")]
    assert len(aside) == 1 and (tmp_path / "s" / aside[0]).read_text() == damaged
    assert len(json.loads((tmp_path / "s" / RUNS_FILENAME).read_text())["runs"]) == 1


@pytest.mark.parametrize("odd", [
    {"start": "2026-11-21T04:42:25"}, {"start": None}, {"argv": 5}, {"git": "abc"}, {"error": 3, "end": "x"},
])
def test_run_records_edited_by_hand_neither_stop_an_open_nor_a_command(tmp_path, odd):
    session = Session(tmp_path / "s")
    oid = session.add(Task(jobname="kept"))
    session.close()
    content = json.loads((tmp_path / "s" / RUNS_FILENAME).read_text())
    content["runs"].append({"run_id": "by-hand", **odd})
    (tmp_path / "s" / RUNS_FILENAME).write_text(json.dumps(content))
    for command in (["stats"], ["show", oid], ["rm", oid]):
        shown = CliRunner().invoke(main, [command[0], str(tmp_path / "s"), *command[1:]])
        assert shown.exit_code == 0 and shown.exception is None, shown.output
    Session(tmp_path / "s").close()


def test_run_records_nested_too_deep_are_set_aside(tmp_path):
    Session(tmp_path / "s").close()
    (tmp_path / "s" / RUNS_FILENAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.warns(RepairWarning, match="kept as .*session.json.damaged-"):
        Session(tmp_path / "s").close()


def test_run_records_that_cannot_be_set_aside_are_a_save_error(tmp_path, monkeypatch):
    Session(tmp_path / "s").close()
    (tmp_path / "s" / RUNS_FILENAME).write_text("{not json")
    real_replace = os.replace

    def refuse(src, dst, *args, **kwargs):
        if ".damaged-" in str(dst):
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.warns(RunRecordWarning, match="cannot set the damaged run records aside"):
        Session(tmp_path / "s")
    assert (tmp_path / "s" / RUNS_FILENAME).read_text() == "{not json"


def test_a_session_whose_run_records_cannot_be_written_opens_saves_closes_and_is_destroyed(tmp_path, monkeypatch):
    # a full disk: opening to read, or to destroy and free the space, must not need room for the history
    with Session(tmp_path / "s") as session:
        oid = session.add(Task(jobname="kept"))
    before = (tmp_path / "s" / RUNS_FILENAME).read_bytes()

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runs_module, "write_atomically", full)
    with pytest.warns(RunRecordWarning, match=f"{RUNS_FILENAME}.*No space left on device; this run is not recorded"):
        session = Session(tmp_path / "s")
    assert session.tasks[oid].jobname == "kept" and session.session_id == json.loads(before)["session_id"]
    session.tasks[oid].jobname = "changed"
    with pytest.warns(RunRecordWarning):
        session.close()  # the change is saved all the same
    assert (tmp_path / "s" / RUNS_FILENAME).read_bytes() == before
    with pytest.warns(RunRecordWarning):
        assert Session(tmp_path / "s").tasks[oid].jobname == "changed"
    result = CliRunner().invoke(main, ["destroy", "--yes", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "this run is not recorded" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_failed_save_at_close_is_the_error_raised_not_the_run_record(tmp_path, monkeypatch):
    session = Session(tmp_path / "s")
    session.add(Task(), flush=False)
    monkeypatch.setattr(runs_module, "write_atomically", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    monkeypatch.setattr(session.store, "_write", lambda records: (_ for _ in ()).throw(SaveError("Task.1", "full")))
    with pytest.warns(RunRecordWarning), pytest.raises(SaveError) as excinfo:
        session.close()
    assert excinfo.value.target == "Task.1"


def test_a_session_whose_lock_cannot_be_taken_opens_to_be_read(tmp_path, monkeypatch):
    # read-only media, or a session of another user: reading needs no lock; writing says why it cannot
    Session(tmp_path / "s").add(Task(jobname="theirs"))

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    with pytest.warns(RunRecordWarning, match="cannot take the session lock: Read-only file system"):
        session = Session(tmp_path / "s")
    assert [t.jobname for t in session] == ["theirs"]
    with pytest.raises(SaveError, match="Read-only file system"):
        session.add(Task())


def test_run_records_that_cannot_be_read_are_not_taken_for_damaged(tmp_path, monkeypatch):
    # a disk error, or no permission (the file is 0600): setting the intact file aside would lose the history
    Session(tmp_path / "s").close()
    before = (tmp_path / "s" / RUNS_FILENAME).read_bytes()
    real_open = open

    def failing(path, *args, **kwargs):
        if str(path).endswith(RUNS_FILENAME):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs_module, "open", failing, raising=False)
    with pytest.warns(RunRecordWarning, match="Input/output error"):
        Session(tmp_path / "s")
    assert os.listdir(tmp_path / "s").count(RUNS_FILENAME) == 1
    assert not [name for name in os.listdir(tmp_path / "s") if ".damaged-" in name]
    assert (tmp_path / "s" / RUNS_FILENAME).read_bytes() == before


def test_session_tool_prints_run_records(tmp_path):
    session = Session(tmp_path / "s", params={"grid": "fine"})
    oid = session.add(Task())
    session.close()
    stats = CliRunner().invoke(main, ["stats", str(tmp_path / "s")])
    assert stats.exit_code == 0, stats.output
    assert "runs:" in stats.output and "grid" in stats.output and "ok" in stats.output
    show = CliRunner().invoke(main, ["show", str(tmp_path / "s"), oid])
    assert show.exit_code == 0 and "session runs:" in show.output


def test_a_password_on_the_command_line_is_neither_recorded_nor_shown(tmp_path, monkeypatch):
    url = "postgresql+psycopg://me:my/s3cr3t@db.example.org/test"
    monkeypatch.setattr(sys, "argv", ["session-tool", "copy", "a", "b", "--store", url, f"--url={url}"])
    session = Session(tmp_path / "s")
    session.add(Task())
    session.close()
    recorded = (tmp_path / "s" / RUNS_FILENAME).read_text()
    assert "s3cr3t" not in recorded and "me:***@db.example.org" in recorded
    runs = json.loads(recorded)  # a record written before passwords were masked is masked when shown
    runs["runs"][0]["argv"] = ["session-tool", "copy", "--store", "mysql+pymysql://root:p@ss@localhost/test"]
    (tmp_path / "s" / RUNS_FILENAME).write_text(json.dumps(runs))
    for command in (["stats", str(tmp_path / "s")], ["show", str(tmp_path / "s"), "Task.1"]):
        shown = CliRunner().invoke(main, command)
        assert shown.exit_code == 0 and "root:***@localhost" in shown.output, shown.output
        assert "s3cr3t" not in shown.output and "p@ss" not in shown.output and "ss@localhost" not in shown.output


def test_run_records_are_bounded_keeping_the_first_and_the_newest(tmp_path, monkeypatch):
    from gc3session import runs as runs_module

    monkeypatch.setattr(runs_module, "MAX_RUNS", 5)
    for alpha in range(8):
        Session(tmp_path / "s", params={"n": alpha}).close()
    content = json.loads((tmp_path / "s" / RUNS_FILENAME).read_text())
    assert [r["params"]["n"] for r in content["runs"]] == [0, 4, 5, 6, 7]
    assert content["runs_dropped"] == 3
    assert all(r["end"] is not None for r in content["runs"])


def test_session_tool_hides_passwords_in_run_params(tmp_path):
    session = Session(tmp_path / "s", params={"db": "postgresql://alice:Zq7secret@db/results", "password": "Zq7x",
                                             "nested": [{"api_token": "Zq7y"}], "alpha": 0.1})
    oid = session.add(Task())
    session.close()
    for command in (["stats"], ["show", oid]):
        shown = CliRunner().invoke(main, [command[0], str(tmp_path / "s"), *command[1:]])
        assert "Zq7" not in shown.output and "***" in shown.output, shown.output
    shown = CliRunner().invoke(main, ["stats", str(tmp_path / "s")]).output
    assert "alice:***@db/results" in shown and '"alpha": 0.1' in shown


def test_gc3session_warnings_share_one_base_to_filter_them_together():
    import gc3session

    for warning in (gc3session.LoadWarning, gc3session.RepairWarning, gc3session.OrphanWarning, RunRecordWarning):
        assert issubclass(warning, gc3session.Gc3sessionWarning) and issubclass(warning, UserWarning)
