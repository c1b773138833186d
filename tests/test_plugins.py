"""Plugin hooks: what each hook reports, isolation of failing plugins, entry points, the progress reporter."""

from __future__ import annotations

import io
import logging
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pytest
from plugin_helpers import FailingPlugin, RecordingPlugin

from gc3session import InvalidArgument, SaveError, Session, State, Task, TaskCollection, TemporarySession
from gc3session import plugins as plugins_module
from gc3session import task as task_module
from gc3session.plugins import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, Hooks, hookimpl
from gc3session.progress import ProgressReporter, terminal_progress


def test_hooks_report_a_session_life_on_every_store(tmp_path: Any, store_url: str) -> None:
    plugin = RecordingPlugin()
    with Session(tmp_path / "s", store_or_url=store_url, plugins=[plugin], autoload_plugins=False) as session:
        task = Task("one")
        oid = session.add(task)
        task.state = State.RUNNING
        task.state = State.RUNNING  # no change, no call
        session.remove(oid)
    assert plugin.calls == [
        ("session_opened", "s"),
        ("task_saved", oid),
        ("task_added", oid),
        ("state_changed", oid, "NEW", "RUNNING"),
        ("task_removed", oid),
        ("session_closed", None),
    ]


def test_hooks_see_children_lazy_loads_forget_and_batches(tmp_path: Any) -> None:
    child = Task("child")
    parent = TaskCollection("parent", tasks=[child])
    with Session(tmp_path / "s", autoload_plugins=False) as session:
        pid = session.add(parent, flush=False)
        other = session.add(Task("other"), flush=False)
        session.flush()
    plugin = RecordingPlugin()
    session = Session(tmp_path / "s", lazy=True, plugins=[plugin], autoload_plugins=False)
    assert plugin.calls == [("session_opened", "s")]
    loaded = session.tasks[pid]
    loaded.tasks[0].state = "SUBMITTED"  # a child loaded through its parent is watched too
    loaded.state = "TERMINATED"
    session.save_all()
    session.forget(other)
    session.close()
    cid = loaded.tasks[0].persistent_id
    assert ("state_changed", cid, "NEW", "SUBMITTED") in plugin.calls
    assert ("state_changed", pid, "NEW", "TERMINATED") in plugin.calls
    assert sorted(plugin.named("task_saved")) == [("task_saved", cid), ("task_saved", pid)]
    assert plugin.named("task_removed") == [("task_removed", other)]
    assert plugin.calls[-1] == ("session_closed", None)


def test_task_added_fires_for_load_into_session_but_not_for_a_second_add(tmp_path: Any) -> None:
    store_url = str(tmp_path / "shared")  # outside both sessions: a store inside one is that session's alone
    with Session(tmp_path / "a", store_or_url=store_url, autoload_plugins=False) as first:
        oid = first.add(Task("shared"))
    plugin = RecordingPlugin()
    with Session(tmp_path / "b", store_or_url=store_url, plugins=[plugin], autoload_plugins=False) as second:
        task = second.load(oid)
        second.add(task)  # already there: no second task_added
        second.load(oid)
    assert plugin.named("task_added") == [("task_added", oid)]


def test_the_exception_that_ends_a_with_block_reaches_session_closed(tmp_path: Any) -> None:
    plugin = RecordingPlugin()
    with pytest.raises(KeyError), Session(tmp_path / "s", plugins=[plugin], autoload_plugins=False):
        raise KeyError("boom")
    assert plugin.calls[-1] == ("session_closed", "KeyError")


def test_session_closed_is_called_with_the_store_open_and_even_when_recording_the_run_fails(
    tmp_path: Any, monkeypatch: Any
) -> None:
    from gc3session import session as session_module

    seen: list[Any] = []

    class Reader:
        def session_closed(self, session: Any, error: Any) -> None:
            seen.append([t.jobname for t in session.store.load_many(session.list_ids()).values()])

    session = Session(tmp_path / "s", plugins=[Reader()], autoload_plugins=False)
    session.add(Task("t"))

    def failing_update(path: Any, run: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(session_module, "update_runs", failing_update)
    with pytest.raises(OSError, match="disk full"):
        session.close()
    assert seen == [["t"]] and not session.hooks.active


def test_a_closed_session_reports_nothing_more(tmp_path: Any) -> None:
    plugin = RecordingPlugin()
    session = Session(tmp_path / "s", plugins=[plugin], autoload_plugins=False)
    task = Task("t")
    session.add(task)
    session.close()
    count = len(plugin.calls)
    task.state = "TERMINATED"
    assert len(plugin.calls) == count


def test_a_failing_plugin_is_logged_and_neither_breaks_the_session_nor_other_plugins(
    tmp_path: Any, caplog: Any
) -> None:
    recorder = RecordingPlugin()
    caplog.set_level(logging.ERROR, logger="gc3session.plugins")
    with Session(tmp_path / "s", plugins=[FailingPlugin(), recorder], autoload_plugins=False) as session:
        oid = session.add(Task("kept"))
    assert ("task_added", oid) in recorder.calls
    assert recorder.calls[-1] == ("session_closed", None)
    failures = [r for r in caplog.records if "FailingPlugin" in r.getMessage()]
    assert {r.getMessage().split(" failed in ")[1].split(";")[0] for r in failures} == {
        "task_added",
        "task_saved",
        "session_closed",
    }
    assert all(r.exc_info and "plugin bug" in str(r.exc_info[1]) for r in failures)
    reopened = Session(tmp_path / "s", autoload_plugins=False)
    assert reopened.list_ids() == [oid]
    assert reopened.runs[0]["end"] is not None  # the run record was written despite the plugin


def test_a_plugin_whose_method_does_not_fit_its_hook_is_refused(tmp_path: Any) -> None:
    class Wrong:
        def task_added(self, session: Any, job: Any) -> None:
            pass

    with pytest.raises(InvalidArgument, match=r"Wrong.*task_added"):
        Session(tmp_path / "s", plugins=[Wrong()], autoload_plugins=False)


def test_hookimpl_options_order_the_calls() -> None:
    order: list[str] = []

    class Late:
        def task_removed(self, task_id: str) -> None:
            order.append("late")

    class Early:
        @hookimpl(tryfirst=True)
        def task_removed(self, task_id: str) -> None:
            order.append("early")

    hooks = Hooks([Early(), Late()], autoload=False)  # without tryfirst, the last registered would come first
    hooks.call("task_removed", session=None, task_id="Task.1")
    assert order == ["early", "late"]
    assert [type(p).__name__ for p in hooks.plugins] == ["Early", "Late"]


def test_hook_methods_with_optional_arguments_are_guarded_too(tmp_path: Any, caplog: Any) -> None:
    calls: list[str] = []

    class Optional:
        def task_added(self, task: Any, session: Any = None) -> None:
            calls.append(task.persistent_id)
            raise RuntimeError("optional plugin bug")

        def session_closed(self, session: Any, error: Any = None) -> None:
            raise RuntimeError("optional plugin bug")

    caplog.set_level(logging.ERROR, logger="gc3session.plugins")
    with Session(tmp_path / "s", plugins=[Optional()], autoload_plugins=False) as session:
        oid = session.add(Task("t"))
    assert calls == [oid]
    assert sum("optional plugin bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info) == 2


def test_unregistered_plugins_and_hooks_nobody_implements_cost_nothing(tmp_path: Any) -> None:
    plugin = RecordingPlugin()
    hooks = Hooks([plugin], autoload=False)
    assert hooks.wants("state_changed")
    hooks.unregister(plugin)
    assert not hooks.wants("state_changed")
    with Session(tmp_path / "s", autoload_plugins=False) as session:
        task = Task("unwatched")
        session.add(task)
        assert task.execution not in task_module._observers


def test_temporary_sessions_take_plugins(tmp_path: Any) -> None:
    with Session(tmp_path / "s", autoload_plugins=False) as session:
        oid = session.add(Task("t"))
    seen: list[int] = []

    class Opened(RecordingPlugin):
        def session_opened(self, session: Any) -> None:
            seen.append(len(session.tasks.loaded()))

    plugin = Opened()
    with TemporarySession(tmp_path / "s" / "jobs", plugins=[plugin], autoload_plugins=False) as temporary:
        temporary.tasks[oid].state = "RUNNING"
    assert seen == [1]  # told once, with its tasks loaded
    assert ("state_changed", oid, "NEW", "RUNNING") in plugin.calls


# -- entry points -----------------------------------------------------------------


@pytest.fixture
def fake_entry_points(monkeypatch: Any) -> Any:
    """Replace the installed ``gc3session.plugins`` entry points by the given ``name=module:attr`` specs."""

    def install(*specs: str) -> None:
        points = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in (s.split("=") for s in specs)]
        monkeypatch.setattr(plugins_module, "entry_points", lambda group: points if group == ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(plugins_module, "_entry_points", None)

    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    return install


def test_entry_point_plugins_are_made_per_session(tmp_path: Any, fake_entry_points: Any) -> None:
    fake_entry_points("rec=plugin_helpers:RecordingPlugin")
    first = Session(tmp_path / "a")
    second = Session(tmp_path / "b")
    (a,), (b,) = first.hooks.plugins, second.hooks.plugins
    assert isinstance(a, RecordingPlugin) and isinstance(b, RecordingPlugin) and a is not b
    oid = first.add(Task("t"))
    assert ("task_added", oid) in a.calls and b.named("task_added") == []
    first.close()
    second.close()


@pytest.mark.parametrize(
    ("setting", "env", "loaded"),
    [(None, None, True), (None, "1", False), (None, "0", True), (False, None, False), (True, "1", True)],
)
def test_autoloading_follows_the_setting_then_the_environment(
    tmp_path: Any, fake_entry_points: Any, monkeypatch: Any, setting: bool | None, env: str | None, loaded: bool
) -> None:
    fake_entry_points("rec=plugin_helpers:RecordingPlugin")
    if env is not None:
        monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, env)
    session = Session(tmp_path / "s", autoload_plugins=setting)
    assert [type(p).__name__ for p in session.hooks.plugins] == (["RecordingPlugin"] if loaded else [])
    session.close()


def test_broken_entry_points_are_logged_and_skipped(tmp_path: Any, fake_entry_points: Any, caplog: Any) -> None:
    fake_entry_points(
        "missing=plugin_helpers:NoSuchPlugin",
        "unimportable=no_such_module_gc3:Plugin",
        "declines=plugin_helpers:no_plugin",
        "fails=plugin_helpers:broken_factory",
        "good=plugin_helpers:RecordingPlugin",
    )
    caplog.set_level(logging.ERROR, logger="gc3session.plugins")
    with Session(tmp_path / "s") as session:
        assert [type(p).__name__ for p in session.hooks.plugins] == ["RecordingPlugin"]
        session.add(Task("t"))
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "missing" in messages and "unimportable" in messages and "fails" in messages
    assert "declines" not in messages


def test_the_progress_reporter_is_installed_as_an_entry_point() -> None:
    points = {p.name: p.value for p in entry_points(group=ENTRY_POINT_GROUP)}
    assert points.get("progress") == "gc3session.progress:terminal_progress"


def test_the_progress_reporter_appears_only_on_a_terminal(monkeypatch: Any) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert terminal_progress() is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(terminal_progress(), ProgressReporter)
    monkeypatch.setenv("TERM", "dumb")
    assert terminal_progress() is None


# -- the progress reporter ----------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_counts_per_state_and_ends_its_line(tmp_path: Any) -> None:
    out = Terminal()
    reporter = ProgressReporter(out, delay=0, interval=0)
    with Session(tmp_path / "s", plugins=[reporter], autoload_plugins=False) as session:
        tasks = [Task(f"t{i}") for i in range(10)]
        for task in tasks:
            session.add(task, flush=False)
        session.flush()
        for task in tasks[:4]:
            task.state = "TERMINATED"
        tasks[4].state = "RUNNING"
        session.save_all()
        session.remove(tasks[9].persistent_id)
        assert reporter.line() == "[########------------] 4/9 done | NEW 4 RUNNING 1 TERMINATED 4 | 15 saved"
    text = out.getvalue()
    assert text.endswith("\x1b[K\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("[########------------] 4/9 done | NEW 4 RUNNING 1 TERMINATED 4")


def test_progress_into_a_file_writes_whole_lines_without_control_characters(tmp_path: Any) -> None:
    with open(tmp_path / "progress.log", "w") as log:
        reporter = ProgressReporter(log, delay=0, interval=0)
        with Session(tmp_path / "s", plugins=[reporter], autoload_plugins=False) as session:
            for i in range(3):
                session.add(Task(f"t{i}"))
    lines = (tmp_path / "progress.log").read_text().splitlines(keepends=True)
    assert len(lines) > 3 and all(line.startswith("[") and line.endswith(" saved\n") for line in lines)
    assert "\r" not in "".join(lines) and "\x1b" not in "".join(lines)
    assert lines[-1] == "[--------------------] 0/3 done | NEW 3 | 3 saved\n"


def test_progress_counts_tasks_already_loaded_and_stays_quiet_for_short_bursts(tmp_path: Any) -> None:
    with Session(tmp_path / "s", autoload_plugins=False) as session:
        for i in range(3):
            session.add(Task(f"t{i}"), flush=False)
        session.flush()
    out = io.StringIO()
    reporter = ProgressReporter(out, delay=60)
    with Session(tmp_path / "s", plugins=[reporter], autoload_plugins=False) as session:
        assert reporter.counts["NEW"] == 3
        session.add(Task("more"))
    assert out.getvalue() == ""
    assert reporter.counts["NEW"] == 4


def test_a_hook_with_keyword_only_parameters_is_refused(tmp_path: Any) -> None:
    """Hooks pass plain parameters only: each call failed, logged and swallowed, and the plugin never worked."""

    class KeywordOnly:
        def task_added(self, *, session: Any, task: Any) -> None:
            pass

    with pytest.raises(InvalidArgument, match=r"task_added\(\) takes session, task as keyword-only parameters"):
        Session(tmp_path / "s", plugins=[KeywordOnly()], autoload_plugins=False)


@pytest.mark.parametrize("fail_once", [False, True])
def test_tasks_a_plugin_adds_without_flush_while_a_flush_saves_go_to_the_next_flush(
    tmp_path: Any, fail_once: bool
) -> None:
    """The flush that saved cleared its list of tasks to save, the plugin's new ones too, and indexed them:
    the index named tasks whose records were never written."""

    class Follower:
        def session_opened(self, session: Any) -> None:
            self.session = session

        def task_saved(self, obj: Any) -> None:
            if obj.jobname.startswith("t"):
                self.session.add(Task(f"follows-{obj.jobname}"), flush=False)

    session = Session(tmp_path / "s", plugins=[Follower()], autoload_plugins=False)
    if fail_once:  # the first write of the index fails (a full disk): the next flush writes all
        real = session._append_to_index

        def full_disk_once(ids: list[str]) -> None:
            session._append_to_index = real
            raise SaveError(str(tmp_path / "s" / "index.txt"), "disk full")

        session._append_to_index = full_disk_once
    for i in range(3):
        session.add(Task(f"t{i}"), flush=False)
    if fail_once:
        with pytest.raises(SaveError, match="disk full"):
            session.flush()
    session.flush()
    if not fail_once:  # (after a failure, the flush tried again saves the plugin's tasks too, and indexes all)
        on_disk = Session(tmp_path / "s", autoload_plugins=False)
        assert sorted(task.jobname for task in on_disk) == ["t0", "t1", "t2"] and not on_disk.load_errors
        on_disk.close(save=False)
        session.flush()
    again = Session(tmp_path / "s", autoload_plugins=False)
    assert sorted(task.jobname for task in again) == ["follows-t0", "follows-t1", "follows-t2", "t0", "t1", "t2"]
    assert not again.load_errors
