"""Session and TemporarySession: every public member, the directory layout, the error paths.

Tests that take ``store_url`` run once per kind of store.
"""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
import string
import tempfile
import threading
import time
from pathlib import Path

import helpers
import pytest
from click.testing import CliRunner
from helpers import NewTask, OldTask
from hypothesis import given, settings
from hypothesis import strategies as st

from gc3session import (
    InvalidArgument,
    LoadError,
    SaveError,
    Session,
    SessionError,
    State,
    StoreError,
    StoreNotFound,
    Task,
    TaskCollection,
    TemporarySession,
)
from gc3session import session as session_module
from gc3session.cli import main as cli_main
from gc3session.exceptions import LoadWarning, OrphanWarning, RepairWarning, TableNotFound
from gc3session.persistence import FilesystemStore, make_store
from gc3session.persistence import store as store_module
from gc3session.persistence.atomic import TEMP_PREFIX
from gc3session.persistence.idfactory import PLAIN_ID_LINES, is_id, parse_id
from gc3session.session import IdSet, iter_index, read_index


def index_lines(session_or_path) -> list[str]:
    path = session_or_path.path if isinstance(session_or_path, Session) else session_or_path
    return Path(path, Session.INDEX_FILENAME).read_text().splitlines()


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def session(tmp_path):
    """A new session with the default (filesystem) store."""
    return Session(tmp_path / "s")


@pytest.fixture
def any_session(tmp_path, store_url):
    """A new session over each kind of store in turn."""
    s = Session(tmp_path / "s", store_or_url=store_url)
    yield s
    s.store.close()


def reopen(session: Session, **kwargs) -> Session:
    return Session(session.path, **kwargs)


# -- constants, layout ------------------------------------------------------------


def test_public_constants():
    assert Session.INDEX_FILENAME == "index.txt"
    assert Session.STORE_URL_FILENAME == "store.url"
    assert Session.TIMESTAMP_FILES == {"start": "created", "end": "finished"}


def test_a_new_session_creates_its_directory_and_files(tmp_path):
    path = tmp_path / "runs" / "sweep1"
    session = Session(path)
    assert path.is_dir()
    assert (path / "index.txt").read_text() == ""
    assert (path / "store.url").read_text().strip() == "jobs"
    assert (path / "created").exists()
    assert not (path / "finished").exists()
    assert isinstance(session.store, FilesystemStore)
    assert session.store.directory == path / "jobs"
    assert session.store_url == "jobs"
    assert len(session) == 0
    assert session.tasks == {}
    assert session.load_errors == {}


def test_path_and_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = Session("relative/name")
    assert session.path == str(tmp_path / "relative" / "name")
    assert os.path.isabs(session.path)
    assert session.name == "name"


def test_store_url_file_is_private(session):
    assert mode_of(Path(session.path, "store.url")) == 0o600


def test_store_url_keeps_an_explicit_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = Session("s", store_or_url="elsewhere/store")
    expected = str(tmp_path / "elsewhere" / "store")
    assert Path(session.path, "store.url").read_text().strip() == expected
    assert session.store_url == expected
    assert session.store.directory == Path(expected)
    assert mode_of(Path(session.path, "store.url")) == 0o600


def test_store_url_of_a_relative_sqlite_url_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    session = Session("s", store_or_url="sqlite:///data/tasks.db")
    url = Path(session.path, "store.url").read_text().strip()
    assert url == f"sqlite:///{tmp_path}/data/tasks.db"
    session.store.close()


def test_store_url_loses_no_information(tmp_path, monkeypatch):
    """A password, a driver and a fragment survive in store.url, which is private."""
    monkeypatch.setattr(store_module, "_registry", dict(store_module._registry))
    store_module.register("gc3test", helpers.make_helper_store)
    url = f"gc3test+driver://user:s3cr%40t@localhost{tmp_path}/custom?opt=1#table=t1"
    session = Session(tmp_path / "s", store_or_url=url)
    oid = session.add(Task(jobname="x"))
    assert Path(session.path, "store.url").read_text() == url + "\n"
    assert mode_of(Path(session.path, "store.url")) == 0o600
    assert "s3cr" not in repr(session)
    again = reopen(session)
    assert again.store_url == url
    assert again.tasks[oid].jobname == "x"


def test_store_url_is_written_as_given(any_session, store_url):
    assert Path(any_session.path, "store.url").read_text() == store_url + "\n"
    assert any_session.store_url == store_url
    assert mode_of(Path(any_session.path, "store.url")) == 0o600


def test_store_url_of_a_store_object(tmp_path):
    store = FilesystemStore(tmp_path / "shared")
    session = Session(tmp_path / "s", store_or_url=store)
    assert session.store is store
    assert Path(session.path, "store.url").read_text().strip() == str(tmp_path / "shared")
    oid = session.add(Task())
    assert reopen(session).tasks[oid].persistent_id == oid


def test_default_store_is_relative_so_the_session_can_move(tmp_path):
    session = Session(tmp_path / "before")
    oid = session.add(TaskCollection(jobname="grid", tasks=[Task(jobname="c")]))
    os.rename(tmp_path / "before", tmp_path / "after")
    moved = Session(tmp_path / "after")
    assert moved.store.directory == tmp_path / "after" / "jobs"
    assert moved.tasks[oid].tasks[0].jobname == "c"


def test_store_url_variables_are_expanded_when_opening(tmp_path, monkeypatch):
    monkeypatch.setenv("GC3SESSION_TEST_BASE", str(tmp_path / "base"))
    session = Session(tmp_path / "s", store_or_url="${GC3SESSION_TEST_BASE}/store")
    oid = session.add(Task())
    assert (tmp_path / "base" / "store" / oid).is_file()
    assert Path(session.path, "store.url").read_text().strip() == "${GC3SESSION_TEST_BASE}/store"
    assert reopen(session).tasks[oid].persistent_id == oid


def test_sqlite_url_variables_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("GC3SESSION_TEST_BASE", str(tmp_path))
    session = Session(tmp_path / "s", store_or_url="sqlite:///${GC3SESSION_TEST_BASE}/tasks.db")
    oid = session.add(Task())
    session.store.close()
    assert (tmp_path / "tasks.db").is_file()
    assert Path(session.path, "store.url").read_text().strip() == "sqlite:///${GC3SESSION_TEST_BASE}/tasks.db"
    again = reopen(session)
    assert oid in again
    again.store.close()


# -- creating, opening ------------------------------------------------------------


def test_create_false_on_a_missing_directory_raises_invalid_argument(tmp_path):
    with pytest.raises(InvalidArgument) as excinfo:
        Session(tmp_path / "missing", create=False)
    assert "missing" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert not (tmp_path / "missing").exists()


def test_create_false_opens_an_existing_session(session):
    oid = session.add(Task())
    assert oid in Session(session.path, create=False)


def test_an_existing_directory_without_session_files_is_completed(tmp_path):
    path = tmp_path / "plain"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    session = Session(path)
    assert (path / "index.txt").exists()
    assert (path / "store.url").exists()
    assert (path / "created").exists()
    assert (path / "notes.txt").read_text() == "keep me"
    oid = session.add(Task())
    assert oid in reopen(session)


def test_a_file_where_the_directory_should_be_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SessionError) as excinfo:
        Session(tmp_path / "file")
    assert excinfo.value.path == str(tmp_path / "file")


def test_an_existing_session_is_loaded(any_session):
    a = any_session.add(Task(jobname="a", alpha=1))
    b = any_session.add(TaskCollection(jobname="b", tasks=[Task(jobname="b0")]))
    any_session.store.close()
    again = reopen(any_session)
    assert again.list_ids() == [a, b]
    assert again.tasks[a].alpha == 1
    assert again.tasks[b].tasks[0].jobname == "b0"
    assert again.store_url == any_session.store_url
    again.store.close()


def test_store_or_url_is_ignored_when_opening(tmp_path):
    session = Session(tmp_path / "s")
    oid = session.add(Task())
    again = Session(tmp_path / "s", store_or_url=str(tmp_path / "other"))
    assert again.store.directory == tmp_path / "s" / "jobs"
    assert oid in again
    assert not (tmp_path / "other").exists()


def test_load_false_starts_a_new_session(session):
    session.add(Task())
    session.set_end_timestamp()
    fresh = Session(session.path, load=False)
    assert len(fresh) == 0
    assert index_lines(fresh) == []
    assert fresh.finished == -1
    assert fresh.created > 0
    assert len(reopen(session)) == 0


def test_close_without_saving_records_the_end_and_writes_nothing_else(tmp_path):
    session = Session(tmp_path / "s")
    kept = session.add(Task(jobname="kept"))
    session.close()
    session = Session(tmp_path / "s")
    session.tasks[kept].jobname = "changed"
    session.add(Task(jobname="dropped"), flush=False)
    session.remove(kept, flush=False)
    session.close(save=False)
    assert session.runs[-1]["end"] is not None
    again = Session(tmp_path / "s")
    assert [(t.persistent_id, t.jobname) for t in again] == [(kept, "kept")]
    assert again.store.list() == [kept]
    again.store.close()


def test_close_without_saving_in_a_with_block_saves_nothing_at_its_end(tmp_path):
    kept = Session(tmp_path / "s").add(Task(jobname="kept"))
    with Session(tmp_path / "s") as session:
        session.tasks[kept].jobname = "unwanted"
        session.add(Task(jobname="unwanted too"), flush=False)
        session.close(save=False)
        end = session.runs[-1]["end"]
    session.close()  # closed already: nothing more, not even a new end time
    assert session.runs[-1]["end"] == end
    assert [t.jobname for t in Session(tmp_path / "s")] == ["kept"]


def test_a_failed_close_can_be_tried_again(tmp_path, monkeypatch):
    session = Session(tmp_path / "s")
    task = Task(jobname="saved at last")
    session.add(task, flush=False)
    monkeypatch.setattr(session.store, "save_many", lambda objs: (_ for _ in ()).throw(SaveError("x", "disk full")))
    with pytest.raises(SaveError):
        session.close()
    assert session.runs[-1]["error"]["message"].endswith("disk full")  # not recorded as a run that ended well
    monkeypatch.undo()
    session.close()
    assert session.runs[-1]["error"] is None
    assert [t.jobname for t in Session(tmp_path / "s")] == ["saved at last"]


@pytest.mark.parametrize("link", [False, True], ids=["path", "through a symbolic link"])
@pytest.mark.parametrize("where", ["jobs", "sub/records", "tasks.db"])
def test_a_new_session_refuses_a_store_inside_another_session(tmp_path, where, link):
    """That session's destroy() would delete the store, and the new session's tasks with it."""
    Session(tmp_path / "a").add(Task(jobname="a"))
    inside = tmp_path / "a" / where
    if link:  # a link outside the session, to the place inside it
        (tmp_path / "link").symlink_to(inside.parent if where != "jobs" else inside, target_is_directory=True)
        inside = tmp_path / "link" / (inside.name if where != "jobs" else "")
    url = f"sqlite:///{inside}" if where.endswith(".db") else str(inside)
    with pytest.raises(InvalidArgument, match=f"is inside session {tmp_path / 'a'}"):
        Session(tmp_path / "b", store_or_url=url)
    assert not (tmp_path / "b").exists() and sorted(os.listdir(tmp_path / "a" / "jobs"))[-1] == "Task.1"
    assert not (tmp_path / "a" / where.split("/")[0]).exists() or where == "jobs"


def test_a_new_session_refuses_a_store_that_is_another_session_directory(tmp_path):
    Session(tmp_path / "a").add(Task(jobname="a"))
    with pytest.raises(InvalidArgument, match=f"is inside session {tmp_path / 'a'}"):
        Session(tmp_path / "b", store_or_url=str(tmp_path / "a"))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("link", [False, True], ids=["path", "through a symbolic link"])
def test_a_new_session_inside_another_session_is_refused(tmp_path, link):
    """The outer session's destroy() would delete it, store and all."""
    Session(tmp_path / "a").add(Task(jobname="a"))
    parent = tmp_path / "a" / "runs"
    parent.mkdir()
    if link:
        (tmp_path / "link").symlink_to(parent, target_is_directory=True)
        parent = tmp_path / "link"
    with pytest.raises(InvalidArgument, match=f"is inside session {tmp_path / 'a'}"):
        Session(parent / "b")
    assert os.listdir(tmp_path / "a" / "runs") == []


def test_a_removal_pending_keeps_the_children_of_a_task_forgotten_meanwhile(tmp_path):
    shared, own, first, second = two_collections_sharing_a_child(tmp_path / "s")
    session = Session(tmp_path / "s")
    session.remove(first, flush=False)
    session.forget(second, flush=False)  # its record stays, and holds "shared"
    session.flush()
    assert shared.persistent_id in session.store.list() and own.persistent_id not in session.store.list()
    assert session.store.load(second).tasks[0].jobname == "shared"


@pytest.mark.parametrize("holder", ["in memory", "read through the store"])
def test_a_removal_asked_about_keeps_a_child_given_to_another_collection_before_the_flush(tmp_path, holder):
    """pending_deletions() is worked out again when a task holds other children since it was asked: a task in
    memory, or one not loaded, read through the store and saved by the session."""
    session = Session(tmp_path / "s")
    child = Task(jobname="moved")
    old, new = TaskCollection(tasks=[child]), TaskCollection(tasks=[])
    session.add(old)
    session.add(new)
    if holder != "in memory":
        session.close()
        session = Session(tmp_path / "s", lazy=True)
        new, child = session.store.load(new.persistent_id), session.store.load(child.persistent_id)
    session.remove(old.persistent_id, flush=False)
    assert child.persistent_id in session.pending_deletions()  # asked, as session-tool rm does
    new.tasks.append(child)
    session.save(new)  # the new holder's record names the child
    session.flush()
    assert Session(tmp_path / "s").store.load(new.persistent_id).tasks[0].jobname == "moved"


def test_iterating_a_session_while_another_thread_adds_is_safe(tmp_path):
    session = Session(tmp_path / "s")
    for i in range(200):
        session.add(Task(jobname=str(i)), flush=False)
    done = threading.Event()

    def adding():
        while not done.is_set():
            session.add(Task(), flush=False)

    worker = threading.Thread(target=adding)
    worker.start()
    try:
        for _ in range(200):
            assert len(list(session)) >= 200 and len(session.list_names()) >= 200
    finally:
        done.set()
        worker.join()


def test_a_lazy_load_that_waited_for_a_removal_does_not_bring_the_task_back(tmp_path):
    session = Session(tmp_path / "s")
    gone, kept = session.add(Task(jobname="gone")), session.add(Task(jobname="kept"))
    session.close()
    lazy = Session(tmp_path / "s", lazy=True)
    looked_up = []
    with lazy._mutex:  # the lookup starts, then waits while this thread removes the task
        reader = threading.Thread(target=lambda: looked_up.append(lazy.tasks.get(gone)))
        reader.start()
        time.sleep(0.2)
        lazy.remove(gone, flush=False)
    reader.join()
    lazy.flush()
    assert gone not in lazy and lazy.list_ids() == [kept] and index_lines(lazy) == [kept]


def test_a_change_made_while_its_task_is_being_saved_is_saved_next_time(tmp_path, monkeypatch):
    session = Session(tmp_path / "s")
    task = Task(jobname="t", meddler=helpers.Meddler())
    oid = session.add(task)
    task.jobname = "changed"
    # mid-pickling: whether the pickle has it or not depends on where the pickler was, but it is not lost
    monkeypatch.setattr(helpers.Meddler, "during", lambda: setattr(task, "jobname", "changed during the save"))
    session.save_all()
    assert task.changed  # the change came after the flag was cleared: it waits for the next save
    monkeypatch.setattr(helpers.Meddler, "during", None)
    session.close()
    assert Session(tmp_path / "s").tasks[oid].jobname == "changed during the save"


def test_a_failed_save_leaves_every_change_to_save(session):
    good, bad = Task(jobname="good"), Task(jobname="bad", lock=threading.Lock())
    with pytest.raises(SaveError):
        session.store.save_many([good, bad])
    assert good.changed and bad.changed


def test_save_all_saves_a_changed_task_held_in_an_attribute(tmp_path):
    session = Session(tmp_path / "s")
    oid = session.add(Task(jobname="main", prepare=Task(jobname="prep")))
    session.close()
    session = Session(tmp_path / "s")
    session.tasks[oid].prepare.state = "TERMINATED"  # the main task itself is unchanged
    session.close()
    assert Session(tmp_path / "s").tasks[oid].prepare.state == State.TERMINATED


def test_a_task_of_a_lazy_session_loaded_without_adding_is_saved_by_save_all(tmp_path):
    oid = Session(tmp_path / "s").add(Task(jobname="t"))
    lazy = Session(tmp_path / "s", lazy=True)
    task = lazy.load(oid, add=False)
    task.state = "TERMINATED"
    lazy.close()
    assert Session(tmp_path / "s").tasks[oid].state == State.TERMINATED


def test_task_ids_loads_only_those(session):
    ids = [session.add(Task(jobname=str(i))) for i in range(4)]
    partial = Session(session.path, task_ids=ids[1:3])
    assert partial.list_ids() == ids[1:3]
    partial.add(Task(jobname="new"))
    assert index_lines(partial)[:4] == ids, "tasks not loaded stay in the index"
    assert len(index_lines(partial)) == 5


@pytest.mark.parametrize("loss", ["backup restored", "database emptied"])
def test_new_tasks_never_take_the_ids_of_tasks_the_index_keeps_for_repair(tmp_path, loss):
    url = None if loss == "backup restored" else f"sqlite:///{tmp_path / 'tasks.db'}"
    session = Session(tmp_path / "s", store_or_url=url)
    first = [session.add(Task(jobname=f"old{i}")) for i in range(3)]
    session.close()
    if loss == "backup restored":
        shutil.copytree(tmp_path / "s" / "jobs", tmp_path / "backup")  # the counter file too
    session = Session(tmp_path / "s")
    later = [session.add(Task(jobname=f"old{i}")) for i in range(3, 5)]
    session.close()
    if loss == "backup restored":
        shutil.rmtree(tmp_path / "s" / "jobs")
        shutil.copytree(tmp_path / "backup", tmp_path / "s" / "jobs")
    else:
        os.truncate(tmp_path / "tasks.db", 0)
        with pytest.raises(StoreNotFound, match="no table 'store', while the index names 5 task"):
            Session(tmp_path / "s")  # said at once, and no table is made
        make_store(url).close()  # the records are lost: the user makes an empty table, on purpose
    with pytest.warns(LoadWarning):
        damaged = Session(tmp_path / "s")
    kept = set(later) if loss == "backup restored" else {*first, *later}
    assert set(damaged.load_errors) == kept
    saved = damaged.save(Task(jobname="saved, not added"))  # save() gives new ids too
    assert saved not in [*first, *later] and parse_id(saved)[1] > parse_id(later[-1])[1]
    new = damaged.add(Task(jobname="new"))
    assert new not in [*first, *later] and parse_id(new)[1] > parse_id(later[-1])[1]
    assert index_lines(damaged) == [*first, *later, new]
    damaged.close()


def test_task_ids_must_be_tasks_of_the_session(tmp_path):
    """Another session's task loaded as this one's would be deleted by this one's destroy()."""
    ours = Session(tmp_path / "ours", store_or_url=str(tmp_path / "shared"))
    ours.add(Task(jobname="ours"))
    ours.close()
    theirs = Session(tmp_path / "theirs", store_or_url=str(tmp_path / "shared"))
    precious = theirs.add(Task(jobname="theirs"))
    theirs.close()
    with pytest.raises(InvalidArgument, match=f"not in session {tmp_path / 'ours'}: {precious}"):
        Session(tmp_path / "ours", task_ids=[precious])
    with pytest.raises(InvalidArgument, match="a list of ids, not the string"):
        Session(tmp_path / "ours", task_ids=precious)
    assert index_lines(Session(tmp_path / "ours")) == ["Task.1"]
    assert [t.jobname for t in Session(tmp_path / "theirs")] == ["theirs"]


def test_forget_of_a_task_not_saved_yet_keeps_it_when_saving_fails(session, monkeypatch):
    oid = session.add(Task(jobname="keep me"), flush=False)
    monkeypatch.setattr(session.store, "save", lambda obj: (_ for _ in ()).throw(SaveError(oid, "disk full")))
    with pytest.raises(SaveError):
        session.forget(oid)
    monkeypatch.undo()
    assert oid in session.list_ids()
    session.forget(oid)  # the disk has room again
    assert oid not in session.list_ids() and session.store.load(oid).jobname == "keep me"


def test_extra_args_reach_the_store_when_opening(session, monkeypatch):
    oid = session.add(OldTask(jobname="moved"))
    monkeypatch.delattr(helpers, "OldTask")
    mapped = Session(session.path, class_map={"helpers.OldTask": "helpers.NewTask"})
    assert type(mapped.tasks[oid]) is NewTask
    assert mapped.load_errors == {}


def test_extra_args_reach_a_new_default_store(tmp_path):
    session = Session(tmp_path / "s", protocol=2)
    assert session.store.serializer.protocol == 2


@pytest.mark.parametrize("problem", ["missing", "empty", "blank-lines", "directory"])
def test_a_damaged_store_url_is_a_session_error_naming_the_file(session, problem):
    url_file = Path(session.path, "store.url")
    url_file.unlink()
    if problem == "empty":
        url_file.write_text("")
    elif problem == "blank-lines":
        url_file.write_text("\n  \n")
    elif problem == "directory":
        url_file.mkdir()
    with pytest.raises(SessionError) as excinfo:
        reopen(session)
    assert excinfo.value.path == str(url_file)
    assert "store.url" in str(excinfo.value)


@pytest.mark.parametrize("kind", ["default", "directory", "file-url", "sqlite"])
def test_a_session_whose_store_is_gone_does_not_open_and_makes_no_new_store(tmp_path, kind):
    """A store moved, deleted or on a disk not mounted: a new, empty one would give its ids to other tasks."""
    records = {"default": tmp_path / "s" / "jobs", "directory": tmp_path / "records",
               "file-url": tmp_path / "by-url", "sqlite": tmp_path / "tasks.db"}[kind]
    url = {"default": None, "directory": str(records), "file-url": f"file://{records}",
           "sqlite": f"sqlite:///{records}"}[kind]
    session = Session(tmp_path / "s", store_or_url=url)
    session.add(Task(jobname="kept"))
    session.close()
    moved = tmp_path / "moved"
    os.rename(records, moved)
    with pytest.raises(StoreNotFound) as excinfo:
        Session(tmp_path / "s")
    assert isinstance(excinfo.value, SessionError)
    assert excinfo.value.path == str(tmp_path / "s" / "store.url") and excinfo.value.store == str(records)
    assert str(records) in str(excinfo.value) and "does not exist" in str(excinfo.value)
    assert "load=False" in str(excinfo.value) and "load=False" not in excinfo.value.reason  # the hint: Python's
    assert not records.exists()
    os.rename(moved, records)  # the disk is back: nothing was lost or numbered twice
    assert [t.jobname for t in Session(tmp_path / "s")] == ["kept"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mysql"])
def test_a_session_whose_sql_table_is_missing_does_not_open_nor_make_it(tmp_path, store_url_of, kind):
    """A typo in store.url's table (or a table dropped): a new, empty table would hold none of the tasks the index
    names, a removal would report records deleted that were not, and new tasks would take their ids."""
    url = store_url_of(kind)
    session = Session(tmp_path / "s", store_or_url=url)
    session.add(Task(jobname="kept"))
    session.close()
    typo = url.replace("#table=", "#table=typo_") if "#table=" in url else url + "#table=typo_store"
    (tmp_path / "s" / "store.url").write_text(typo + "\n")
    store_url_of(kind, typo.rpartition("#table=")[2])  # dropped after the test, should the check fail to stop it
    with pytest.raises(StoreNotFound, match=r"no table 'typo_\w+', while the index names 1 task\(s\) \(a typo"):
        Session(tmp_path / "s")
    for command in (["rm", str(tmp_path / "s"), "Task.1"], ["destroy", str(tmp_path / "s"), "--yes"],
                    ["ls", str(tmp_path / "s")], ["verify", str(tmp_path / "s")]):
        result = CliRunner().invoke(cli_main, command, input="y\n")
        assert result.exit_code == 1 and "a typo in store.url" in result.output, (command, result.output)
    assert read_index(str(tmp_path / "s" / "index.txt")) == ["Task.1"]
    with pytest.raises(TableNotFound):
        make_store(typo, create=False)  # the typo's table was never made
    (tmp_path / "s" / "store.url").write_text(url + "\n")  # corrected
    assert [t.jobname for t in Session(tmp_path / "s")] == ["kept"]
    empty = Session(tmp_path / "e", store_or_url=typo)  # a session that names no tasks: a new table is right
    empty.close()
    assert len(Session(tmp_path / "e")) == 0


def test_a_session_whose_store_directory_is_an_empty_mount_point_does_not_open(tmp_path):
    session = Session(tmp_path / "s", store_or_url=str(tmp_path / "mnt"))
    session.add(Task(jobname="kept"))
    session.close()
    os.rename(tmp_path / "mnt", tmp_path / "disk")
    (tmp_path / "mnt").mkdir()  # the disk is not mounted: its mount point is there, empty
    with pytest.raises(StoreNotFound, match=r"mnt, an empty directory, while the index names 1 task"):
        Session(tmp_path / "s")
    assert os.listdir(tmp_path / "mnt") == []
    (tmp_path / "mnt").rmdir()
    os.rename(tmp_path / "disk", tmp_path / "mnt")
    assert [t.jobname for t in Session(tmp_path / "s")] == ["kept"]
    empty = Session(tmp_path / "e", store_or_url=str(tmp_path / "empty"))  # no tasks: an empty store is right
    empty.close()
    assert len(Session(tmp_path / "e")) == 0


def test_a_session_whose_store_is_gone_can_be_started_over(tmp_path):
    session = Session(tmp_path / "s", store_or_url=f"sqlite:///{tmp_path / 'tasks.db'}")
    session.add(Task())
    session.close()
    (tmp_path / "tasks.db").unlink()
    fresh = Session(tmp_path / "s", load=False)
    assert len(fresh) == 0 and fresh.store_url == "jobs"
    fresh.add(Task(jobname="new"))
    assert [t.jobname for t in Session(tmp_path / "s")] == ["new"]


def test_an_empty_session_path_or_store_url_is_refused_creating_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument, match="session path is empty"):
        Session("")
    with pytest.raises(InvalidArgument, match=r"store URL for session .*/s is empty"):
        Session(tmp_path / "s", store_or_url="  ")
    assert os.listdir(tmp_path) == []


def test_a_session_whose_store_cannot_be_opened_is_not_left_behind(tmp_path):
    with pytest.raises(StoreError):
        Session(tmp_path / "s", store_or_url="postgresql+psycopg://nobody@127.0.0.1:1/test")  # nothing listens
    assert not (tmp_path / "s").exists()
    (tmp_path / "mine").mkdir()  # a directory that was there before stays
    with pytest.raises(StoreError):
        Session(tmp_path / "mine", store_or_url="postgresql+psycopg://nobody@127.0.0.1:1/test")
    assert (tmp_path / "mine").is_dir()


def test_a_failed_create_keeps_what_another_process_made_there_meanwhile(tmp_path, monkeypatch):
    def another_process_meanwhile(url, **kwargs):
        (tmp_path / "s" / "theirs").write_text("a session being made by someone else")
        raise StoreError(str(url), "cannot connect")

    monkeypatch.setattr(session_module, "make_store", another_process_meanwhile)
    with pytest.raises(StoreError):
        Session(tmp_path / "s", store_or_url="postgresql://nobody@127.0.0.1:1/test")
    assert (tmp_path / "s" / "theirs").exists()


def test_a_session_made_by_another_process_while_this_one_made_it_is_opened_not_wiped(tmp_path, monkeypatch):
    theirs = Session(tmp_path / "s")
    kept = theirs.add(Task(jobname="theirs"))  # acknowledged: it is in the index
    real = Session._has_session_files
    looks = [False]  # this process looked before the other one made the session
    monkeypatch.setattr(Session, "_has_session_files", lambda self: looks.pop() if looks else real(self))
    mine = Session(tmp_path / "s")
    assert mine.list_ids() == [kept] and index_lines(mine) == [kept]
    assert mine.tasks[kept].jobname == "theirs"


def test_an_index_made_by_another_process_while_this_one_waited_for_the_lock_is_kept(tmp_path, monkeypatch):
    theirs = Session(tmp_path / "s")
    kept = theirs.add(Task(jobname="theirs"))
    theirs.close()
    index = tmp_path / "s" / "index.txt"
    content = index.read_bytes()
    index.unlink()  # this process looks while the other one has written store.url, and not yet the index
    real = Session._locked

    def first_to_the_lock_is_the_other_process(self):
        if not index.exists():
            index.write_bytes(content)
        return real(self)

    monkeypatch.setattr(Session, "_locked", first_to_the_lock_is_the_other_process)
    assert Session(tmp_path / "s").list_ids() == [kept]


def test_processes_making_one_new_session_at_once_lose_none_of_their_adds(tmp_path):
    path = str(tmp_path / "new")
    for trial in range(3):
        shutil.rmtree(path, ignore_errors=True)
        results = helpers.run_in_processes(helpers.create_and_add, [(path, 5)] * 4, str(tmp_path / f"gate{trial}"))
        assert sorted(index_lines(Session(path))) == sorted(oid for ids in results for oid in ids)


def test_a_missing_index_is_recreated(session):
    oid = session.add(Task())
    os.unlink(Path(session.path, "index.txt"))
    again = reopen(session)
    assert len(again) == 0
    assert index_lines(again) == []
    again.load(oid)
    assert index_lines(again) == [oid]


# -- the index ----------------------------------------------------------------------


def test_index_has_one_id_a_line(session):
    ids = [session.add(Task()) for _ in range(3)]
    assert Path(session.path, "index.txt").read_text() == "".join(f"{oid}\n" for oid in ids)


def test_index_blank_lines_and_duplicates_are_tolerated(session):
    a, b = session.add(Task(jobname="a")), session.add(Task(jobname="b"))
    Path(session.path, "index.txt").write_text(f"\n{a}\n\n  {b}  \n{a}\n\n{b}\n")
    again = reopen(session)
    assert again.list_ids() == [a, b]
    assert again.list_names() == ["a", "b"]


def test_index_with_a_torn_last_line_is_read_and_mended(session):
    a = session.add(Task())
    with open(Path(session.path, "index.txt"), "a") as f:
        f.write("Task.")  # a write cut short
    again = reopen(session)
    assert again.list_ids() == [a]
    b = again.add(Task())
    assert index_lines(again) == [a, b]


def test_a_last_line_cut_where_an_id_ends_is_ignored_with_a_warning(tmp_path):
    """A kill in the middle of an append can cut "Task.12" to "Task.1": another task, maybe another session's."""
    ours = Session(tmp_path / "ours", store_or_url=str(tmp_path / "shared"))
    first = ours.add(Task(jobname="ours"))
    theirs = Session(tmp_path / "theirs", store_or_url=str(tmp_path / "shared"))
    precious = theirs.add(Task(jobname="theirs"))
    with open(tmp_path / "ours" / "index.txt", "a") as index:
        index.write(precious)  # the append of an id that starts like theirs, cut short
    with pytest.warns(RepairWarning, match=f"'{precious}', has no newline: ignored"):
        again = Session(tmp_path / "ours")
    assert again.list_ids() == [first]
    second = again.add(Task(jobname="ours too"))  # the append cuts the torn line off first
    assert index_lines(again) == [first, second]
    again.destroy()
    assert [t.jobname for t in Session(tmp_path / "theirs")] == ["theirs"]


def test_index_with_a_line_that_is_not_an_id_is_a_session_error(session):
    session.add(Task())
    Path(session.path, "index.txt").write_text("Task.1\n../../etc/passwd\n")
    with pytest.raises(SessionError) as excinfo:
        reopen(session)
    assert excinfo.value.path.endswith("index.txt")


def test_index_that_is_a_directory_is_a_session_error(session):
    os.unlink(Path(session.path, "index.txt"))
    Path(session.path, "index.txt").mkdir()
    with pytest.raises(SessionError):
        reopen(session)


def test_adding_appends_to_the_index_without_rewriting_it(session):
    index = Path(session.path, "index.txt")
    first = session.add(Task())
    inode = index.stat().st_ino
    before = index.read_bytes()
    for _ in range(5):
        session.add(Task())
    after = index.read_bytes()
    assert index.stat().st_ino == inode, "add must append in place, not replace the file"
    assert after.startswith(before)
    assert len(after.splitlines()) == 6
    assert after.splitlines()[0].decode() == first


def test_session_writes_leave_no_temporary_files(session):
    ids = [session.add(Task()) for _ in range(5)]
    session.remove(ids[0])
    session.forget(ids[1])
    session.save_all()
    leftovers = [p for p in Path(session.path).rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == []


def test_concurrent_processes_adding_to_one_session_lose_nothing(tmp_path, store_url):
    path = tmp_path / "s"
    Session(path, store_or_url=store_url).store.close()
    results = helpers.run_in_processes(helpers.add_to_session, [(str(path), 50)] * 4, str(tmp_path / "gate"))
    ids = [oid for result in results for oid in result]
    assert len(set(ids)) == 200
    lines = index_lines(path)
    assert len(lines) == 200, "every add is in the index, once"
    assert sorted(lines) == sorted(ids)
    session = Session(path)  # any LoadWarning would fail the test (filterwarnings=error)
    assert len(session) == 200
    assert session.load_errors == {}
    assert sorted(session.list_names()) == sorted(f"w{w}-{i}" for w in range(4) for i in range(50))
    session.store.close()


# -- add, save, flush -------------------------------------------------------------------


def test_add_saves_and_returns_the_id(any_session, open_store):
    task = Task(jobname="fit-1", alpha=0.1)
    oid = any_session.add(task)
    assert oid == task.persistent_id
    assert any_session.tasks == {oid: task}
    assert index_lines(any_session) == [oid]
    assert task.changed is False
    assert open_store().load(oid).alpha == 0.1


def test_add_the_same_object_twice_gives_one_entry(any_session):
    task = Task()
    first = any_session.add(task)
    second = any_session.add(task)
    assert first == second
    assert len(any_session) == 1
    assert index_lines(any_session) == [first]


def test_add_the_same_object_twice_without_flush(any_session):
    task = Task()
    first = any_session.add(task, flush=False)
    second = any_session.add(task, flush=False)
    assert first == second
    any_session.flush()
    assert index_lines(any_session) == [first]


def test_add_again_after_a_change_saves_it(any_session, open_store):
    task = Task(jobname="v1")
    oid = any_session.add(task)
    task.jobname = "v2"
    assert any_session.add(task) == oid
    assert open_store().load(oid).jobname == "v2"
    assert index_lines(any_session) == [oid]


def test_add_without_flush_waits_for_flush(any_session, open_store):
    task = Task(jobname="later")
    oid = any_session.add(task, flush=False)
    assert oid == task.persistent_id
    assert oid in any_session
    assert index_lines(any_session) == []
    assert open_store().list() == []
    any_session.flush()
    assert index_lines(any_session) == [oid]
    assert open_store().load(oid).jobname == "later"


def test_add_a_task_already_in_the_store(any_session):
    task = Task()
    oid = any_session.save(task)
    assert any_session.add(task) == oid
    assert index_lines(any_session) == [oid]
    assert any_session.store.list() == [oid]


def test_add_a_collection_saves_its_children(any_session, open_store):
    children = [Task(jobname=f"p{i}") for i in range(3)]
    oid = any_session.add(TaskCollection(jobname="grid", tasks=children))
    assert index_lines(any_session) == [oid], "only the top-level task is in the index"
    assert any_session.list_ids() == [oid]
    other = open_store()
    assert sorted(other.list()) == sorted([oid] + [c.persistent_id for c in children])
    assert [c.jobname for c in other.load(oid).tasks] == ["p0", "p1", "p2"]


def test_save_stores_without_adding(any_session, open_store):
    task = Task(jobname="side")
    oid = any_session.save(task)
    assert oid == task.persistent_id
    assert oid not in any_session
    assert len(any_session) == 0
    assert index_lines(any_session) == []
    assert open_store().load(oid).jobname == "side"


def test_save_all_saves_only_changed_tasks(any_session, open_store):
    tasks = [Task(jobname=f"t{i}") for i in range(3)]
    child = Task(jobname="child")
    collection = TaskCollection(jobname="coll", tasks=[child])
    for task in [*tasks, collection]:
        any_session.add(task)
    store = any_session.store
    before = {t.persistent_id: store.metadata(t.persistent_id) for t in [*tasks, child, collection]}

    tasks[1].state = State.RUNNING
    child.state = State.TERMINATED
    saved = []
    real_save_many = store.save_many

    def counting_save_many(objs):
        objs = list(objs)
        saved.extend(objs)
        return real_save_many(objs)

    store.save_many = counting_save_many
    any_session.save_all()

    assert {id(o) for o in saved} == {id(tasks[1]), id(child)}
    after = {t.persistent_id: store.metadata(t.persistent_id) for t in [*tasks, child, collection]}
    for unchanged in (tasks[0], tasks[2], collection):
        assert after[unchanged.persistent_id]["modified"] == before[unchanged.persistent_id]["modified"]
    assert after[tasks[1].persistent_id]["state"] == "RUNNING"
    assert after[child.persistent_id]["state"] == "TERMINATED"
    assert not any(t.changed for t in any_session.iter_workflow())
    other = open_store()
    assert other.load(tasks[1].persistent_id).state is State.RUNNING


def test_save_all_also_writes_pending_adds(any_session):
    oid = any_session.add(Task(), flush=False)
    any_session.save_all()
    assert index_lines(any_session) == [oid]
    assert any_session.store.list() == [oid]


def test_save_all_without_flush_saves_but_leaves_the_index(any_session):
    task = Task()
    oid = any_session.add(task, flush=False)
    any_session.save_all(flush=False)
    assert any_session.store.list() == [oid]
    assert index_lines(any_session) == []
    any_session.flush()
    assert index_lines(any_session) == [oid]


def test_flush_with_nothing_pending_changes_nothing(session):
    session.add(Task())
    index = Path(session.path, "index.txt")
    before = (index.read_bytes(), index.stat().st_ino)
    session.flush()
    assert (index.read_bytes(), index.stat().st_ino) == before


def test_context_manager_saves_and_flushes(tmp_path, store_url):
    with Session(tmp_path / "s", store_or_url=store_url) as session:
        pending = session.add(Task(jobname="pending"), flush=False)
        task = Task(jobname="kept")
        kept = session.add(task)
        task.state = State.STOPPED
    again = Session(tmp_path / "s")
    assert again.list_ids() == [pending, kept]
    assert again.tasks[kept].state is State.STOPPED
    again.store.close()


def test_context_manager_returns_the_session(tmp_path):
    session = Session(tmp_path / "s")
    with session as entered:
        assert entered is session


# -- load ---------------------------------------------------------------------------


def test_load_adds_a_stored_task(any_session):
    task = Task(jobname="side")
    oid = any_session.save(task)
    del task
    loaded = any_session.load(oid)
    assert loaded.jobname == "side"
    assert any_session.tasks[oid] is loaded
    assert index_lines(any_session) == [oid]


def test_load_without_add(any_session):
    oid = any_session.save(Task())
    loaded = any_session.load(oid, add=False)
    assert loaded.persistent_id == oid
    assert oid not in any_session
    assert index_lines(any_session) == []


def test_load_without_flush(any_session):
    oid = any_session.save(Task())
    any_session.load(oid, flush=False)
    assert oid in any_session
    assert index_lines(any_session) == []
    any_session.flush()
    assert index_lines(any_session) == [oid]


def test_load_a_missing_task_raises_load_error(any_session):
    with pytest.raises(LoadError) as excinfo:
        any_session.load("Task.4040")
    assert excinfo.value.id == "Task.4040"
    assert len(any_session) == 0
    assert index_lines(any_session) == []


def test_load_many(any_session):
    ids = [any_session.save(Task(jobname=str(i))) for i in range(3)]
    loaded = any_session.load_many(ids)
    assert list(loaded) == ids
    assert [t.jobname for t in loaded.values()] == ["0", "1", "2"]
    assert any_session.list_ids() == ids
    assert index_lines(any_session) == ids
    with pytest.raises(LoadError):
        any_session.load_many([ids[0], "Task.5050"])


def test_load_of_a_task_already_in_the_session(any_session):
    task = Task()
    oid = any_session.add(task)
    assert any_session.load(oid) is task
    assert index_lines(any_session) == [oid]


# -- forget, remove -----------------------------------------------------------------


def test_forget_drops_from_the_session_but_keeps_in_the_store(any_session, open_store):
    a, b = any_session.add(Task(jobname="a")), any_session.add(Task(jobname="b"))
    any_session.forget(a)
    assert any_session.list_ids() == [b]
    assert index_lines(any_session) == [b]
    assert open_store().load(a).jobname == "a"
    assert reopen(any_session).list_ids() == [b]


def test_forget_without_flush(any_session):
    a = any_session.add(Task())
    any_session.forget(a, flush=False)
    assert a not in any_session
    assert index_lines(any_session) == [a]
    any_session.flush()
    assert index_lines(any_session) == []


def test_forget_a_task_added_without_flush_still_saves_it(any_session, open_store):
    oid = any_session.add(Task(jobname="unsaved"), flush=False)
    any_session.forget(oid)
    assert index_lines(any_session) == []
    assert open_store().load(oid).jobname == "unsaved"


def test_forget_or_remove_an_unknown_id_is_an_error(any_session):
    oid = any_session.save(Task())
    for method in (any_session.forget, any_session.remove):
        with pytest.raises(InvalidArgument):
            method(oid)
        with pytest.raises(InvalidArgument):
            method("../../etc/passwd")
    assert any_session.store.list() == [oid]


def test_remove_deletes_from_session_and_store(any_session, open_store):
    a, b = any_session.add(Task(jobname="a")), any_session.add(Task(jobname="b"))
    any_session.remove(a)
    assert any_session.list_ids() == [b]
    assert index_lines(any_session) == [b]
    other = open_store()
    assert other.list() == [b]
    with pytest.raises(LoadError):
        other.load(a)
    assert reopen(any_session).list_ids() == [b]


def test_remove_goes_recursively_through_children(any_session, open_store):
    leaf = Task(jobname="leaf")
    inner = TaskCollection(jobname="inner", tasks=[leaf, Task(jobname="leaf2")])
    outer = TaskCollection(jobname="outer", tasks=[inner, Task(jobname="sibling")])
    other_collection = TaskCollection(jobname="other", tasks=[Task(jobname="other-child")])
    doomed = any_session.add(outer)
    kept = any_session.add(other_collection)
    kept_task = any_session.add(Task(jobname="plain"))
    store = open_store()
    assert len(store.list()) == 8
    any_session.remove(doomed)
    remaining = store.list()
    assert sorted(remaining) == sorted([kept, other_collection.tasks[0].persistent_id, kept_task])
    assert any_session.list_ids() == [kept, kept_task]
    assert index_lines(any_session) == [kept, kept_task]


def test_remove_a_task_not_loaded_uses_the_stored_children(any_session, open_store):
    child = Task(jobname="c")
    doomed = any_session.add(TaskCollection(tasks=[child]))
    kept = any_session.add(Task())
    any_session.store.close()
    partial = Session(any_session.path, task_ids=[kept])
    assert doomed not in partial
    partial.remove(doomed)
    assert open_store().list() == [kept]
    assert index_lines(partial) == [kept]
    partial.store.close()


@pytest.mark.parametrize("lazy", [False, True])
def test_remove_keeps_the_children_that_another_task_still_holds(any_session, open_store, lazy):
    shared, own, listed = Task(jobname="shared"), Task(jobname="own"), Task(jobname="also top-level")
    first = any_session.add(TaskCollection(jobname="first", tasks=[shared, own, listed]))
    second = any_session.add(TaskCollection(jobname="second", tasks=[shared]))
    top = any_session.add(listed)
    any_session.store.close()
    session = Session(any_session.path, lazy=lazy)
    session.remove(first)
    assert sorted(open_store().list()) == sorted([second, shared.persistent_id, top])  # only "own" went
    session.store.close()
    again = Session(any_session.path)
    assert not again.load_errors
    assert [t.jobname for t in again.tasks[second].tasks] == ["shared"]
    assert again.tasks[top].jobname == "also top-level"
    again.store.close()


@pytest.mark.parametrize("lazy", [False, True])
def test_removing_a_top_level_task_that_a_collection_holds_keeps_its_record(any_session, open_store, lazy):
    child = Task(jobname="child")
    holder = any_session.add(TaskCollection(jobname="holder", tasks=[child, Task(jobname="other")]))
    top = any_session.add(child)  # the same task, top-level too
    any_session.store.close()
    session = Session(any_session.path, lazy=lazy)
    session.remove(top)
    assert session.list_ids() == [holder] and top in open_store().list()  # only its index line went
    session.store.close()
    again = Session(any_session.path)
    assert not again.load_errors
    assert [t.jobname for t in again.tasks[holder].tasks] == ["child", "other"]
    again.store.close()


@pytest.mark.parametrize("lazy", [False, True])
def test_removing_a_task_that_another_refers_to_keeps_its_record(any_session, open_store, lazy):
    """A reference in any attribute, not only a collection's children: deleting the record would leave the task
    that refers to it unable to load."""
    needed = Task(jobname="needed")
    user = Task(jobname="user")
    user.depends_on = needed
    target = any_session.add(needed)
    referrer = any_session.add(user)
    any_session.store.close()
    session = Session(any_session.path, lazy=lazy)
    assert session.pending_deletions() == []
    session.remove(target)
    assert session.list_ids() == [referrer] and target in open_store().list()  # only its index line went
    session.store.close()
    again = Session(any_session.path)
    assert not again.load_errors
    assert again.tasks[referrer].depends_on.jobname == "needed"
    again.remove(referrer)  # a record referred to is not held: it is not the referrer's to delete with it
    assert open_store().list() == [target]
    again.store.close()


@pytest.mark.parametrize("how", ["holds", "refers to"])
def test_a_removal_keeps_what_a_task_another_process_added_meanwhile_holds(any_session, how):
    """The other process appended its task to the index after this session read it: the flush that rewrites
    the index sees it, and what it holds or refers to keeps its record."""
    target = any_session.add(Task(jobname="shared"))
    any_session.store.close()
    driver = Session(any_session.path)  # a long-running session
    other = Session(any_session.path)  # another process, as far as the index goes
    kept = other.tasks[target]
    added = other.add(TaskCollection(jobname="c", tasks=[kept]) if how == "holds" else Task(depends_on=kept))
    other.close()
    driver.remove(target)
    driver.close()
    again = Session(any_session.path)
    assert again.list_ids() == [added] and not again.load_errors
    assert (again.tasks[added].tasks[0] if how == "holds" else again.tasks[added].depends_on).jobname == "shared"
    again.close()


@pytest.mark.parametrize("lazy", [False, True])
def test_save_all_saves_a_child_loaded_on_its_own(tmp_path, lazy):
    """load(id, add=False) of a child: in a lazy session its collection is not loaded, and did not lead to it."""
    session = Session(tmp_path / "s")
    collection = session.add(TaskCollection(jobname="c", tasks=[Task(jobname="x")]))
    child = session.tasks[collection].tasks[0].persistent_id
    session.close()
    with Session(tmp_path / "s", lazy=lazy) as session:
        session.load(child, add=False).state = State.RUNNING
    assert Session(tmp_path / "s").tasks[collection].tasks[0].state is State.RUNNING


def test_a_deletion_that_fails_warns_and_the_next_flush_tries_again(tmp_path, monkeypatch):
    """The task removed is out of the session and the adds that flush are done: a record that cannot be deleted
    is a warning, not an error (before, every later add raised, though each new task was saved and indexed, and a
    caller trying again made twins); the next flush deletes it once it can."""
    session = Session(tmp_path / "s")
    old = session.add(Task(jobname="old"))
    session.remove(old, flush=False)
    helpers.refuse_deleting(monkeypatch, old)
    with pytest.warns(OrphanWarning, match=f"{old}.*Permission denied.*out of the session.*tries again"):
        first = session.add(Task(jobname="first"))
    assert first in session.list_ids() and (tmp_path / "s" / "jobs" / old).exists()
    monkeypatch.undo()  # mended
    second = session.add(Task(jobname="second"))
    session.close()
    again = Session(tmp_path / "s")
    assert again.list_ids() == [first, second] and not (tmp_path / "s" / "jobs" / old).exists()


def test_a_deletion_tried_again_keeps_what_another_process_added_meanwhile_holds(tmp_path, monkeypatch):
    session = Session(tmp_path / "s")
    child = Task(jobname="child")
    doomed = session.add(TaskCollection(jobname="c", tasks=[child]))
    helpers.refuse_deleting(monkeypatch, doomed)
    with pytest.warns(OrphanWarning):
        session.remove(doomed)  # the child went, its collection's record could not
    assert (tmp_path / "s" / "jobs" / doomed).exists()
    monkeypatch.undo()
    other = Session(tmp_path / "s")  # another process
    adopted = other.load(doomed)  # takes the collection back, and the child it names
    other.close()
    session.flush()  # tries the deletion again
    session.close()
    again = Session(tmp_path / "s")
    assert again.list_ids() == [doomed] and not again.load_errors
    assert [t.jobname for t in again.tasks[adopted.persistent_id].tasks] == ["child"]


def test_a_deletion_tried_again_keeps_what_a_task_forgotten_before_the_failure_holds(tmp_path, monkeypatch):
    """forget() keeps the record, which still holds its children: the try after a failure knows it still."""
    _, own, first, second = two_collections_sharing_a_child(tmp_path / "s")
    session = Session(tmp_path / "s")
    session.remove(first, flush=False)
    session.forget(second, flush=False)
    helpers.refuse_deleting(monkeypatch, first)
    with pytest.warns(OrphanWarning, match=f"cannot delete the record {first}"):
        session.flush()
    monkeypatch.undo()
    session.add(Task(jobname="next"))  # its flush tries the deletion again
    session.close()
    assert session.store.load(second).tasks[0].jobname == "shared"
    assert not (tmp_path / "s" / "jobs" / first).exists() and not (tmp_path / "s" / "jobs" / own.persistent_id).exists()


def test_a_record_removed_is_not_written_again_by_save_all(tmp_path):
    """Loaded on its own (to show it, say) while its removal waited for the flush."""
    session = Session(tmp_path / "s")
    doomed = session.add(Task(jobname="doomed"))
    session.remove(doomed, flush=False)
    session.load(doomed, add=False)
    session.flush()
    session.close()
    assert session.store.list() == []


def test_a_child_loaded_on_its_own_is_still_saved_after_a_removal_that_keeps_it(tmp_path):
    session = Session(tmp_path / "s")
    shared = Task(jobname="shared")
    first = session.add(TaskCollection(jobname="first", tasks=[shared]))
    second = session.add(TaskCollection(jobname="second", tasks=[shared]))
    session.close()
    lazy = Session(tmp_path / "s", lazy=True)
    child = lazy.load(shared.persistent_id, add=False)
    lazy.remove(first)  # "second" still holds the child: it stays
    child.state = State.RUNNING
    lazy.close()
    assert Session(tmp_path / "s").tasks[second].tasks[0].state is State.RUNNING


def test_a_removal_asked_about_keeps_what_a_task_loaded_into_the_session_meanwhile_refers_to(tmp_path):
    session = Session(tmp_path / "s")
    target = session.add(Task(jobname="needed"))
    other = session.add(Task(jobname="other"))
    user = session.save(Task(jobname="user", depends_on=session.tasks[target]))  # in the store, not the session
    session.close()
    session = Session(tmp_path / "s")
    session.remove(target, flush=False)
    assert session.pending_deletions() == [target]  # asked, as session-tool rm does
    session.forget(other, flush=False)  # as many tasks as when it was asked
    session.load(user, flush=False)  # now a task of the session, which refers to the one removed
    session.flush()
    session.close()
    again = Session(tmp_path / "s")
    assert again.list_ids() == [user] and again.tasks[user].depends_on.jobname == "needed"


def test_a_removal_keeps_what_a_loaded_task_refers_to_after_the_cache_was_invalidated(any_session):
    """invalidate_cache() forgets what the loaded tasks' records refer to: the records themselves are read."""
    target = any_session.add(Task(jobname="needed"))
    user = any_session.add(Task(jobname="user", depends_on=any_session.tasks[target]))
    any_session.store.close()
    session = Session(any_session.path)
    session.store.invalidate_cache()
    session.remove(target)
    session.close()
    again = Session(any_session.path)
    assert not again.load_errors and again.tasks[user].depends_on.jobname == "needed"
    again.close()


def test_a_removal_asked_about_keeps_what_a_task_saved_through_the_store_meanwhile_refers_to(tmp_path):
    session = Session(tmp_path / "s")
    child = Task(jobname="child")
    doomed = session.add(TaskCollection(jobname="c", tasks=[child]))
    user = session.add(Task(jobname="user"))
    session.remove(doomed, flush=False)
    assert child.persistent_id in session.pending_deletions()  # asked, as session-tool rm does
    session.tasks[user].depends_on = child
    session.store.save(session.tasks[user])  # straight through the store, not the session
    session.flush()
    session.close()
    again = Session(tmp_path / "s")
    assert not again.load_errors and again.tasks[user].depends_on.jobname == "child"


def test_a_removal_asked_about_keeps_a_task_that_a_task_added_without_flush_refers_to(tmp_path):
    """The flush saves the new task before it deletes: the answer worked out before then is worked out again."""
    session = Session(tmp_path / "s")
    target = session.add(Task(jobname="needed"))
    user = session.add(Task(jobname="user", depends_on=session.tasks[target]), flush=False)
    session.remove(target, flush=False)
    session.pending_deletions()  # asked before the flush, as session-tool rm does
    session.flush()
    session.close()
    again = Session(tmp_path / "s")
    assert not again.load_errors and again.tasks[user].depends_on.jobname == "needed"


def test_a_removal_keeps_a_child_that_the_saved_record_of_its_holder_still_names(tmp_path):
    """The holder in memory let go of the child, but its record was not saved yet: if the process dies before
    it is, the record still names the child, which must still be there."""
    session = Session(tmp_path / "s")
    child = Task(jobname="child")
    holder = session.add(TaskCollection(jobname="holder", tasks=[child, Task(jobname="other")]))
    top = session.add(child)  # the same task, top-level too
    session.tasks[holder].tasks.remove(child)
    session.remove(top)
    session.close(save=False)  # as if the process died here: the holder's change is not saved
    again = Session(tmp_path / "s")
    assert not again.load_errors
    assert [t.jobname for t in again.tasks[holder].tasks] == ["child", "other"]


def two_collections_sharing_a_child(path: Path) -> tuple[Task, Task, str, str]:
    """A closed session at ``path``: "first" holds "shared" and "own", "second" holds "shared"."""
    shared, own = Task(jobname="shared"), Task(jobname="own")
    session = Session(path)
    first = session.add(TaskCollection(jobname="first", tasks=[shared, own]))
    second = session.add(TaskCollection(jobname="second", tasks=[shared]))
    session.close()
    return shared, own, first, second


def test_remove_keeps_children_that_an_unreadable_task_may_hold(tmp_path):
    shared, own, first, second = two_collections_sharing_a_child(tmp_path / "s")
    record = tmp_path / "s" / "jobs" / second
    saved = record.read_bytes()
    record.write_bytes(b"damaged")  # for now: a disk error, a bad edit
    with pytest.warns(LoadWarning):
        damaged = Session(tmp_path / "s")
    with pytest.warns(LoadWarning, match=rf"{second} cannot be read.*2 record\(s\) of those are kept"):
        damaged.remove(first)
    damaged.close()
    records = tmp_path / "s" / "jobs"
    assert not (records / first).exists()
    assert (records / shared.persistent_id).exists() and (records / own.persistent_id).exists()
    record.write_bytes(saved)  # repaired: "second" holds "shared" again
    again = Session(tmp_path / "s")
    assert not again.load_errors and [t.jobname for t in again.tasks[second].tasks] == ["shared"]


def test_remove_decides_what_is_still_held_from_the_metadata_not_the_listing_line(tmp_path):
    shared, own, first, second = two_collections_sharing_a_child(tmp_path / "s")
    # the listing line of "second" left behind by a hand edit: it says no children, its metadata says "shared"
    record = tmp_path / "s" / "jobs" / second
    listing, rest = record.read_bytes().split(b"\n", 1)
    record.write_bytes(listing.replace(f'["{shared.persistent_id}"]'.encode(), b"[]") + b"\n" + rest)
    lazy = Session(tmp_path / "s", lazy=True)
    assert dict(lazy.store.iter_summaries([second]))[second]["children"] == []
    lazy.remove(first)
    lazy.close()
    again = Session(tmp_path / "s")
    assert not again.load_errors
    assert [t.jobname for t in again.tasks[second].tasks] == ["shared"]
    assert not (tmp_path / "s" / "jobs" / own.persistent_id).exists()
    again.close()


def test_remove_without_flush_waits_for_flush(any_session, open_store):
    child = Task()
    doomed = any_session.add(TaskCollection(tasks=[child]))
    kept = any_session.add(Task())
    any_session.remove(doomed, flush=False)
    assert doomed not in any_session
    assert index_lines(any_session) == [doomed, kept]
    assert len(open_store().list()) == 3
    any_session.flush()
    assert index_lines(any_session) == [kept]
    assert open_store().list() == [kept]


def test_remove_a_task_added_without_flush(any_session, open_store):
    oid = any_session.add(Task(), flush=False)
    any_session.remove(oid)
    assert len(any_session) == 0
    assert index_lines(any_session) == []
    assert open_store().list() == []


def test_remove_then_add_back(any_session):
    task = Task()
    oid = any_session.add(task)
    any_session.forget(oid, flush=False)
    assert any_session.add(task) == oid
    assert index_lines(any_session) == [oid]


def test_remove_keeps_what_another_process_appended(any_session):
    a = any_session.add(Task())
    other = reopen(any_session)
    b = other.add(Task())
    any_session.remove(a)
    assert index_lines(any_session) == [b]
    other.store.close()


# -- destroy --------------------------------------------------------------------------


def test_destroy_removes_the_directory_and_its_store(session):
    session.add(TaskCollection(tasks=[Task()]))
    session.destroy()
    assert not os.path.exists(session.path)
    assert len(session) == 0


@pytest.mark.parametrize("after", [
    lambda s, _: s.add(Task()), lambda s, _: s.add(Task(), flush=False), lambda s, _: s.save(Task()),
    lambda s, _: s.save_all(), lambda s, _: s.flush(), lambda s, _: s.remove("Task.1"),
    lambda s, _: s.forget("Task.1"), lambda s, other: s.load(other), lambda s, _: s.set_start_timestamp(),
    lambda s, _: s.set_end_timestamp(),
])
def test_a_destroyed_session_writes_nothing_more(any_session, open_store, after):
    """Writing would make the directory again, without its store URL, and the store would take records for it."""
    any_session.add(Task())
    any_session.destroy()
    other = open_store().save(Task(jobname="another session's"))
    with pytest.raises(SessionError, match="was destroyed"):
        after(any_session, other)
    any_session.close()  # closing still works, and saves nothing
    assert not os.path.lexists(any_session.path)
    store = open_store()
    assert [meta["jobname"] for _, meta in store.iter_metadata(store.list())] == ["another session's"]


def test_a_destroy_that_failed_can_be_tried_again_from_where_it_stopped(tmp_path, monkeypatch):
    session = Session(tmp_path / "s")
    session.add(Task())
    real, calls = shutil.rmtree, []

    def busy_the_second_time(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the records went; the session directory is busy
            raise OSError(16, "Device or resource busy", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", busy_the_second_time)
    with pytest.raises(SaveError, match="Device or resource busy"):
        session.destroy()
    assert not (tmp_path / "s" / "jobs").exists() and (tmp_path / "s").exists()
    session.destroy()
    assert not (tmp_path / "s").exists()


def test_a_destroy_that_deleted_nothing_leaves_the_session_whole_and_writable(tmp_path, monkeypatch):
    """A shared store that is down: nothing was deleted, so closing still saves what was pending."""
    session = Session(tmp_path / "s", store_or_url=f"sqlite:///{tmp_path}/shared.db")
    task = Task(jobname="t")
    session.add(task)
    task.state = State.RUNNING
    session.add(Task(jobname="pending"), flush=False)

    def down(ids):
        raise StoreError("sqlite:///shared.db", "database is down")

    monkeypatch.setattr(session.store, "remove_many", down)
    with pytest.raises(StoreError, match="down"):
        session.destroy()
    monkeypatch.undo()
    session.close()
    assert sorted((t.jobname, t.state) for t in Session(tmp_path / "s")) == [
        ("pending", State.NEW), ("t", State.RUNNING)]


def test_a_session_destroyed_in_a_with_block_closes_quietly(tmp_path):
    with Session(tmp_path / "s") as session:
        session.add(Task())
        session.destroy()
    assert not (tmp_path / "s").exists() and session.runs == []


def test_destroy_through_a_symbolic_link_removes_the_session_and_the_link(tmp_path, store_url, open_store):
    real = Session(tmp_path / "real", store_or_url=store_url)
    real.add(Task())
    real.close()
    os.symlink(tmp_path / "real", tmp_path / "link")
    Session(tmp_path / "link").destroy()
    assert not (tmp_path / "real").exists() and not os.path.lexists(tmp_path / "link")
    assert open_store().list() == []


def test_destroy_that_cannot_remove_the_records_keeps_the_index_and_says_where(session, monkeypatch):
    ids = [session.add(Task()) for _ in range(2)]
    real_rmtree = shutil.rmtree

    def refuse_records(path, *args, **kwargs):
        if str(path).endswith("jobs"):
            raise PermissionError(13, "Permission denied", os.path.join(path, ids[0]))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuse_records)
    with pytest.raises(SaveError, match="cannot remove: Permission denied") as info:
        session.destroy()
    assert info.value.target.endswith(ids[0])
    assert Session(session.path).list_ids() == ids  # nothing hidden: the index still names them


def test_destroy_of_a_session_that_is_its_own_store_directory(tmp_path):
    session = Session(tmp_path / "s", store_or_url=str(tmp_path / "s"))
    session.add(Task())
    session.destroy()
    assert not (tmp_path / "s").exists()


def test_removing_a_task_named_that_a_collection_holds_keeps_it_and_its_children(tmp_path):
    session = Session(tmp_path / "s")
    child = Task(jobname="its child")
    named = TaskCollection(jobname="named", tasks=[child])
    holder = session.add(TaskCollection(jobname="holder", tasks=[named]))
    session.add(named)  # also top-level
    session.remove(named.persistent_id)  # only its index line goes: "holder" still holds it, and through it the child
    assert sorted(session.store.list()) == sorted([holder, named.persistent_id, child.persistent_id])
    session.close()
    again = Session(tmp_path / "s")
    assert again.list_ids() == [holder] and not again.load_errors
    assert [t.jobname for t in again.tasks[holder].tasks[0].tasks] == ["its child"]


def test_removing_a_task_named_leaves_no_orphan_of_its_own_children(tmp_path):
    session = Session(tmp_path / "s")
    child, shared = Task(jobname="its child"), Task(jobname="shared")
    named = session.add(TaskCollection(jobname="named", tasks=[child, shared]))
    other = session.add(TaskCollection(jobname="other", tasks=[shared]))
    session.remove(named)  # named goes, and what only it holds goes with it
    assert sorted(session.store.list()) == sorted([other, shared.persistent_id])


def test_destroy_of_sessions_sharing_a_store(tmp_path, store_url, open_store):
    first = Session(tmp_path / "first", store_or_url=store_url)
    second = Session(tmp_path / "second", store_or_url=store_url)
    first_child = Task(jobname="first-child")
    first.add(TaskCollection(jobname="first", tasks=[first_child]))
    first.add(Task(jobname="first-plain"))
    second_child = Task(jobname="second-child")
    second_ids = [second.add(TaskCollection(jobname="second", tasks=[second_child])), second.add(Task())]
    first.destroy()
    assert not os.path.exists(first.path)
    store = open_store()
    assert sorted(store.list()) == sorted([*second_ids, second_child.persistent_id])
    again = Session(second.path)
    assert again.list_ids() == second_ids
    assert again.tasks[second_ids[0]].tasks[0].jobname == "second-child"
    again.store.close()
    second.store.close()


@pytest.mark.parametrize("after", [
    lambda s, _: s.add(Task()), lambda s, _: (s.add(Task(), flush=False), s.flush()), lambda s, _: s.save(Task()),
    lambda s, first: (setattr(s.tasks[first], "jobname", "changed"), s.save_all()),
    lambda s, first: (setattr(s.tasks[first], "jobname", "changed"), s.add(s.tasks[first])),
    lambda s, _: s.forget(s.add(Task(), flush=False)),
])
def test_a_session_another_process_destroyed_is_not_made_again(tmp_path, store_url, open_store, after):
    """Taking the session's lock makes a missing directory again: the write would have brought the session back
    without its store URL (so that it does not open), and put a record in the store that nobody lists."""
    mine = Session(tmp_path / "s", store_or_url=store_url)
    first = mine.add(Task())
    Session(tmp_path / "s").destroy()  # as another process would
    with pytest.raises(SessionError, match=f"{tmp_path / 's'}: is gone .*destroyed by another process"):
        after(mine, first)
    mine.close(save=False)  # what is pending cannot be saved: close() would say so again
    assert not os.path.lexists(tmp_path / "s")
    assert open_store().list() == []


def test_a_session_with_its_store_inside_destroyed_by_another_process_is_not_made_again(tmp_path):
    mine = Session(tmp_path / "s")
    mine.add(Task())
    Session(tmp_path / "s").destroy()  # as another process would
    with pytest.raises((SaveError, SessionError), match="is gone"):  # the id counter needs its directory
        for _ in range(100):
            mine.add(Task(), flush=False)
        mine.flush()
    mine.close()
    assert not os.path.lexists(tmp_path / "s")


def test_destroy_deletes_the_tasks_other_processes_appended_meanwhile(tmp_path, store_url, open_store):
    mine = Session(tmp_path / "s", store_or_url=store_url)
    mine.add(Task())
    forgotten = mine.add(Task())
    other = Session(tmp_path / "s")  # as another process would
    other.add(TaskCollection(tasks=[Task()]))
    mine.forget(forgotten, flush=False)  # still in the index file: not one that another process appended
    mine.destroy()
    assert open_store().list() == [forgotten]
    with pytest.raises(SessionError, match="is gone"):
        other.add(Task())
    other.close()
    assert not os.path.lexists(tmp_path / "s")


def test_destroy_removes_tasks_not_loaded_too(tmp_path, store_url, open_store):
    session = Session(tmp_path / "s", store_or_url=store_url)
    child = Task()
    a = session.add(TaskCollection(tasks=[child]))
    b = session.add(Task())
    session.store.close()
    partial = Session(tmp_path / "s", task_ids=[b])
    assert a not in partial
    partial.destroy()
    assert open_store().list() == []


# -- reading ----------------------------------------------------------------------------


def test_list_ids_and_list_names(session):
    ids = [session.add(Task(jobname=name)) for name in ("x", "y", "z")]
    session.add(TaskCollection(jobname="grid", tasks=[Task(jobname="child")]))
    assert session.list_ids()[:3] == ids
    assert len(session.list_ids()) == 4
    assert session.list_names() == ["x", "y", "z", "grid"]


def test_len_iteration_and_membership(session):
    tasks = [Task(jobname=str(i)) for i in range(3)]
    collection = TaskCollection(tasks=[Task()])
    for task in [*tasks, collection]:
        session.add(task)
    assert len(session) == 4
    assert list(session) == [*tasks, collection], "iteration is over the top-level tasks"
    assert tasks[0].persistent_id in session
    assert collection.tasks[0].persistent_id not in session
    # iterating while removing is safe
    for task in session:
        session.forget(task.persistent_id, flush=False)
    assert len(session) == 0


def test_iter_workflow_is_breadth_first(session):
    b, c = Task(jobname="b"), Task(jobname="c")
    inner = TaskCollection(jobname="inner", tasks=[b, c])
    a, d = Task(jobname="a"), Task(jobname="d")
    outer = TaskCollection(jobname="outer", tasks=[a, inner, d])
    e = Task(jobname="e")
    session.add(outer)
    session.add(e)
    assert [t.jobname for t in session.iter_workflow()] == ["outer", "e", "a", "inner", "d", "b", "c"]


def test_iter_workflow_visits_a_shared_task_once(session):
    shared = Task(jobname="shared")
    session.add(TaskCollection(jobname="one", tasks=[shared]))
    session.add(TaskCollection(jobname="two", tasks=[shared]))
    assert [t.jobname for t in session.iter_workflow()] == ["one", "two", "shared"]


def test_iter_workflow_after_reopening(session):
    session.add(TaskCollection(jobname="top", tasks=[TaskCollection(jobname="mid", tasks=[Task(jobname="leaf")])]))
    again = reopen(session)
    assert [t.jobname for t in again.iter_workflow()] == ["top", "mid", "leaf"]


def test_repr_names_the_session(session):
    session.add(Task())
    text = repr(session)
    assert session.path in text
    assert "1 tasks" in text


# -- timestamps ------------------------------------------------------------------------


def test_timestamps(session):
    created = Path(session.path, "created")
    assert session.created == created.stat().st_mtime > 0
    assert session.finished == -1
    session.set_end_timestamp(1_700_000_000)
    assert session.finished == 1_700_000_000
    assert Path(session.path, "finished").exists()
    session.set_start_timestamp(1_600_000_000.5)
    assert session.created == 1_600_000_000.5
    again = reopen(session)
    assert again.created == 1_600_000_000.5
    assert again.finished == 1_700_000_000


def test_timestamp_default_is_now(session):
    session.set_start_timestamp(1)
    session.set_end_timestamp(1)
    session.set_start_timestamp()
    session.set_end_timestamp()
    assert session.created > 1_000_000
    assert session.finished > 1_000_000


def test_missing_timestamp_files_give_minus_one(session):
    os.unlink(Path(session.path, "created"))
    assert session.created == -1
    assert reopen(session).created == -1


# -- tasks that fail to load ------------------------------------------------------------


def test_a_task_that_fails_to_load_is_reported_and_kept(tmp_path, store_url, monkeypatch):
    session = Session(tmp_path / "s", store_or_url=store_url)
    broken = session.add(OldTask(jobname="broken"))
    good = session.add(Task(jobname="good"))
    doomed = session.add(Task(jobname="doomed"))
    session.store.close()
    monkeypatch.delattr(helpers, "OldTask")

    with pytest.warns(LoadWarning, match=broken):
        again = Session(tmp_path / "s")
    assert again.list_ids() == [good, doomed]
    assert list(again.load_errors) == [broken]
    assert isinstance(again.load_errors[broken], LoadError)
    assert again.load_errors[broken].id == broken

    added = again.add(Task(jobname="new"))  # appends
    assert broken in index_lines(again)
    again.remove(doomed)  # rewrites the index
    again.save_all()
    again.flush()
    assert index_lines(again) == [broken, good, added]
    again.store.close()

    with pytest.warns(LoadWarning):
        third = Session(tmp_path / "s")
    assert list(third.load_errors) == [broken]
    third.store.close()


def test_a_corrupt_record_is_reported_and_kept(session):
    broken = session.add(Task(jobname="broken"))
    good = session.add(Task(jobname="good"))
    Path(session.store.directory, broken).write_bytes(b"\x00garbage")
    with pytest.warns(LoadWarning) as record:
        again = reopen(session)
    assert broken in str(record[0].message)
    assert list(again) == [again.tasks[good]]
    assert again.load_errors[broken].id == broken
    again.add(Task())
    again.forget(good)
    assert index_lines(again)[0] == broken


@pytest.mark.parametrize("how", ["remove", "forget"])
def test_a_remove_or_forget_whose_flush_fails_can_be_called_again(tmp_path, monkeypatch, how):
    session = Session(tmp_path / "s")
    keep, victim = session.add(Task(jobname="keep")), session.add(Task(jobname="victim"))
    real_replace = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith("index.txt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SaveError, match="No space left on device"):
        getattr(session, how)(victim)
    assert victim in read_index(str(tmp_path / "s" / "index.txt"))  # pending: the index still names it
    monkeypatch.undo()
    getattr(session, how)(victim)  # was: InvalidArgument "not in session"
    assert read_index(str(tmp_path / "s" / "index.txt")) == [keep]
    assert (tmp_path / "s" / "jobs" / victim).exists() == (how == "forget")


def test_a_remove_whose_flush_fails_after_the_index_is_written_can_be_called_again(tmp_path, monkeypatch):
    # a lost server while the deletions are worked out: the index is rewritten, the records not deleted yet
    session = Session(tmp_path / "s")
    keep, victim = session.add(Task(jobname="keep")), session.add(Task(jobname="victim"))
    real = session.pending_deletions

    def lost_once():
        monkeypatch.setattr(session, "pending_deletions", real)
        raise StoreError("sqlite:///x.db", "server gone")

    monkeypatch.setattr(session, "pending_deletions", lost_once)
    with pytest.raises(StoreError):
        session.remove(victim)
    assert read_index(str(tmp_path / "s" / "index.txt")) == [keep]
    session.remove(victim)
    assert not (tmp_path / "s" / "jobs" / victim).exists()


@pytest.mark.parametrize("how", ["remove", "forget"])
def test_a_removal_not_flushed_is_not_taken_for_one_to_try_again(tmp_path, how):
    heard = []

    class Listener:
        def task_removed(self, session, task_id):
            heard.append(task_id)

    session = Session(tmp_path / "s", plugins=[Listener()], autoload_plugins=False)
    oid = session.add(Task())
    getattr(session, how)(oid, flush=False)
    with pytest.raises(InvalidArgument, match="is not in session"):
        getattr(session, how)(oid, flush=False)
    assert heard == [oid]


def test_a_task_that_failed_to_load_can_be_removed_or_forgotten(session):
    first, second = session.add(Task()), session.add(Task())
    for oid in (first, second):
        Path(session.store.directory, oid).write_bytes(b"")
    with pytest.warns(LoadWarning):
        again = reopen(session)
    again.forget(first)
    assert first not in again.load_errors
    again.remove(second)
    assert second not in again.load_errors
    assert index_lines(again) == []
    assert not Path(session.store.directory, second).exists()


def test_loading_a_task_that_failed_clears_its_error(session, monkeypatch):
    oid = session.add(OldTask())
    monkeypatch.delattr(helpers, "OldTask")
    with pytest.warns(LoadWarning):
        again = reopen(session)
    assert oid in again.load_errors
    monkeypatch.setattr(helpers, "OldTask", OldTask, raising=False)
    again.load(oid)
    assert again.load_errors == {}
    assert oid in again


def test_the_warning_sums_up_many_failures(session):
    ids = [session.add(Task()) for _ in range(5)]
    for oid in ids:
        Path(session.store.directory, oid).write_bytes(b"junk")
    with pytest.warns(LoadWarning, match="5 task") as record:
        again = reopen(session)
    assert "2 more" in str(record[0].message)
    assert sorted(again.load_errors) == sorted(ids)


# -- TemporarySession ---------------------------------------------------------------------


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """Keep TemporarySession's directories under tmp_path."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_temporary_session_holds_every_stored_object(temp_dir, store_url, store):
    children = [Task(jobname="c0"), Task(jobname="c1")]
    collection_id = store.save(TaskCollection(jobname="grid", tasks=children))
    plain = store.save(Task(jobname="plain"))
    with TemporarySession(store_url) as session:
        path = session.path
        assert os.path.isdir(path)
        assert Path(path).parent == temp_dir
        assert sorted(session.list_ids()) == sorted(store.list())
        assert len(session) == 4
        assert session.tasks[collection_id].tasks[0] is session.tasks[children[0].persistent_id]
        assert session.tasks[plain].jobname == "plain"
        assert sorted(index_lines(session)) == sorted(store.list())
    assert not os.path.exists(path)


def test_temporary_session_with_task_ids(temp_dir, store_url, store):
    ids = [store.save(Task(jobname=str(i))) for i in range(4)]
    with TemporarySession(store_url, task_ids=ids[1:3]) as session:
        assert session.list_ids() == ids[1:3]
    assert store.list() == ids


def test_temporary_session_saves_changes_at_exit(temp_dir, store_url, store, open_store):
    oid = store.save(Task(jobname="x"))
    with TemporarySession(store_url) as session:
        session.tasks[oid].state = State.RUNNING
        added = session.add(Task(jobname="new"), flush=False)
    other = open_store()
    assert other.load(oid).state is State.RUNNING
    assert other.load(added).jobname == "new"


def test_temporary_session_over_a_store_object(temp_dir, tmp_path):
    store = FilesystemStore(tmp_path / "store")
    oid = store.save(Task())
    with TemporarySession(store) as session:
        assert session.store is store
        assert session.list_ids() == [oid]


def test_temporary_session_close_removes_the_directory(temp_dir, store_url, store):
    store.save(Task())
    session = TemporarySession(store_url)
    path = session.path
    session.close()
    assert not os.path.exists(path)


def test_temporary_session_directory_goes_when_the_session_is_collected(temp_dir, store_url):
    session = TemporarySession(store_url)
    path = session.path
    session.store.close()
    del session
    gc.collect()
    assert not os.path.exists(path)


def test_temporary_session_with_delete_false_keeps_the_directory(temp_dir, store_url, store):
    oid = store.save(Task())
    with TemporarySession(store_url, delete=False) as session:
        path = session.path
    assert os.path.isdir(path)
    assert index_lines(path) == [oid]


def test_temporary_session_reports_objects_that_fail_to_load(temp_dir, tmp_path):
    store = FilesystemStore(tmp_path / "store")
    good, broken = store.save(Task()), store.save(Task())
    Path(store.directory, broken).write_bytes(b"junk")
    with pytest.warns(LoadWarning), TemporarySession(str(tmp_path / "store")) as session:
        assert session.list_ids() == [good]
        assert list(session.load_errors) == [broken]
        assert sorted(index_lines(session)) == sorted([good, broken])


def test_temporary_session_passes_extra_args_to_the_store(temp_dir, store_url, store, monkeypatch):
    oid = store.save(OldTask())
    monkeypatch.delattr(helpers, "OldTask")
    with TemporarySession(store_url, class_map={"helpers.OldTask": "helpers.NewTask"}) as session:
        assert type(session.tasks[oid]) is NewTask


def test_make_store_and_session_agree_on_the_store(tmp_path, store_url):
    session = Session(tmp_path / "s", store_or_url=store_url)
    oid = session.add(Task(jobname="x"))
    with make_store(Path(session.path, "store.url").read_text().strip()) as store:
        assert store.load(oid).jobname == "x"
    session.store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_session_usable_in_a_forked_child(tmp_path):
    session = Session(tmp_path / "s")
    first = session.add(Task(jobname="parent"))
    session.store.pre_fork()
    pid = os.fork()
    if pid == 0:  # child: add one task, never return into pytest
        code = 1
        try:
            session.store.post_fork()
            session.add(Task(jobname="child"))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    third = session.add(Task(jobname="parent again"))
    reopened = Session(tmp_path / "s")
    assert sorted(t.jobname for t in reopened) == ["child", "parent", "parent again"]
    assert len(set(reopened.list_ids())) == 3 and {first, third} <= set(reopened.list_ids())


def test_lazy_open_reads_only_the_index(tmp_path):
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(5)]
    lazy = Session(tmp_path / "s", lazy=True)
    assert lazy.tasks.loaded() == []
    assert len(lazy) == 5 and lazy.list_ids() == ids and ids[2] in lazy
    assert lazy.tasks[ids[2]].jobname == "t2"
    assert [t.jobname for t in lazy.tasks.loaded()] == ["t2"]
    lazy.save_all()  # only what is loaded can have changed: nothing else gets loaded
    assert len(lazy.tasks.loaded()) == 1
    extra = lazy.add(Task(jobname="new"))
    lazy.remove(ids[0])
    assert len(lazy.tasks.loaded()) == 2
    assert [t.jobname for t in lazy] == ["t1", "t2", "t3", "t4", "new"]
    assert Session(tmp_path / "s").list_ids() == [*ids[1:], extra]


def test_lazy_task_that_fails_to_load_is_reported_and_kept(tmp_path):
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(3)]
    (tmp_path / "s" / "jobs" / ids[1]).write_bytes(b"junk")
    lazy = Session(tmp_path / "s", lazy=True)
    assert lazy.tasks[ids[0]].jobname == "t0"
    with pytest.warns(LoadWarning), pytest.raises(LoadError) as info:
        lazy.tasks[ids[1]]
    assert info.value.id == ids[1] and ids[1] in lazy.load_errors
    assert info.value.reason == lazy.load_errors[ids[1]].reason  # the reason itself, not "see load_errors"
    lazy.add(Task(jobname="more"))
    assert ids[1] in (tmp_path / "s" / "index.txt").read_text().split()


@pytest.mark.parametrize("lazy", [False, True])
def test_a_task_that_fails_to_load_is_out_of_tasks_and_get_gives_the_default(tmp_path, lazy):
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(3)]
    (tmp_path / "s" / "jobs" / ids[1]).write_bytes(b"junk")
    with pytest.warns(LoadWarning):
        reopened = Session(tmp_path / "s", lazy=lazy)
        assert reopened.tasks.get(ids[1], "default") == "default"  # LoadError is no KeyError: get() must catch it
    assert ids[1] not in reopened and len(reopened) == 2 and ids[1] in reopened.load_errors
    assert reopened.tasks.get(ids[0]).jobname == "t0"


def test_session_tasks_is_read_only(tmp_path):
    # a task put there would be written under another id by close() and gone from the session on reopening
    session = Session(tmp_path / "s")
    oid = session.add(Task())
    with pytest.raises(TypeError, match=r"read-only: add a task with session\.add\(task\)"):
        session.tasks["Task.50"] = Task()
    with pytest.raises(TypeError, match="read-only"):
        del session.tasks[oid]
    for method in ("pop", "popitem", "clear", "update", "setdefault"):
        assert not hasattr(session.tasks, method)
    session.close()
    assert Session(tmp_path / "s").list_ids() == [oid]


# -- reading the index as a stream ----------------------------------------------------


def test_iter_index_gives_what_read_index_gives_on_a_messy_index(tmp_path):
    index = tmp_path / "index.txt"
    big = f"Task.{IdSet.SPAN + 5}"
    index.write_bytes(
        f"\n Task.3\r\nTask.1\n\nTask.3\nTaskCollection.3\n{big}\nTask.1\n{big}\n  \nOther.9\nTask.2\n".encode()
    )
    expected = ["Task.3", "Task.1", "TaskCollection.3", big, "Other.9", "Task.2"]
    assert read_index(str(index)) == expected
    assert list(iter_index(str(index))) == expected
    index.write_bytes(b"Task.3\nTask.4\nTask.5 cut sho")  # a torn last line that is no id is left out
    assert list(iter_index(str(index))) == read_index(str(index)) == ["Task.3", "Task.4"]
    assert list(iter_index(str(tmp_path / "none.txt"))) == []


def test_iter_index_stops_at_a_line_that_is_no_id_naming_file_and_line(tmp_path):
    index = tmp_path / "index.txt"
    index.write_bytes(b"Task.1\nTask.2\n../etc/passwd\nTask.3\n")
    stream = iter_index(str(index))
    assert [next(stream), next(stream)] == ["Task.1", "Task.2"]  # streamed: the bad line is not read yet
    with pytest.raises(SessionError, match="line 3") as excinfo:
        next(stream)
    assert excinfo.value.path == str(index)
    with pytest.raises(SessionError, match="is a directory"):
        list(iter_index(str(tmp_path)))


@pytest.mark.parametrize("block", [1, 2, 7, 64, 1 << 16])
def test_index_is_read_the_same_whatever_the_block_size(tmp_path, monkeypatch, block):
    """Blocks of plain ids go through one regular expression, others line by line: both agree at every cut."""
    monkeypatch.setattr(session_module, "INDEX_BLOCK", block)
    index = tmp_path / "index.txt"
    plain = [f"Task.{n}" for n in range(1, 3000)]
    lines = [*plain[:1000], " Task.5000 ", "", "Tâche.7", "Task.1", *plain[1000:], "Task.6000\r", "Task.7000"]
    index.write_bytes(("\n".join(lines) + "\nTask.8000").encode())  # the last line torn where an id ends
    expected = [*plain[:1000], "Task.5000", "Tâche.7", *plain[1000:], "Task.6000", "Task.7000"]
    with pytest.warns(RepairWarning, match="'Task.8000', has no newline"):
        assert read_index(str(index)) == expected
    with pytest.warns(RepairWarning, match="'Task.8000', has no newline"):
        assert list(iter_index(str(index))) == expected
    index.write_bytes(("\n".join(plain) + "\nTask.9 cut").encode())  # torn, and no id: left out
    assert read_index(str(index)) == list(iter_index(str(index))) == plain


@pytest.mark.parametrize("block", [3, 1 << 16])
def test_a_bad_line_far_into_the_index_is_named_by_its_number(tmp_path, monkeypatch, block):
    monkeypatch.setattr(session_module, "INDEX_BLOCK", block)
    index = tmp_path / "index.txt"
    index.write_bytes(b"".join(b"Task.%d\n" % n for n in range(1, 20001)) + b"\nTask.x\nTask.20001\n")
    stream = iter_index(str(index))
    assert [next(stream) for _ in range(20000)][-1] == "Task.20000"  # all the ids before it
    with pytest.raises(SessionError, match=r"line 20002: 'Task\.x' is not a task id"):
        next(stream)
    assert read_index(str(index), strict=False)[-2:] == ["Task.x", "Task.20001"]


@settings(max_examples=300)
@given(
    st.one_of(
        st.from_regex(r"[A-Za-z_é٣][A-Za-z0-9_é٣]{0,3}\.[0-9]{1,3}", fullmatch=True),  # ids, near misses
        st.text(alphabet=string.printable + "éß٣_", max_size=30),
    ).filter(lambda text: "\n" not in text)
)
def test_a_plain_id_line_is_an_ascii_id_and_nothing_else(text):
    """The one-pass check of an index block agrees with is_id on every ASCII line, and takes no other."""
    assert bool(PLAIN_ID_LINES.fullmatch(text.encode() + b"\n")) == (text.isascii() and is_id(text))


def test_id_set_new_keeps_the_first_of_each_id_in_order():
    ids = IdSet()
    assert ids.new(["Task.3", "Task.1", "Task.3", "Other.3", f"Task.{10**17}", f"Task.{10**17}"]) == [
        "Task.3", "Task.1", "Other.3", f"Task.{10**17}"]
    assert ids.new(["Task.1", "Task.2", "Other.3"]) == ["Task.2"]


def test_id_set_holds_what_a_set_holds_in_a_bit_per_number():
    ids = IdSet()
    reference: set[str] = set()
    span = IdSet.SPAN
    numbers = [1000, 1001, 1007, 1008, 9, 1, 123_456, 1003, 1001, 1000, 1000 + span - 1, 1000 + span, 10**17]
    for number in numbers:
        for prefix in ("Task", "TaskCollection"):
            oid = f"{prefix}.{number}"
            assert ids.add(oid) == (oid not in reference), oid
            reference.add(oid)
    outside = (9, 1, 1000 + IdSet.SPAN, 10**17)  # below the first number, or past the span
    assert sorted(ids._others) == sorted(f"{p}.{n}" for p in ("Task", "TaskCollection") for n in outside)
    assert all(len(bits) <= IdSet.SPAN // 8 for _, bits in ids._bits.values())


@given(st.lists(st.tuples(st.sampled_from(["Task", "Other"]), st.integers(1, 60), st.integers(1, 20),
                          st.booleans()), max_size=12))
def test_id_set_new_agrees_with_a_set_on_runs_and_scattered_ids(batches):
    """Runs of consecutive numbers take a one-step path; whatever the batches, new() gives what a set would."""
    ids = IdSet()
    reference: set[str] = set()
    for prefix, low, length, scattered in batches:
        numbers = list(range(low, low + length))
        if scattered:  # not a run: repeats and gaps
            numbers = [n * 3 % 70 + 1 for n in numbers] + numbers[:2]
        batch = [f"{prefix}.{n}" for n in numbers]
        expected = list(dict.fromkeys(oid for oid in batch if oid not in reference))
        assert ids.new(batch) == expected, batch
        reference.update(batch)


def test_id_set_new_takes_any_iterable():
    assert IdSet().new(f"Task.{n}" for n in (3, 4, 3)) == ["Task.3", "Task.4"]


def test_id_set_takes_a_bit_per_number_from_the_first_one_added():
    dense = IdSet()
    for number in range(1, 1_000_001):
        dense.add(f"Task.{number}")
    assert sum(len(bits) for _, bits in dense._bits.values()) <= 2 * 1_000_001 // 8  # 125 KiB, grown by doubling
    high = IdSet()  # a session in a big shared store: its numbers start high
    for number in range(50_000_000, 50_010_000):
        assert high.add(f"Task.{number}")
    assert sum(len(bits) for _, bits in high._bits.values()) <= 2 * 10_000 // 8
    assert not high.add("Task.50000000") and not high._others


@pytest.mark.parametrize("write", [
    lambda s: s.add(Task(), flush=False), lambda s: s.add(Task()), lambda s: s.save(Task()), lambda s: s.flush(),
    lambda s: s.save_all(), lambda s: s.remove("Task.1"),
])
def test_a_closed_session_refuses_writes(tmp_path, write):
    """An add with flush=False after close() (a thread still adding) was taken, and nothing wrote it after."""
    with Session(tmp_path / "s") as session:
        session.add(Task())
        session.close()
        with pytest.raises(SessionError, match="is closed"):
            write(session)
    assert len(Session(tmp_path / "s")) == 1


def test_params_that_cannot_be_recorded_are_refused_before_anything_is_made(tmp_path):
    cycle: dict = {}
    cycle["self"] = cycle
    for params in ({("alpha", "beta"): 0.1}, cycle):
        with pytest.raises(InvalidArgument, match="params cannot be kept in the session's run records"):
            Session(tmp_path / "s", params=params)
        assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"lazzy": True}, "unknown option 'lazzy'"),
    ({"class_map": ["old.Task"]}, "class_map must map"),
    ({"allowed_classes": 1}, "allowed_classes must be module prefixes or classes"),
    ({"serializer": "pickle"}, "serializer must be a gc3session.persistence.Serializer"),
    ({"protocol": "4"}, "pickle protocol must be 2 to"),
    ({"task_ids": 1}, "task_ids must be a list of ids, not 1"),
    ({"plugins": print}, "plugins must be a list of plugin objects"),
    ({"plugins": "myplugin"}, "plugins must be a list of plugin objects"),
])
def test_arguments_of_the_wrong_type_are_refused_clearly_on_creating_and_opening(tmp_path, arguments, message):
    with pytest.raises(InvalidArgument, match=message):
        Session(tmp_path / "new", **arguments)
    assert not (tmp_path / "new").exists()
    Session(tmp_path / "s").add(Task())
    with pytest.raises(InvalidArgument, match=message) as excinfo:
        Session(tmp_path / "s", **arguments)
    assert "store.url" not in str(excinfo.value)  # the fault is the argument's, not the session's
    assert len(Session(tmp_path / "s")) == 1


def test_temporary_session_task_ids_must_be_a_list_of_ids(tmp_path):
    store = make_store(str(tmp_path / "store"))
    store.save(Task())
    for task_ids, message in ((1, "not 1"), ("Task.1", "not the string 'Task.1'")):
        with pytest.raises(InvalidArgument, match=f"task_ids must be a list of ids, {message}"):
            TemporarySession(str(tmp_path / "store"), task_ids=task_ids)


@pytest.mark.parametrize("make", [
    lambda tmp: Session(tmp / "s", store_or_url=b"jobs"), lambda tmp: Session(tmp / "s", store_or_url="st\0ore"),
    lambda tmp: Session(str(tmp / "a\0b")), lambda tmp: Session(b"s"),
])
def test_a_session_path_or_store_url_of_the_wrong_type_is_an_invalid_argument(tmp_path, make):
    with pytest.raises(InvalidArgument, match="must be a string or path without NUL bytes"):
        make(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("call", [lambda s: s.remove(["Task.1"]), lambda s: s.forget(["Task.1"]),
                                  lambda s: s.load(["Task.1"])])
def test_an_id_that_is_no_string_is_an_invalid_argument(session, call):
    oid = session.add(Task())
    with pytest.raises(InvalidArgument, match=r"a task id is a string, like 'Task.1', not \['Task.1'\]"):
        call(session)
    assert session.list_ids() == [oid]


def test_a_string_where_a_list_of_ids_is_due_is_refused_by_withdraw_and_get_many(tmp_path):
    # withdraw("Task.2") did nothing, so the task that broke the flush stayed pending and the next flush failed
    session = Session(tmp_path / "s")
    oid = session.add(Task(), flush=False)
    for call in (session.withdraw, session.tasks.get_many, session.store.occupants):
        with pytest.raises(InvalidArgument, match=f"expected a list of ids, not the string '{oid}'"):
            call(oid)
    session.withdraw([oid])
    assert oid not in session
