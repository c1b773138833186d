"""session-tool, driven through click's CliRunner and, for a few checks, as the installed script."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helpers
import pytest
from click.testing import CliRunner

from gc3session import Session, State, Task, TaskCollection, __version__, cli
from gc3session import unfinished as unfinished_module
from gc3session.cli import fit, fit_id, main, table_cells, table_time, write_table
from gc3session.exceptions import SaveError, SessionError, StoreError
from gc3session.persistence import SqlStore, filesystem, make_store
from gc3session.persistence.filesystem import FilesystemStore, decode_record, encode_record
from gc3session.runs import read_runs

CLI_KINDS = ["file", "sqlite", "postgresql"]


def run(*args: str, input: str | None = None) -> Any:  # noqa: A002
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def snapshot(path: Path) -> dict[str, tuple[int, float]]:
    """Every file below ``path`` with its size and mtime."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(path.rglob("*"))}


@pytest.fixture(params=CLI_KINDS)
def sample(request: Any, tmp_path: Path, store_url_of: Callable[[str], str]) -> Path:
    """A session with two single tasks and a collection of three, some failed."""
    url = None if request.param == "file" else store_url_of(request.param)
    path = tmp_path / "s"
    session = Session(path, store_or_url=url)
    ok = Task(jobname="fit-ok")
    ok.state = State.TERMINATED
    ok.execution.returncode = 0
    bad = Task(jobname="fit-bad")
    bad.state = State.TERMINATED
    bad.execution.returncode = 2
    children = [Task(jobname=f"child-{i}") for i in range(3)]
    children[1].state = State.RUNNING
    session.add(ok)
    session.add(bad)
    session.add(TaskCollection(jobname="grid-with-a-really-long-name-" + "x" * 80, tasks=children))
    session.store.close()
    return path


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", ["ls", "show", "log", "stats", "rm", "destroy", "verify", "copy"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and f"session-tool {command}" in result.output


def test_ls_table_plain_when_piped(sample: Path) -> None:
    result = run("ls", sample)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split("\t") == ["ID", "JOBNAME", "STATE", "CLASS", "LAST CHANGE"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[1] for r in rows][:2] == ["fit-ok", "fit-bad"]
    assert rows[2][1].startswith("grid-with") and rows[2][1].endswith("x" * 80)  # not cut when piped
    assert [r[2] for r in rows] == ["TERMINATED", "TERMINATED", "NEW"]
    assert rows[2][3] == "TaskCollection"


def test_table_on_terminal_is_aligned_and_cut(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((80, 24)))
    rows = [
        table_cells("Task.1", {"jobname": "n" * 200, "state": "NEW", "cls": "a.Task", "modified": None}),
        table_cells("Task.22", {"jobname": "short", "state": "RUNNING", "cls": "a.Task", "modified": None}, depth=1),
    ]
    write_table(rows, terminal=True)
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" in lines[1]
    assert lines[1].index("NEW") == lines[2].index("RUNNING")
    assert lines[2].startswith("  Task.22")
    assert fit("abcdef", 4) == "abc…" and fit("abc", 4) == "abc "


def test_table_on_terminal_aligns_wide_and_combining_characters(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((80, 24)))
    names = ["plain", "模拟-第一步", "e\u0301te\u0301", "🧪" * 40, "a" + "宽" * 40]
    rows = [table_cells(f"Task.{i}", {"jobname": name, "state": "NEW", "cls": "a.Task", "modified": None})
            for i, name in enumerate(names)]
    write_table(rows, terminal=True)
    lines = capsys.readouterr().out.splitlines()[1:]

    def column_of_state(line: str) -> int:  # where NEW starts, counted in terminal columns
        before = line[: line.index("NEW")]
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
                   for c in before)

    assert len({column_of_state(line) for line in lines}) == 1, lines
    assert lines[3].count("🧪") < 40 and "…" in lines[3] and "…" in lines[4]
    assert fit("宽宽宽", 4) == "宽… " and fit("宽宽", 4) == "宽宽" and fit("e\u0301", 2) == "e\u0301 "


def test_ls_streams_the_index_instead_of_reading_it_whole(sample: Path, monkeypatch: Any) -> None:
    expected = run("ls", str(sample)).output
    monkeypatch.setattr(cli, "read_index", None)  # ls must not need the whole index in memory
    result = run("ls", str(sample))
    assert result.exit_code == 0, result.output
    assert result.output == expected and len(expected.splitlines()) > 1


def test_ls_shows_the_rows_read_before_the_store_fails(tmp_path: Path, monkeypatch: Any) -> None:
    session = Session(tmp_path / "s")
    for i in range(7):
        session.add(Task(jobname=f"t{i}"), flush=False)
    session.close()
    monkeypatch.setattr(cli, "TABLE_BLOCK", 3)  # rows go out three at a time
    read = FilesystemStore._read_summaries

    def failing(self: FilesystemStore, ids: list[str] | None) -> Any:
        for oid, summary in read(self, ids):
            if oid.endswith(".5"):
                raise StoreError(str(self.directory), "the disk went away")
            yield oid, summary

    monkeypatch.setattr(FilesystemStore, "_read_summaries", failing)
    result = run("ls", tmp_path / "s")
    assert result.exit_code == 1
    assert [line.split("\t")[1] for line in result.stdout.splitlines()[1:]] == ["t0", "t1", "t2", "t3"]
    assert "the disk went away" in result.stderr


def test_a_store_failure_is_what_ls_reports_even_if_the_output_fails_too(monkeypatch: Any) -> None:
    class ClosingOutput(io.StringIO):
        def write(self, text: str) -> int:
            if self.getvalue():  # the header went out; then the reader went away
                raise BrokenPipeError("the reader went away")
            return super().write(text)

    def rows() -> Any:
        yield ("Task.1", "a", "NEW", "Task", "")
        raise StoreError("db", "the disk went away")

    monkeypatch.setattr(sys, "stdout", ClosingOutput())
    with pytest.raises(StoreError, match="the disk went away"):
        write_table(rows(), terminal=False)


def test_ls_recursive_json_and_filters(sample: Path) -> None:
    result = run("ls", sample, "--recursive", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["depth"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["jobname"] for r in rows[3:]] == ["child-0", "child-1", "child-2"]
    assert {r["parent"] for r in rows[3:]} == {rows[2]["id"]}
    assert set(rows[0]) == {"id", "jobname", "state", "class", "returncode", "modified", "depth", "parent"}
    assert rows[1]["returncode"] == 2 and rows[0]["class"] == "gc3session.task.Task"

    running = json.loads(run("ls", sample, "-r", "--state", "running", "--format", "json").output)
    assert [r["jobname"] for r in running] == ["child-1"]
    named = json.loads(run("ls", sample, "-r", "--name", "child-*", "--format", "json").output)
    assert len(named) == 3
    failed = json.loads(run("ls", sample, "--failed", "--format", "json").output)
    assert [r["jobname"] for r in failed] == ["fit-bad"]
    assert json.loads(run("ls", sample, "--state", "STOPPED", "--format", "json").output) == []


def test_ls_refuses_a_state_that_does_not_exist(sample: Path) -> None:
    """A misspelt state listed nothing, and said nothing: no task running, the user concluded."""
    result = run("ls", sample, "-r", "--state", "RUNING")
    assert result.exit_code == 2 and "'RUNING' is not one of" in result.output, result.output


@pytest.mark.parametrize("kind", CLI_KINDS)
def test_ls_recursive_goes_deeper_than_the_connection_pool(
    kind: str, tmp_path: Path, store_url_of: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 levels (a SQL pool holds 15 connections) with batches of 2 children: each level must be read to
    # the end of a batch before the listing goes deeper
    monkeypatch.setattr(cli, "CHILD_BATCH", 2)
    leaf: Task = Task(jobname="level-20")
    for level in range(19, -1, -1):
        leaf = TaskCollection(jobname=f"level-{level}", tasks=[leaf, Task(jobname=f"side-{level}a"),
                                                               Task(jobname=f"side-{level}b")])
    session = Session(tmp_path / "s", store_or_url=None if kind == "file" else store_url_of(kind))
    session.add(leaf)
    session.store.close()
    result = run("ls", tmp_path / "s", "-r", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 1 + 20 * 3
    assert [r["jobname"] for r in rows if r["jobname"].startswith("level")] == [f"level-{i}" for i in range(21)]
    assert [r["depth"] for r in rows if r["jobname"].startswith("level")] == list(range(21))
    assert [r["jobname"] for r in rows[:5]] == ["level-0", "level-1", "level-2", "level-3", "level-4"]


def test_ls_csv(sample: Path) -> None:
    result = run("ls", sample, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["jobname"] for r in rows[:2]] == ["fit-ok", "fit-bad"]
    assert rows[0]["state"] == "TERMINATED"


def test_show(sample: Path) -> None:
    ids = json.loads(run("ls", sample, "-r", "--format", "json").output)
    grid = ids[2]["id"]
    result = run("show", sample, grid)
    assert result.exit_code == 0, result.output
    assert f"id:         {grid}" in result.output
    assert "class:      gc3session.task.TaskCollection" in result.output
    for child in ids[3:]:
        assert child["id"] in result.output
    assert "history:" in result.output and "NEW" in result.output


def test_show_unknown_id_is_one_clear_line(sample: Path) -> None:
    result = run("show", sample, "Task.999999")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "Task.999999" in result.output and "Traceback" not in result.output


def test_log_and_show_escape_line_ends_and_escape_sequences_in_job_names(tmp_path: Path) -> None:
    oid = Session(tmp_path / "s").add(Task(jobname="weird\tname\nsecond line \x1b[31mred"))
    logged = run("log", tmp_path / "s")
    assert logged.exit_code == 0 and len(logged.output.splitlines()) == 1 and "\x1b" not in logged.output
    assert "weird\\tname\\nsecond line \\x1b[31mred" in logged.output
    shown = run("show", tmp_path / "s", oid)
    assert shown.exit_code == 0 and "\x1b" not in shown.output and "jobname:    weird\\tname\\n" in shown.output


def test_stats_and_show_escape_line_ends_and_escape_sequences_in_states_and_run_records(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(sys, "argv", ["run.py", "--name", "two\nlines \x1b[31mred"])
    session = Session(tmp_path / "s")
    oid = session.add(Task())
    session.close()
    path = tmp_path / "s" / "jobs" / oid  # a state from a record edited by hand, or planted
    meta, data = decode_record(oid, path, path.read_bytes())
    path.write_bytes(encode_record({**meta, "state": "ODD\n\x1b[2J"}, data))
    for command in (["stats", tmp_path / "s"], ["show", tmp_path / "s", oid]):
        result = run(*command)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "two\\nlines \\x1b[31mred" in result.output
    stats = run("stats", tmp_path / "s").output
    assert "  ODD\\n\\x1b[2J" in stats


def test_csv_rows_hold_the_error_of_a_task_that_cannot_be_read(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    good, bad = session.add(Task(jobname="good")), session.add(Task(jobname="bad"))
    (tmp_path / "s" / "jobs" / bad).write_bytes(b"junk")
    rows = list(csv.DictReader(io.StringIO(run("ls", tmp_path / "s", "--format", "csv").output)))
    assert [(r["id"], r["state"]) for r in rows] == [(good, "NEW"), (bad, "UNREADABLE")]
    assert rows[0]["error"] == "" and "junk" not in rows[1]["error"] and rows[1]["error"]


def test_the_destroy_question_goes_to_stderr(tmp_path: Path) -> None:
    Session(tmp_path / "s").add(Task())
    result = run("destroy", tmp_path / "s", input="n\n")
    assert result.exit_code == 1 and "Destroy session" in result.stderr and "Destroy" not in result.stdout


def test_import_gc3pie_takes_store_as_copy_does() -> None:
    assert "--store-url, --store" in run("import-gc3pie", "--help").output


def test_long_ids_are_cut_in_their_class_name_and_keep_their_number() -> None:
    cut = [fit_id(f"ParallelTaskCollection.{n}", 20) for n in (10, 11, 12)]
    assert cut == ["ParallelTaskColl….10", "ParallelTaskColl….11", "ParallelTaskColl….12"]
    assert fit_id("Task.1", 20) == "Task.1".ljust(20)
    assert fit_id("  Sequential.123456789012345678", 20) == "….123456789012345678"  # the number, whole


def test_warnings_are_one_line_on_stderr(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    session.add(Task())
    session.close()
    with open(tmp_path / "s" / "index.txt", "a") as index:
        index.write("Task.2")  # a torn last line that reads as an id: ignored, with a warning
    result = run("verify", tmp_path / "s")
    assert "warning: " in result.output and "has no newline: ignored" in result.output
    assert "RepairWarning" not in result.output and ".py:" not in result.output


def test_ls_shows_the_tasks_before_a_bad_line_of_the_index_then_the_error(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    first = session.add(Task(jobname="first"))
    session.close()
    (tmp_path / "s" / "index.txt").write_text(f"{first}\n../not an id\n")
    result = run("ls", tmp_path / "s")
    assert result.exit_code == 1 and "line 2" in result.output
    assert result.stdout.splitlines()[1].split("\t")[:2] == [first, "first"]


def test_log_is_oldest_first(sample: Path) -> None:
    result = run("log", sample)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 6 + 3  # one NEW per task, plus TERMINATED twice and RUNNING once
    times = [line[:19] for line in lines]
    assert times == sorted(times)
    assert any(line.endswith("RUNNING") and "child-1" in line for line in lines)


def test_stats(sample: Path) -> None:
    result = run("stats", sample)
    assert result.exit_code == 0, result.output
    assert "3 top-level, 6 with children" in result.output
    assert "TERMINATED" in result.output and "RUNNING" in result.output
    assert "store:" in result.output and "size:" in result.output


def test_read_only_commands_change_nothing(sample: Path) -> None:
    before = snapshot(sample)
    grid = json.loads(run("ls", sample, "--format", "json").output)[2]["id"]
    for args in (["ls", "-r"], ["show", grid], ["log"], ["stats"], ["verify"]):
        assert run(args[0], sample, *args[1:]).exit_code == 0
    assert snapshot(sample) == before  # nothing written, not even a lock file


def test_rm_with_children_and_dry_run(sample: Path) -> None:
    rows = json.loads(run("ls", sample, "-r", "--format", "json").output)
    grid = rows[2]["id"]
    dry = run("rm", sample, grid, "--dry-run")
    assert dry.exit_code == 0 and "would remove 4" in dry.output
    assert read_runs(str(sample))["runs"][-1]["end"] is not None  # the dry run's record is closed
    assert len(json.loads(run("ls", sample, "-r", "--format", "json").output)) == 6
    done = run("rm", sample, grid)
    assert done.exit_code == 0, done.output
    left = Session(sample)
    assert sorted(t.jobname for t in left) == ["fit-bad", "fit-ok"]
    assert not set(left.store.list()) & {r["id"] for r in rows[2:]}
    left.store.close()


def test_rm_keep_in_store(sample: Path) -> None:
    first = json.loads(run("ls", sample, "--format", "json").output)[0]["id"]
    assert run("rm", sample, first, "--keep-in-store").exit_code == 0
    left = Session(sample)
    assert first not in left.list_ids() and first in left.store.list()
    left.store.close()


def test_rm_unknown_id_refused(sample: Path) -> None:
    result = run("rm", sample, "Task.424242")
    assert result.exit_code == 1 and "Task.424242" in result.output


def test_destroy_asks_and_refuses_non_sessions(sample: Path, tmp_path: Path) -> None:
    no = run("destroy", sample, input="n\n")
    assert no.exit_code == 1 and "3 task(s)" in no.output and sample.exists()
    assert run("destroy", sample, "--dry-run").exit_code == 0 and sample.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "precious.txt").write_text("keep me")
    refused = run("destroy", plain, "--yes")
    assert refused.exit_code == 1 and "not a session" in refused.output
    assert (plain / "precious.txt").exists()
    yes = run("destroy", sample, input="y\n")
    assert yes.exit_code == 0 and not sample.exists()


@pytest.mark.parametrize("url", ["{tmp}/gone/jobs", "ftp://host/x", "${GC3_TEST_UNSET_VARIABLE}/jobs"])
def test_destroy_dry_run_refuses_what_destroy_refuses_and_before_asking(tmp_path: Path, url: str) -> None:
    """The dry run never opened the store: it said it would destroy a session that destroy then refused."""
    session = Session(tmp_path / "s")
    session.add(Task())
    session.close()
    (tmp_path / "s" / "store.url").write_text(url.replace("{tmp}", str(tmp_path)) + "\n")
    for args in (["--dry-run"], []):
        result = run("destroy", tmp_path / "s", *args, input="y\n")
        assert result.exit_code == 1 and "would destroy" not in result.output, result.output
        assert "Destroy session" not in result.output and (tmp_path / "s" / "index.txt").exists()


def test_verify_reports_missing_and_damaged(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(4)]
    (tmp_path / "s" / "jobs" / ids[1]).unlink()
    (tmp_path / "s" / "jobs" / ids[2]).write_bytes(b"garbage")
    result = run("verify", tmp_path / "s")
    assert result.exit_code == 1
    assert ids[1] in result.output and ids[2] in result.output
    assert "2 of 4 task(s) load" in result.output


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "file"])
def test_copy_between_store_kinds(tmp_path: Path, store_url_of: Callable[[str], str], kind: str) -> None:
    source = Session(tmp_path / "src")
    ids = [source.add(TaskCollection(jobname=f"c{i}", tasks=[Task(jobname=f"c{i}-{j}") for j in range(3)]))
           for i in range(5)]
    url = store_url_of(kind)
    result = run("copy", tmp_path / "src", tmp_path / "dst", "--store", url)
    assert result.exit_code == 0, result.output
    copy = Session(tmp_path / "dst")
    assert copy.list_ids() == ids
    assert [[c.jobname for c in t.tasks] for t in copy] == [[f"c{i}-{j}" for j in range(3)] for i in range(5)]
    assert run("verify", tmp_path / "dst").exit_code == 0
    new = copy.add(Task())
    assert new not in copy.store.list()[:-1]  # the counter moved past the copied ids
    copy.store.close()
    # and back to files
    back = run("copy", tmp_path / "dst", tmp_path / "back")
    assert back.exit_code == 0, back.output
    assert Session(tmp_path / "back").list_ids() == [*ids, new]


def test_copy_refuses_to_overwrite_other_objects(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    Session(tmp_path / "a", store_or_url=url).add(Task(jobname="a"))
    Session(tmp_path / "b").add(Task(jobname="b"))  # same id Task.1, other content
    refused = run("copy", tmp_path / "b", tmp_path / "c", "--store", url)
    assert refused.exit_code == 1 and "--renumber" in refused.output
    assert not (tmp_path / "c").exists()
    renumbered = run("copy", tmp_path / "b", tmp_path / "c", "--store", url, "--renumber")
    assert renumbered.exit_code == 0, renumbered.output
    assert [t.jobname for t in Session(tmp_path / "c")] == ["b"]
    assert [t.jobname for t in Session(tmp_path / "a")] == ["a"]


def test_copy_to_an_empty_name_is_refused_and_the_current_directory_kept(tmp_path: Path, monkeypatch: Any) -> None:
    Session(tmp_path / "a").add(Task(jobname="a"))
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    Session(tmp_path / "work" / "inner").close()  # the current directory holds a session too
    monkeypatch.chdir(tmp_path / "work" / "inner")
    for args in (["destroy", "", "--yes"], ["rm", "", "Task.1"], ["ls", ""]):
        result = run(*args)
        assert result.exit_code == 1 and "session path is empty" in result.output, (args, result.output)
    assert (tmp_path / "work" / "inner" / "store.url").exists()
    monkeypatch.chdir(tmp_path / "work")
    for args in (["copy", tmp_path / "a", ""], ["copy", tmp_path / "a", tmp_path / "b", "--store", " "]):
        result = run(*args)
        assert result.exit_code == 1 and "is empty" in result.output, result.output
    assert sorted(os.listdir(tmp_path / "work")) == ["inner", "notes.txt"] and not (tmp_path / "b").exists()


def test_a_failed_copy_into_an_empty_directory_leaves_it_empty(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    Session(tmp_path / "a", store_or_url=url).add(Task(jobname="a"))
    Session(tmp_path / "b").add(Task(jobname="b"))  # same id Task.1, other content: the copy is refused
    (tmp_path / "c").mkdir()
    refused = run("copy", tmp_path / "b", tmp_path / "c", "--store", url)
    assert refused.exit_code == 1 and "--renumber" in refused.output
    assert (tmp_path / "c").is_dir() and os.listdir(tmp_path / "c") == []


@pytest.mark.parametrize("failing", ["index.txt", "store.url", "mark"])
def test_a_copy_whose_destination_cannot_be_made_whole_leaves_nothing_and_can_be_run_again(
    tmp_path: Path, monkeypatch: Any, failing: str
) -> None:
    # a full disk while DEST's own files are written: DEST half made refused the copy run again
    Session(tmp_path / "src").add(Task(jobname="t"))
    real_replace, real_unlink = os.replace, os.unlink

    def full_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
        if str(dst).endswith(os.path.join("dest", failing)):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    def failing_unlink(path: Any, *args: Any, **kwargs: Any) -> Any:
        if failing == "mark" and os.path.basename(str(path)) == unfinished_module.UNFINISHED_FILENAME:
            monkeypatch.setattr(os, "unlink", real_unlink)  # once: the clean-up then removes it
            raise OSError(5, "Input/output error", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_replace)
    monkeypatch.setattr(os, "unlink", failing_unlink)
    result = CliRunner().invoke(main, ["copy", str(tmp_path / "src"), str(tmp_path / "dest")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
    assert not (tmp_path / "dest").exists()
    monkeypatch.undo()
    result = CliRunner().invoke(main, ["copy", str(tmp_path / "src"), str(tmp_path / "dest")])
    assert result.exit_code == 0, result.output
    assert [t.jobname for t in Session(tmp_path / "dest")] == ["t"]


def test_copy_refuses_a_number_the_destination_handed_out_already_and_says_renumber(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    other = Session(tmp_path / "other", store_or_url=url)
    other.remove(other.add(Task(jobname="gone")))  # Task.1 handed out there, its row since deleted
    other.close()
    Session(tmp_path / "a").add(Task(jobname="a"))  # Task.1 too
    refused = run("copy", tmp_path / "a", tmp_path / "c", "--store", url)
    assert refused.exit_code == 1 and "handed out number 1" in refused.output and "--renumber" in refused.output
    assert not (tmp_path / "c").exists()
    renumbered = run("copy", tmp_path / "a", tmp_path / "c", "--store", url, "--renumber")
    assert renumbered.exit_code == 0, renumbered.output
    assert [t.jobname for t in Session(tmp_path / "c")] == ["a"]


def test_copy_that_cannot_write_says_so_without_suggesting_renumber(tmp_path: Path, monkeypatch: Any) -> None:
    Session(tmp_path / "a").add(Task(jobname="a"))

    def disk_full(store: Any, records: Any) -> None:
        raise SaveError(records[0].id, "cannot write: No space left on device")

    monkeypatch.setattr(FilesystemStore, "_write", disk_full)
    result = run("copy", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 1 and "No space left" in result.output and "--renumber" not in result.output
    assert not (tmp_path / "b").exists()


def many_tasks(path: Path, n: int) -> Session:
    session = Session(path)
    for i in range(n):
        session.add(Task(jobname=f"t{i}"), flush=False)
    session.flush()
    return session


@pytest.mark.parametrize("renumber", [False, True])
def test_a_copy_that_fails_after_some_batches_deletes_what_it_wrote_in_a_shared_store(
    tmp_path: Path, monkeypatch: Any, renumber: bool
) -> None:
    many_tasks(tmp_path / "a", 1500).close()
    url = f"sqlite:///{tmp_path}/shared.db"
    other = Session(tmp_path / "other", store_or_url=url)
    other.add(Task(jobname="another session's"))  # Task.1: a plain copy keeps ids, so it takes a store of its own
    other.close()
    if not renumber:
        url = f"sqlite:///{tmp_path}/shared.db#table=copies"
    writing = "_write" if renumber else "import_records"  # how each way of copying writes a batch
    real = getattr(SqlStore, writing)
    calls: list[int] = []

    def disk_full_at_the_second_batch(store: Any, records: Any) -> None:
        calls.append(len(records))
        if len(calls) == 2:
            raise SaveError("Task.1001", "cannot write: No space left on device")
        real(store, records)

    monkeypatch.setattr(SqlStore, writing, disk_full_at_the_second_batch)
    result = run("copy", tmp_path / "a", tmp_path / "b", "--store", url, *(["--renumber"] if renumber else []))
    assert result.exit_code == 1 and "No space left" in result.output and calls == [1000, 500]
    assert not (tmp_path / "b").exists()
    assert [t.jobname for t in Session(tmp_path / "other")] == ["another session's"]
    db = sqlite3.connect(tmp_path / "shared.db")
    tables = ["store"] if renumber else ["store", "copies"]  # the other session's record, and no copy
    assert [db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables] == [1, 0][: len(tables)]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_copy_cut_short_in_a_batch_of_files_leaves_none_of_them(
    tmp_path: Path, monkeypatch: Any, failure: BaseException
) -> None:
    """A filesystem store writes a batch file by file: those written before the failure go again."""
    many_tasks(tmp_path / "a", 5).close()
    real, calls = filesystem.write_atomically, []

    def third_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(args[0])
        if len(calls) == 3:
            raise failure
        real(*args, **kwargs)

    monkeypatch.setattr(filesystem, "write_atomically", third_fails)
    result = run("copy", tmp_path / "a", tmp_path / "b", "--store", tmp_path / "shared")
    assert result.exit_code == 1 and len(calls) == 3
    assert not (tmp_path / "b").exists() and FilesystemStore(tmp_path / "shared").list() == []


def test_a_renumbering_copy_that_fails_deletes_the_records_its_tasks_refer_to(tmp_path: Path, monkeypatch: Any) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    holder = Task(jobname="holder", extra={"inner": Task(jobname="held in a dict")})
    Session(tmp_path / "a", store_or_url=url).add(holder)
    real = Session.flush

    def fails_once_written(session: Session) -> None:
        real(session)
        if session.path == str(tmp_path / "b"):
            raise SaveError(session.path, "cannot write: No space left on device")

    monkeypatch.setattr(Session, "flush", fails_once_written)
    result = run("copy", tmp_path / "a", tmp_path / "b", "--store", url, "--renumber")
    assert result.exit_code == 1 and "No space left" in result.output
    rows = sqlite3.connect(tmp_path / "shared.db").execute("SELECT persistent_id, jobname FROM store").fetchall()
    assert sorted(rows) == [("Task.1", "holder"), ("Task.2", "held in a dict")]  # the source's, and no copy


def test_a_copy_that_fails_and_cannot_delete_what_it_wrote_says_so(tmp_path: Path, monkeypatch: Any) -> None:
    many_tasks(tmp_path / "a", 1500).close()
    url = f"sqlite:///{tmp_path}/shared.db"
    real = SqlStore.import_records

    def full_at_the_second_batch(store: Any, records: Any) -> None:
        if store.list():
            raise SaveError("Task.1001", "cannot write: No space left on device")
        real(store, records)

    def down(store: Any, ids: Any) -> None:
        raise StoreError("sqlite:///shared.db", "database is locked")

    monkeypatch.setattr(SqlStore, "import_records", full_at_the_second_batch)
    monkeypatch.setattr(SqlStore, "remove_many", down)
    result = run("copy", tmp_path / "a", tmp_path / "b", "--store", url)
    assert result.exit_code == 1 and "No space left" in result.output
    assert "warning: the 1000 record(s) the copy wrote stay in the store" in result.output
    assert "database is locked" in result.output and not (tmp_path / "b").exists()


def test_a_copy_refused_half_way_deletes_only_its_own_records_not_the_children_another_session_holds(
    tmp_path: Path,
) -> None:
    """The collection is copied first, its children in a later batch, where another session holds a number."""
    url = f"sqlite:///{tmp_path}/shared.db"
    source = Session(tmp_path / "a")
    source.store.skip_past(101)
    children = [Task(jobname="x"), Task(jobname="y")]
    assert [source.save(child) for child in children] == ["Task.102", "Task.103"]
    source.store.skip_past(200)
    source.add(TaskCollection(jobname="c", tasks=children))  # TaskCollection.201, above the other's numbers
    source.close()
    other = Session(tmp_path / "other", store_or_url=url)
    other.store.skip_past(101)
    held = other.add(Task(jobname="another session's"))  # Task.102, the number of the first child
    other.close()
    refused = run("copy", tmp_path / "a", tmp_path / "b", "--store", url)
    assert refused.exit_code == 1 and "Task.102" in refused.output and "--renumber" in refused.output
    assert [t.jobname for t in Session(tmp_path / "other")] == ["another session's"] and held == "Task.102"
    assert sqlite3.connect(tmp_path / "shared.db").execute("SELECT id FROM store").fetchall() == [(102,)]
    assert not (tmp_path / "b").exists()  # and TaskCollection.201, which it did write, is gone


def test_copy_refuses_an_sql_row_held_by_an_id_with_another_prefix(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    Session(tmp_path / "a", store_or_url=url).add(Task(jobname="a"))  # Task.1: row 1
    Session(tmp_path / "b").add(TaskCollection(jobname="b"))  # TaskCollection.1 would go to row 1 too
    refused = run("copy", tmp_path / "b", tmp_path / "c", "--store", url)
    assert refused.exit_code == 1 and "TaskCollection.1" in refused.output and "--renumber" in refused.output
    assert [t.jobname for t in Session(tmp_path / "a")] == ["a"]


@pytest.mark.parametrize("command", [["ls"], ["ls", "--format", "json"], ["ls", "--format", "csv"], ["stats"],
                                     ["verify"], ["rm", "Task.1"], ["destroy", "--yes"]])
def test_a_session_whose_sqlite_file_is_gone_is_an_error_leaving_no_file(tmp_path: Path, command: list[str]) -> None:
    Session(tmp_path / "s", store_or_url=f"sqlite:///{tmp_path}/tasks.db").add(Task(jobname="a"))
    (tmp_path / "tasks.db").unlink()
    result = run(command[0], tmp_path / "s", *command[1:])
    said = ("no database file" if command[0] in ("ls", "stats", "verify") else "which does not exist")
    assert result.exit_code == 1 and f"{tmp_path}/tasks.db" in result.output and said in result.output, result.output
    assert result.stdout == ""  # an error only: no table header, no half of a JSON list
    assert "load=False" not in result.output  # a Python hint means nothing in a shell
    if command[0] == "destroy":
        assert f"remove {tmp_path / 's'}" in result.output
    assert not (tmp_path / "tasks.db").exists()
    assert Path(tmp_path / "s" / "index.txt").read_text() == "Task.1\n"  # the session is as it was


def test_rm_says_which_task_named_leaves_only_the_session(tmp_path: Path) -> None:
    """Another task refers to it: its record stays, and the command says so rather than "removed 0 task(s)"."""
    session = Session(tmp_path / "s")
    needed = session.add(Task(jobname="needed"))
    session.add(Task(jobname="user", depends_on=session.tasks[needed]))
    session.close()
    done = run("rm", tmp_path / "s", needed)
    assert done.exit_code == 0, done.output
    assert done.output.strip().endswith(f"only from the session, as other tasks hold or refer to them: {needed}")
    assert needed not in Session(tmp_path / "s").list_ids() and run("verify", tmp_path / "s").exit_code == 0


def test_rm_whose_deletion_fails_says_so_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(tmp_path / "s")
    doomed, kept = session.add(Task(jobname="doomed")), session.add(Task(jobname="kept"))
    session.close()
    helpers.refuse_deleting(monkeypatch, doomed)
    failed = run("rm", tmp_path / "s", doomed)
    assert failed.exit_code == 1 and f"cannot delete the record {doomed}" in failed.output, failed.output
    assert "1 deletion(s) failed" in failed.output and "Traceback" not in failed.output
    monkeypatch.undo()
    assert Session(tmp_path / "s").list_ids() == [kept]  # out of the session all the same


def test_rm_keeps_and_does_not_name_a_child_that_another_collection_holds(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    shared, own = Task(jobname="shared"), Task(jobname="own")
    first = session.add(TaskCollection(jobname="first", tasks=[shared, own]))
    second = session.add(TaskCollection(jobname="second", tasks=[shared]))
    session.close()
    expected = f"{first} {own.persistent_id}"
    dry = run("rm", tmp_path / "s", first, "--dry-run")
    assert dry.exit_code == 0 and dry.output.strip().endswith(f"the store: {expected}"), dry.output
    assert sorted(Session(tmp_path / "s").list_ids()) == sorted([first, second])
    done = run("rm", tmp_path / "s", first)
    assert done.exit_code == 0 and done.output.strip().endswith(f"the store: {expected}"), done.output
    verified = run("verify", tmp_path / "s")
    assert verified.exit_code == 0, verified.output


def test_table_time_shows_a_second_or_nothing() -> None:
    shown = table_time(1_700_000_000.7)
    assert shown == table_time(1_700_000_000) and len(shown) == 19 and shown.startswith("2023-11-1")
    for odd in (True, "1700000000", None, [1], float("nan"), float("inf"), 1e20, -1e20, 10**30):
        assert table_time(odd) == "", odd


def test_times_no_date_can_show_are_listed_without_a_traceback(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(4)]
    session.close()
    odd = [(1e20, 1e300), (float("nan"), float("inf")), (-1e20, -1e300), (1.7e9, 1.7e9)]
    for oid, (modified, created) in zip(ids, odd, strict=True):
        record = tmp_path / "s" / "jobs" / oid
        meta, data = decode_record(oid, record, record.read_bytes())  # type: ignore[misc]
        meta.update(modified=modified, created=created, history=[[modified, "NEW"], ["x", "RUNNING"]])
        record.write_bytes(encode_record(meta, data))  # the listing line says the same
    runs_file = tmp_path / "s" / "session.json"
    runs = json.loads(runs_file.read_text())
    runs["runs"][0].update(error="killed", end=1e20)  # a record edited by hand
    runs_file.write_text(json.dumps(runs))
    commands = [["ls"], ["ls", "--format", "json"], ["ls", "--format", "csv"], ["log"], ["stats"],
                *(["show", oid] for oid in ids)]
    for command in commands:
        result = run(command[0], tmp_path / "s", *command[1:])
        assert result.exit_code == 0 and "Traceback" not in result.output, (command, result.output)
    listed = run("ls", tmp_path / "s", "--format", "json")
    assert [row["modified"] for row in json.loads(listed.output)][:3] == [None, None, None]
    table = [row.split("\t") for row in run("ls", tmp_path / "s").output.splitlines()[1:]]
    assert [row[4] for row in table[:3]] == ["", "", ""] and table[3][4].startswith("2023-11-1"), table
    assert "failed: killed" in run("stats", tmp_path / "s").output


def test_reading_commands_leave_a_sqlite_file_as_it_is(tmp_path: Path) -> None:
    """No switch to WAL (which network file systems break) and no counters table from ls, show, verify."""
    db = tmp_path / "tasks.db"
    session = Session(tmp_path / "s", store_or_url=f"sqlite:///{db}")
    oid = session.add(Task(jobname="a"))
    session.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("DROP TABLE gc3session_counters")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for command in (["ls"], ["show", oid], ["verify"], ["stats"], ["log"]):
        result = run(command[0], tmp_path / "s", *command[1:])
        assert result.exit_code == 0, (command, result.output)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_store_url_a_driver_cannot_use_is_a_one_line_error(tmp_path: Path) -> None:
    Session(tmp_path / "s").close()
    (tmp_path / "s" / "store.url").write_text("postgresql+psycopg://me:pw@127.0.0.1:54x2/test\n")
    result = run("ls", tmp_path / "s")
    assert result.exit_code == 1 and "not a valid database URL" in result.output and "Traceback" not in result.output
    assert "pw@" not in result.output


def test_copy_into_the_session_itself_is_refused(tmp_path: Path) -> None:
    """DEST inside SRC: destroying SRC would delete the copy with it."""
    session = Session(tmp_path / "a")
    session.add(Task(jobname="t"))
    session.close()
    refused = run("copy", tmp_path / "a", tmp_path / "a" / "backup")
    assert refused.exit_code == 1 and f"is inside session {tmp_path / 'a'}" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "a" / "backup").exists()


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_copy_into_the_sessions_own_store_is_refused_but_with_renumber(tmp_path: Path, kind: str) -> None:
    url = str(tmp_path / "a" / "jobs") if kind == "file" else f"sqlite:///{tmp_path}/a.db"
    session = Session(tmp_path / "a", store_or_url=None if kind == "file" else url)
    session.add(TaskCollection(jobname="c", tasks=[Task(jobname="t")]))
    session.close()
    refused = run("copy", tmp_path / "a", tmp_path / "b", "--store", url)
    if kind == "file":
        assert refused.exit_code == 1 and f"is inside session {tmp_path / 'a'}" in refused.output
    else:
        assert refused.exit_code == 1 and "these very records" in refused.output and "--renumber" in refused.output
    assert not (tmp_path / "b").exists()
    renumbered = run("copy", tmp_path / "a", tmp_path / "b", "--store", url, "--renumber")
    if kind == "file":  # a store inside a session directory goes when that session is destroyed: it is its own
        assert renumbered.exit_code == 1 and f"is inside session {tmp_path / 'a'}" in renumbered.output
        assert not (tmp_path / "b").exists()
        assert run("destroy", tmp_path / "a", "--yes").exit_code == 0
        return
    assert renumbered.exit_code == 0, renumbered.output
    assert run("destroy", tmp_path / "b", "--yes").exit_code == 0
    verified = run("verify", tmp_path / "a")
    assert verified.exit_code == 0, verified.output


def test_ls_recursive_lists_a_chain_of_collections_thousands_deep(tmp_path: Path) -> None:
    inner = Task(jobname="leaf")
    for level in range(1500):
        inner = TaskCollection(jobname=f"level-{level}", tasks=[inner])
    session = Session(tmp_path / "s")
    session.add(inner)
    session.close()
    listed = run("ls", tmp_path / "s", "--recursive", "--format", "json")
    assert listed.exit_code == 0, listed.output[-500:]
    rows = json.loads(listed.output)
    assert len(rows) == 1501 and rows[-1]["jobname"] == "leaf" and rows[-1]["depth"] == 1500


def test_stats_and_log_count_a_shared_child_once(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    shared = Task(jobname="shared")
    session.add(TaskCollection(jobname="a", tasks=[shared]))
    session.add(TaskCollection(jobname="b", tasks=[shared]))
    session.close()
    stats = run("stats", tmp_path / "s")
    assert stats.exit_code == 0 and "3 with children" in stats.output, stats.output
    log = run("log", tmp_path / "s")
    assert log.output.count("shared") == 1, log.output


def test_ls_recursive_lists_a_shared_collection_once_with_its_children(tmp_path: Path) -> None:
    shared = TaskCollection(jobname="shared", tasks=[Task(jobname="leaf")])
    top = TaskCollection(jobname="top", tasks=[TaskCollection(jobname="b1", tasks=[shared]),
                                               TaskCollection(jobname="b2", tasks=[shared])])
    session = Session(tmp_path / "s")
    session.add(top)
    session.close()
    listed = run("ls", tmp_path / "s", "--recursive", "--format", "json")
    names = [(row["depth"], row["jobname"]) for row in json.loads(listed.output)]
    assert names == [(0, "top"), (1, "b1"), (2, "shared"), (3, "leaf"), (1, "b2"), (2, "shared")]


def test_rm_and_copy_end_their_run_records(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    oid = session.add(Task())
    session.add(Task())
    session.close()
    assert run("rm", tmp_path / "s", oid).exit_code == 0
    copied = run("copy", tmp_path / "s", tmp_path / "c")
    assert copied.exit_code == 0 and "copied 1 task(s)" in copied.output
    for path in (tmp_path / "s", tmp_path / "c"):
        runs = json.loads((path / "session.json").read_text())["runs"]
        assert all(record["end"] is not None for record in runs), runs


def test_control_characters_in_a_name_cannot_break_the_table(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    session.add(Task(jobname="two\tcells\nand a line \x1b[31mred"))
    session.add(Task(jobname="plain"))
    session.close()
    listed = run("ls", tmp_path / "s")
    rows = listed.output.splitlines()
    assert len(rows) == 3 and all(row.count("\t") == 4 for row in rows), rows
    assert "two\\tcells\\nand a line \\x1b[31mred" in rows[1]


def test_copy_into_the_same_store_under_another_name_is_refused_too(tmp_path: Path) -> None:
    """What counts is what the destination holds: a URL that names the same database differently is caught."""
    session = Session(tmp_path / "a", store_or_url=f"sqlite:///{tmp_path}/a.db")
    session.add(Task(jobname="t"))
    session.close()
    os.symlink(tmp_path / "a.db", tmp_path / "alias.db")
    refused = run("copy", tmp_path / "a", tmp_path / "b", "--store", f"sqlite:///{tmp_path}/alias.db")
    assert refused.exit_code == 1 and "these very records" in refused.output, refused.output
    assert not (tmp_path / "b").exists()
    assert run("verify", tmp_path / "a").exit_code == 0


def test_not_a_session_and_debug(tmp_path: Path) -> None:
    result = run("ls", tmp_path)
    assert result.exit_code == 1 and "not a session" in result.output and "Traceback" not in result.output
    debug = run("--debug", "ls", tmp_path)
    assert debug.exit_code == 1 and debug.exception is not None


def test_usage_error_exit_status() -> None:
    assert run("ls").exit_code == 2
    assert run("ls", "x", "--format", "xml").exit_code == 2


def test_unreachable_store_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    (path / "store.url").write_text("postgresql://nobody:pw@127.0.0.1:1/none\n")
    (path / "index.txt").write_text("Task.1\n")
    result = run("ls", path)
    assert result.exit_code == 1 and "127.0.0.1:1" in result.output
    assert "pw@" not in result.output and "Traceback" not in result.output


# -- sessions whose classes the CLI cannot import, and hostile pickles -------------

FOREIGN_MODULE = textwrap.dedent(
    """
    from gc3session import Task

    class Simulation(Task):
        pass
    """
)


def test_foreign_classes_listed_without_import(tmp_path: Path, store_url_of: Callable[[str], str]) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "private_sim.py").write_text(FOREIGN_MODULE)
    url = store_url_of("sqlite")
    code = (
        "import sys; from gc3session import Session; from private_sim import Simulation\n"
        f"s = Session({str(tmp_path / 's')!r}, store_or_url={url!r})\n"
        "t = Simulation(jobname='sim'); t.state = 'RUNNING'; s.add(t)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(mods)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert "private_sim" not in sys.modules
    rows = json.loads(run("ls", tmp_path / "s", "--format", "json").output)
    assert rows[0]["class"] == "private_sim.Simulation" and rows[0]["state"] == "RUNNING"
    oid = rows[0]["id"]
    assert run("show", tmp_path / "s", oid).exit_code == 0
    assert run("log", tmp_path / "s").exit_code == 0
    assert run("stats", tmp_path / "s").exit_code == 0
    assert "private_sim" not in sys.modules
    verify = run("verify", tmp_path / "s")
    assert verify.exit_code == 1 and "private_sim" in verify.output


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def plant_hostile_task(session_path: Path, marker: Path) -> str:
    """Put a record whose pickle would create ``marker`` if ever loaded; return its id."""
    session = Session(session_path)
    oid = session.add(Task(jobname="innocent"))
    data = pickle.dumps(_Boom(str(marker)), protocol=4)
    meta = session.store.metadata(oid)
    meta.update(size=len(data), crc32=zlib.crc32(data))
    store = session.store
    if hasattr(store, "directory"):
        (Path(store.directory) / oid).write_bytes(encode_record(meta, data))
    else:
        with store.engine.begin() as conn:
            conn.execute(store.table.update().where(store.table.c.persistent_id == oid).values(data=data,
                                                                                            meta=json.dumps(meta)))
    store.close()
    return oid


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_hostile_pickle_never_runs(tmp_path: Path, store_url_of: Callable[[str], str], kind: str) -> None:
    path = tmp_path / "s"
    if kind != "file":
        Session(path, store_or_url=store_url_of(kind)).store.close()
    marker = tmp_path / "pwned"
    oid = plant_hostile_task(path, marker)
    for args in (["ls", "-r"], ["show", oid], ["log"], ["stats"], ["rm", oid, "--dry-run"], ["destroy", "--dry-run"]):
        result = run(args[0], path, *args[1:])
        assert result.exit_code == 0, (args, result.output)
    assert not marker.exists()
    guarded = run("verify", path, "--allow", "gc3session")
    assert guarded.exit_code == 1 and "not in allowed_classes" in guarded.output
    assert not marker.exists()
    assert run("rm", path, oid).exit_code == 0
    assert run("destroy", path, "--yes").exit_code == 0
    assert not marker.exists() and not path.exists()


def test_installed_script_runs(tmp_path: Path, sample: Path) -> None:
    script = shutil.which("session-tool", path=os.path.dirname(sys.executable)) or shutil.which("session-tool")
    assert script, "session-tool is not installed next to this Python"
    listed = subprocess.run([script, "ls", str(sample), "--format", "json"], capture_output=True, text=True)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 3
    missing = subprocess.run([script, "ls", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error:") and "Traceback" not in missing.stderr
    assert missing.stdout == ""


def test_a_name_of_bytes_that_are_no_utf8_does_not_stop_the_output(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    oid = session.add(Task(jobname=os.fsdecode(b"bad-\xff-name")))  # as a name read from a file system comes
    session.close()
    script = shutil.which("session-tool", path=os.path.dirname(sys.executable)) or shutil.which("session-tool")
    assert script
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # strict, as under an installed UTF-8 locale
    for command in (["ls"], ["ls", "--format", "csv"], ["show", oid], ["log"]):
        done = subprocess.run([script, command[0], str(tmp_path / "s"), *command[1:]], capture_output=True, env=env)
        assert done.returncode == 0 and b"bad-\\udcff-name" in done.stdout, (command, done.stderr)


def test_rm_of_an_id_named_twice_removes_it_once(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    oid, kept = session.add(Task()), session.add(Task())
    session.close()
    result = run("rm", tmp_path / "s", oid, oid)
    assert result.exit_code == 0 and result.output.strip().endswith(f"the store: {oid}"), result.output
    assert Session(tmp_path / "s").list_ids() == [kept]


def test_verify_notes_leftover_temporary_files(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    session.add(Task())
    (tmp_path / "s" / "jobs" / ".tmp-Task.9-deadbeef").write_bytes(b"half")
    result = run("verify", tmp_path / "s")
    assert result.exit_code == 0
    assert ".tmp-Task.9-deadbeef" in result.output and "safe to delete" in result.output


#: A session-tool command killed (as by kill -9: nothing cleans up) at the second call of a method: the second
#: batch of records a copy writes, or the second flush of a --renumber copy.
KILLED_AT_SECOND_BATCH = r"""
import os, sys
from gc3session import cli
from gc3session.persistence.store import Store
from gc3session.session import Session

owner, name = {"import_records": (Store, "import_records"), "flush": (Session, "flush")}[sys.argv[1]]
real, calls = getattr(owner, name), []

def killed_at_the_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)
    return real(*args, **kwargs)

setattr(owner, name, killed_at_the_second)
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("renumber", [False, True], ids=["ids kept", "renumber"])
def test_a_copy_killed_half_way_is_refused_until_destroy_deletes_what_it_wrote(tmp_path: Path, renumber: bool) -> None:
    source = Session(tmp_path / "src")
    for i in range(1500):  # two batches; a tenth are collections, whose children the mark must list too
        source.add(TaskCollection(jobname=f"c{i}", tasks=[Task()]) if i % 10 == 0 else Task(jobname=f"t{i}"),
                   flush=False)
    source.close()
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # a store outside the copy, which destroy must clean
    command = ["copy", str(tmp_path / "src"), str(tmp_path / "dest"), "--store", url, *(["--renumber"] * renumber)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_SECOND_BATCH, "flush" if renumber else "import_records",
                             *command], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    first = 1100 if renumber else 1000  # the first batch: a renumbered one holds children, the other ids only
    assert len(make_store(url).list()) == first
    with pytest.raises(SessionError, match=rf"unfinished result of session-tool copy of {tmp_path / 'src'}"):
        Session(tmp_path / "dest")
    for refused in (run("ls", tmp_path / "dest"), run("verify", tmp_path / "dest")):
        assert refused.exit_code == 1 and "session-tool destroy" in refused.output and "Traceback" not in refused.output
    dry = run("destroy", tmp_path / "dest", "--dry-run")
    assert dry.exit_code == 0 and "would destroy the unfinished copy" in dry.output and f"{first} record(s)" in (
        dry.output)
    destroyed = run("destroy", tmp_path / "dest", "--yes")
    assert destroyed.exit_code == 0 and f"{first} record(s)" in destroyed.output, destroyed.output
    assert not (tmp_path / "dest").exists() and make_store(url).list() == []
    if not renumber:  # the numbers the killed copy took are never given again, even to the same records
        refused = run(*command)
        assert refused.exit_code == 1 and "handed out number 1 already" in refused.output and "--renumber" in (
            refused.output) and not (tmp_path / "dest").exists()
    again = run(*command[:5], "--renumber")
    assert again.exit_code == 0 and "copied 1500 task(s)" in again.output, again.output
    assert run("verify", tmp_path / "dest").exit_code == 0


def unfinished_session(path: Path, command: str, store_url: str | None = None, ids: tuple[str, ...] = ()) -> Any:
    """A session at ``path`` with the mark of ``command``, listing ``ids``; returned locked, as while it runs."""
    session = Session(path, store_or_url=store_url)
    session.close()
    mark = cli.Unfinished(str(path), command, "/old/source",
                          cli.store_identity(cli.resolve_store_url(str(path), session.store_url)))
    mark.wrote(list(ids))
    return mark


def test_an_import_killed_half_way_is_refused_and_destroy_removes_it(tmp_path: Path) -> None:
    """Unfinished too; its records stay in the store (a run again takes them as they are), and the directory goes."""
    unfinished_session(tmp_path / "dest", "import-gc3pie").release()
    with pytest.raises(SessionError, match=r"unfinished result of session-tool import-gc3pie of /old/source.*records "
                       r"stay in the store"):
        Session(tmp_path / "dest")
    destroyed = run("destroy", tmp_path / "dest", "--yes")
    assert destroyed.exit_code == 0 and "its records stay in the store" in destroyed.output
    assert not (tmp_path / "dest").exists()


def test_a_copy_running_is_neither_opened_nor_destroyed(tmp_path: Path) -> None:
    mark = unfinished_session(tmp_path / "dest", "copy", ids=("Task.1",))  # held, as by the copy running
    for call in (lambda: Session(tmp_path / "dest"), lambda: Session(tmp_path / "dest", load=False)):
        with pytest.raises(SessionError, match="being made by session-tool copy of /old/source right now"):
            call()
    destroyed = run("destroy", tmp_path / "dest", "--yes")
    assert destroyed.exit_code == 1 and "right now: wait for it to end" in destroyed.output
    mark.release()  # the copy was killed
    with pytest.raises(SessionError, match="unfinished result"):
        Session(tmp_path / "dest", load=False)  # starting it over would leave the mark, naming records elsewhere
    assert run("destroy", tmp_path / "dest", "--yes").exit_code == 0 and not (tmp_path / "dest").exists()


def test_destroying_an_unfinished_copy_refuses_a_store_url_changed_since(tmp_path: Path) -> None:
    """The ids listed are the copy's in the store it wrote to: in another store, they name other records."""
    url = f"sqlite:///{tmp_path / 'copy.db'}"
    unfinished_session(tmp_path / "dest", "copy", url, ids=("Task.1",)).release()
    other = Session(tmp_path / "other", store_or_url=f"sqlite:///{tmp_path / 'other.db'}")
    kept = other.add(Task(jobname="not the copy's"))
    other.close()
    (tmp_path / "dest" / "store.url").write_text(f"sqlite:///{tmp_path / 'other.db'}\n")
    refused = run("destroy", tmp_path / "dest", "--yes")
    assert refused.exit_code == 1 and "but the copy wrote to" in refused.output and "copy.db" in refused.output
    assert (tmp_path / "dest").exists() and Session(tmp_path / "other").list_ids() == [kept]


def test_destroying_an_unfinished_copy_refuses_a_variable_of_store_url_set_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB", "copy")
    unfinished_session(tmp_path / "dest", "copy", f"sqlite:///{tmp_path}/${{DB}}.db", ids=("Task.1",)).release()
    monkeypatch.setenv("DB", "other")
    refused = run("destroy", tmp_path / "dest", "--yes")
    assert refused.exit_code == 1 and "other.db, but the copy wrote to" in refused.output, refused.output
    monkeypatch.setenv("DB", "copy")
    assert run("destroy", tmp_path / "dest", "--yes").exit_code == 0 and not (tmp_path / "dest").exists()


def test_an_unfinished_copy_with_its_store_inside_is_destroyed_once_moved(tmp_path: Path) -> None:
    """The records go with the directory: where the directory is now does not matter."""
    unfinished_session(tmp_path / "dest", "copy", ids=("Task.1",)).release()
    (tmp_path / "dest").rename(tmp_path / "moved")
    (tmp_path / "link").symlink_to(tmp_path / "moved")
    destroyed = run("destroy", tmp_path / "link", "--yes")
    assert destroyed.exit_code == 0 and not (tmp_path / "moved").exists(), destroyed.output


def test_a_copy_that_cannot_make_its_mark_says_so_and_leaves_no_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Session(tmp_path / "src")
    source.add(Task())
    source.close()

    def full(fd: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(unfinished_module, "_write_all", full)
    failed = run("copy", tmp_path / "src", tmp_path / "dest")
    assert failed.exit_code == 1 and "unfinished: cannot write: No space left on device" in failed.output, (
        failed.output)
    assert "Traceback" not in failed.output and not (tmp_path / "dest").exists()


def test_a_file_named_unfinished_without_the_header_of_a_mark_is_no_mark(tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    task = session.add(Task())
    session.close()
    (tmp_path / "s" / "unfinished").write_text(f"jobs still running:\n{task}\n")
    assert Session(tmp_path / "s").list_ids() == [task]


def test_the_unfinished_mark_lists_the_ids_written_and_leaves_out_a_line_cut_short(tmp_path: Path) -> None:
    mark = cli.Unfinished(str(tmp_path), "copy", "/src", "sqlite:////x.db")
    mark.wrote(["Task.1", "Task.2"])
    mark.wrote([])
    with open(mark.path, "a") as f:
        f.write("Task.3")  # "Task.339" cut short by a kill: without its newline, it names another record
    header, ids = cli.read_unfinished(str(tmp_path))
    assert header["command"] == "copy" and header["source"] == "/src" and header["store"] == "sqlite:////x.db"
    assert ids == ["Task.1", "Task.2"]
    mark.done()
    assert cli.read_unfinished(str(tmp_path)) is None and not (tmp_path / "unfinished.lock").exists()


@pytest.mark.parametrize("answer", ["n\n", ""])  # no, and no answer at all (end of input, as Ctrl-D)
def test_destroy_not_confirmed_ends_its_run_record(tmp_path: Path, answer: str) -> None:
    Session(tmp_path / "s").close()
    result = run("destroy", tmp_path / "s", input=answer)
    assert result.exit_code == 1 and (tmp_path / "s" / "index.txt").exists()
    runs = json.loads((tmp_path / "s" / "session.json").read_text())["runs"]
    assert len(runs) == 2 and all(r["end"] is not None for r in runs)


def test_copy_draws_its_own_progress_bar_only(tmp_path: Path, monkeypatch: Any) -> None:
    # on a terminal the progress plugin loads in DEST's session too: two bars wrote over each other
    from gc3session import plugins as plugins_module
    from gc3session.progress import ProgressReporter

    Session(tmp_path / "src").add(Task(jobname="t"))
    reporters: list[ProgressReporter] = []

    def with_progress() -> list[tuple[str, Any]]:
        reporters.append(ProgressReporter(io.StringIO(), delay=0, interval=0))
        return [("progress", reporters[-1])]

    monkeypatch.setattr(plugins_module, "entry_point_plugins", with_progress)
    for extra in ([], ["--renumber"]):
        reporters.clear()
        dest = tmp_path / f"dest{len(extra)}"
        assert run("copy", tmp_path / "src", dest, *extra).exit_code == 0
        assert reporters and all(r.saved == 0 and not r.states for r in reporters)
    assert len(Session(tmp_path / "dest1", autoload_plugins=False)) == 1
