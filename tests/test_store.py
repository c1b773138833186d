"""Store behaviour shared by every kind of store, ``make_store``, and the filesystem store's own.

The tests that take ``store``, ``open_store`` or ``store_url`` run once per
store kind (file, sqlite, postgresql, mysql) and use only the public Store
API, so a new kind of store gets the whole suite for free.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import gc
import importlib.metadata
import itertools
import json
import os
import pathlib
import pickle
import shutil
import threading
import zlib

import helpers
import pytest
from helpers import Bare, FitTask, GcWitness, NewTask, OldTask, Point, make_helper_store
from hypothesis import given
from hypothesis import strategies as st

import gc3session
from gc3session import (
    InvalidArgument,
    LoadError,
    NoSuchObject,
    SaveError,
    Session,
    State,
    StoreError,
    Task,
    TaskCollection,
)
from gc3session.exceptions import RepairWarning
from gc3session.persistence import (
    DEFAULT_PROTOCOL,
    FilesystemStore,
    Serializer,
    SqlStore,
    Store,
    make_store,
    register,
)
from gc3session.persistence import store as store_module
from gc3session.persistence.atomic import TEMP_PREFIX
from gc3session.persistence.filesystem import COUNTER_FILENAME, SUMMARY_BLOCK, SUMMARY_FIELDS, encode_record
from gc3session.persistence.idfactory import parse_id
from gc3session.persistence.serialization import FORMAT_VERSION, decode_json, encode_json

METADATA_FIELDS = {"format", "version", "id", "cls", "jobname", "state", "children", "created", "modified", "history"}


def number(oid: str) -> int:
    return parse_id(oid)[1]


# -- ids --------------------------------------------------------------------------


def test_ids_read_like_class_dot_number(store):
    assert store.save(Task()).startswith("Task.")
    assert store.save(TaskCollection()).startswith("TaskCollection.")
    assert store.save(Bare(1)).startswith("Bare.")
    oid = store.save(FitTask(alpha=1.0))
    prefix, n = parse_id(oid)
    assert prefix == "FitTask"
    assert n >= 1


def test_save_sets_persistent_id_and_keeps_it(store):
    task = Task()
    oid = store.save(task)
    assert task.persistent_id == oid
    task.alpha = 2
    assert store.save(task) == oid
    assert store.list() == [oid]


def test_ids_are_unique_within_a_store(store):
    ids = [store.save(Task()) for _ in range(10)]
    ids += store.save_many([Task() for _ in range(10)])
    ids += [store.save(Bare(i)) for i in range(5)]
    assert len(set(ids)) == 25
    assert len({number(oid) for oid in ids}) == 25, "numbers are unique across classes, too"
    assert sorted(store.list()) == sorted(ids)


def test_ids_are_not_reused_after_remove(store, open_store):
    ids = [store.save(Task()) for _ in range(3)]
    highest = max(number(oid) for oid in ids)
    store.remove(ids[-1])
    store.remove_many(ids[:2])
    assert store.list() == []
    again = store.save(Task())
    assert number(again) > highest
    fresh_handle = open_store()
    later = fresh_handle.save(Task())
    assert number(later) > number(again)
    assert later not in ids


def test_two_handles_never_hand_out_the_same_id(open_store):
    first, second = open_store(), open_store()
    ids = []
    for _ in range(10):
        ids.append(first.save(Task()))
        ids.append(second.save(Task()))
    ids += first.save_many([Task() for _ in range(5)]) + second.save_many([Task() for _ in range(5)])
    assert len({number(oid) for oid in ids}) == len(ids) == 30
    assert sorted(first.list()) == sorted(ids)


def test_ids_are_unique_across_processes(store_url, store, tmp_path):
    results = helpers.run_in_processes(helpers.save_to_store, [(store_url, 15)] * 3, str(tmp_path / "gate"))
    ids = [oid for result in results for oid in result]
    assert len(ids) == 45
    assert len({number(oid) for oid in ids}) == 45
    assert sorted(store.list(), key=number) == sorted(ids, key=number)
    loaded = store.load_many(ids)
    assert sorted(t.jobname for t in loaded.values()) == sorted(f"w{i}-{j}" for i in range(3) for j in range(15))


def test_assign_id_gives_an_id_without_writing(store):
    task = Task()
    oid = store.assign_id(task)
    assert task.persistent_id == oid
    assert store.assign_id(task) == oid
    assert store.list() == []
    assert store.save(task) == oid
    assert store.list() == [oid]


def test_saving_an_object_that_takes_no_attributes_is_refused(store):
    with pytest.raises(InvalidArgument):
        store.save(42)


def test_invalid_ids_are_refused(store):
    for bad in ["../../etc/passwd", "", "Task.0", "Task.017", "Task", "Task.1; DROP TABLE x"]:
        with pytest.raises(InvalidArgument):
            store.load(bad)
        with pytest.raises(InvalidArgument):
            store.remove(bad)
        with pytest.raises(InvalidArgument):
            store.metadata(bad)


# -- saving and loading -------------------------------------------------------------


def test_round_trip_keeps_attributes_state_and_history(store, open_store):
    task = FitTask(
        jobname="fit-ü",
        alpha=0.25,
        numbers=[1, 2.5, None, True],
        table={"a": (1, 2), "b": {"nested"}},
        raw=b"\x00\xff",
        when=datetime.datetime(2024, 5, 17, 12, 30),
        path=pathlib.Path("/data/input.csv"),
        amount=decimal.Decimal("1.10"),
    )
    task.state = State.SUBMITTED
    task.state = State.RUNNING
    task.execution.returncode = 7
    task.execution.info = "exit status 7"
    oid = store.save(task)

    other = open_store()
    loaded = other.load(oid)
    assert loaded is not task
    assert type(loaded) is FitTask
    assert loaded.persistent_id == oid
    assert loaded == task
    for name in ("jobname", "alpha", "numbers", "table", "raw", "when", "path", "amount"):
        assert getattr(loaded, name) == getattr(task, name), name
    assert loaded.state is State.RUNNING
    assert loaded.execution.history == task.execution.history
    assert all(isinstance(s, State) for _, s in loaded.execution.history)
    assert loaded.execution.returncode == 7
    assert loaded.execution.info == "exit status 7"
    assert loaded.changed is False


def test_save_marks_the_object_unchanged(store):
    task = Task()
    assert task.changed
    store.save(task)
    assert task.changed is False
    task.state = State.RUNNING
    assert task.changed
    store.save(task)
    assert task.changed is False


def test_save_many_returns_ids_in_order(store, open_store):
    tasks = [Task(jobname=f"t{i}") for i in range(5)]
    ids = store.save_many(tasks)
    assert ids == [t.persistent_id for t in tasks]
    assert store.save_many([tasks[0], tasks[0]]) == [ids[0], ids[0]]
    assert store.save_many([]) == []
    other = open_store()
    assert [t.jobname for t in other.load_many(ids).values()] == [f"t{i}" for i in range(5)]
    assert list(other.load_many(ids)) == ids


def test_load_on_the_saving_handle_gives_the_saved_object(store):
    task = Task()
    oid = store.save(task)
    assert store.load(oid) is task


def test_loading_twice_gives_the_same_object(store, open_store):
    oid = store.save(Task(jobname="x"))
    other = open_store()
    first = other.load(oid)
    assert other.load(oid) is first
    assert other.load_many([oid])[oid] is first


def test_invalidate_cache_gives_a_fresh_object(store, open_store):
    oid = store.save(Task(jobname="x"))
    other = open_store()
    first = other.load(oid)
    other.invalidate_cache()
    second = other.load(oid)
    assert second is not first
    assert second == first
    assert second.jobname == "x"


def test_a_second_handle_sees_saves_after_invalidate_cache(store, open_store):
    task = Task(jobname="v1")
    oid = store.save(task)
    other = open_store()
    seen = other.load(oid)
    assert seen.jobname == "v1"

    task.jobname = "v2"
    task.state = State.TERMINATED
    store.save(task)
    assert other.load(oid) is seen, "without invalidate_cache the handle keeps its object"
    other.invalidate_cache()
    fresh = other.load(oid)
    assert fresh.jobname == "v2"
    assert fresh.state is State.TERMINATED


def test_load_many_with_duplicate_ids(store):
    oid = store.save(Task())
    result = store.load_many([oid, oid, oid])
    assert list(result) == [oid]


def test_replace_overwrites_a_record(store, open_store):
    oid = store.save(Task(jobname="old"))
    newer = Task(jobname="new")
    store.replace(oid, newer)
    assert newer.persistent_id == oid
    assert store.list() == [oid]
    other = open_store()
    assert other.load(oid).jobname == "new"
    assert other.metadata(oid)["jobname"] == "new"


def test_replace_refuses_an_invalid_id(store):
    with pytest.raises(InvalidArgument):
        store.replace("nonsense", Task())
    with pytest.raises(SaveError, match="too high"):
        store.replace(f"Task.{10**18 - 1}", Task())


def test_an_id_given_by_replace_is_never_handed_out_again(store, open_store):
    other = open_store()  # another handle, which numbers from the same counter
    store.replace("Task.5", Task(jobname="replaced"))  # no RepairWarning either (warnings fail the tests)
    new = [*store.save_many([Task() for _ in range(3)]), *other.save_many([Task() for _ in range(3)])]
    assert "Task.5" not in new and min(parse_id(oid)[1] for oid in new) > 5
    assert open_store().load("Task.5").jobname == "replaced"


# -- children -----------------------------------------------------------------------


def test_child_persistable_is_stored_as_its_own_record(store):
    children = [Task(jobname="a"), Task(jobname="b")]
    collection = TaskCollection(jobname="grid", tasks=children)
    cid = store.save(collection)
    child_ids = [c.persistent_id for c in children]
    assert all(child_ids)
    assert sorted(store.list()) == sorted([cid, *child_ids])
    assert store.metadata(cid)["children"] == child_ids
    assert store.metadata(child_ids[0])["jobname"] == "a"
    assert store.metadata(child_ids[0])["cls"] == "gc3session.task.Task"
    assert all(c.changed is False for c in children)


def test_loading_container_then_child_gives_the_same_object(store, open_store):
    children = [Task(jobname="a"), Task(jobname="b")]
    cid = store.save(TaskCollection(tasks=children))
    other = open_store()
    collection = other.load(cid)
    assert [c.jobname for c in collection.tasks] == ["a", "b"]
    assert other.load(children[0].persistent_id) is collection.tasks[0]
    assert other.load(children[1].persistent_id) is collection.tasks[1]


def test_loading_child_then_container_gives_the_same_object(store, open_store):
    child = Task(jobname="a")
    cid = store.save(TaskCollection(tasks=[child]))
    other = open_store()
    loaded_child = other.load(child.persistent_id)
    collection = other.load(cid)
    assert collection.tasks[0] is loaded_child


def test_loading_container_and_child_in_one_batch(store, open_store):
    child = Task(jobname="a")
    cid = store.save(TaskCollection(tasks=[child]))
    other = open_store()
    loaded = other.load_many([child.persistent_id, cid])
    assert loaded[cid].tasks[0] is loaded[child.persistent_id]


def test_a_child_shared_by_two_containers_is_one_record_and_one_object(store, open_store):
    shared = Task(jobname="shared")
    first = TaskCollection(jobname="first", tasks=[shared])
    second = TaskCollection(jobname="second", tasks=[shared])
    ids = store.save_many([first, second])
    assert len(store.list()) == 3
    other = open_store()
    loaded = other.load_many(ids)
    assert loaded[ids[0]].tasks[0] is loaded[ids[1]].tasks[0]


def test_nested_collections(store, open_store):
    leaf = Task(jobname="leaf")
    inner = TaskCollection(jobname="inner", tasks=[leaf])
    outer = TaskCollection(jobname="outer", tasks=[inner, Task(jobname="sibling")])
    oid = store.save(outer)
    assert len(store.list()) == 4
    other = open_store()
    loaded = other.load(oid)
    assert loaded.tasks[0].tasks[0].jobname == "leaf"
    assert other.load(leaf.persistent_id) is loaded.tasks[0].tasks[0]
    assert other.metadata(inner.persistent_id)["children"] == [leaf.persistent_id]


def test_persistable_inside_other_containers_is_a_reference(store, open_store):
    child = Bare("inside")
    holder = Task(by_name={"c": child}, pair=(child, 1))
    oid = store.save(holder)
    assert child.persistent_id is not None
    other = open_store()
    loaded = other.load(oid)
    assert loaded.by_name["c"] is loaded.pair[0]
    assert other.load(child.persistent_id) is loaded.by_name["c"]


class Exploding:
    """Pickles, and fails to unpickle."""

    def __init__(self):
        self.state = "any"

    def __setstate__(self, state):
        raise ValueError("boom in setstate")


def test_a_record_whose_reference_is_gone_is_named_in_the_error(store, open_store):
    """The error names the record that failed to load, and the one it refers to, not only the one missing."""
    needed, user = Task(jobname="needed"), Task(jobname="user")
    user.depends_on = needed
    oid = store.save(user)
    store.remove(needed.persistent_id)  # behind its back, as a bad hand edit or an older version could
    other = open_store()
    with pytest.raises(LoadError) as excinfo:
        other.load(oid)
    assert excinfo.value.id == oid and not isinstance(excinfo.value, NoSuchObject)
    assert f"it refers to {needed.persistent_id}, which cannot be loaded: no such object" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, NoSuchObject) and excinfo.value.__cause__.id == needed.persistent_id
    errors: dict[str, LoadError] = {}
    assert other.load_many([oid], errors=errors) == {}
    assert errors[oid].id == oid and needed.persistent_id in errors[oid].reason
    assert isinstance(errors[oid].__cause__, NoSuchObject)


def test_a_record_that_fails_to_load_keeps_the_cause(store, open_store):
    """The error of a record that fails on its own is raised as it is, with what caused it."""
    oid = store.save(Task(payload=Exploding()))
    with pytest.raises(LoadError) as excinfo:
        open_store().load(oid)
    assert excinfo.value.id == oid and isinstance(excinfo.value.__cause__, ValueError)


@given(st.dictionaries(st.integers(0, 12), st.sets(st.integers(0, 12), max_size=4), max_size=13))
def test_children_first_puts_every_record_after_those_of_the_batch_it_refers_to(graph):
    """Whatever the order given and whatever the references (cycles are refused before writing, but must not
    loop here either), each record comes once, after every other one of the batch that it refers to."""
    records = [store_module.Record(f"Task.{n}", n, {}, b"", None, tuple(f"Task.{r}" for r in refs))
               for n, refs in graph.items()]
    ordered = store_module.children_first(records)
    assert sorted(r.id for r in ordered) == sorted(r.id for r in records)
    place = {record.id: n for n, record in enumerate(ordered)}
    refs = {r.id: r.refs for r in records}
    if store_module.find_cycle(refs, lambda node: refs.get(node, ())) is None:
        assert all(place[ref] < place[r.id] for r in records for ref in r.refs if ref in place)


def test_a_session_opened_twice_in_one_process_never_writes_its_unchanged_copy_over_the_other(
    tmp_path, store_url
):
    """The process-wide registry of objects knows the copy loaded last; the one loaded first is this handle's
    own all the same, and saving what refers to it must not write it back."""
    first = Session(tmp_path / "s", store_or_url=store_url)
    needed = first.add(Task(jobname="needed"))
    user = first.add(Task(jobname="user", after=first.tasks[needed]))
    first.close()
    daemon = Session(tmp_path / "s")  # a long-running session
    with Session(tmp_path / "s") as other:  # the same session, opened again in the same process
        other.tasks[needed].state = State.TERMINATED
    daemon.tasks[user].note = "touched"  # changes the task that refers to the other only
    daemon.close()
    again = Session(tmp_path / "s")
    assert again.tasks[needed].state is State.TERMINATED
    assert again.tasks[user].note == "touched" and again.tasks[user].after is again.tasks[needed]
    again.close()


def test_a_changed_child_is_saved_with_its_container(store, open_store):
    child = Task(jobname="a")
    collection = TaskCollection(tasks=[child])
    cid = store.save(collection)
    child.state = State.RUNNING
    store.save(collection)
    other = open_store()
    assert other.load(child.persistent_id).state is State.RUNNING
    assert other.load(cid).tasks[0].state is State.RUNNING


def test_an_unchanged_child_is_not_rewritten(store):
    child, changed_child = Task(jobname="a"), Task(jobname="b")
    collection = TaskCollection(tasks=[child, changed_child])
    store.save(collection)
    before = store.metadata(child.persistent_id)["modified"]
    changed_before = store.metadata(changed_child.persistent_id)
    changed_child.state = State.STOPPED
    collection.jobname = "renamed"
    store.save(collection)
    assert store.metadata(child.persistent_id)["modified"] == before
    changed_after = store.metadata(changed_child.persistent_id)
    assert changed_after["state"] == "STOPPED"
    assert changed_after["modified"] >= changed_before["modified"]


def test_a_child_added_later_is_saved(store, open_store):
    collection = TaskCollection()
    cid = store.save(collection)
    collection.add(Task(jobname="late"))
    store.save(collection)
    other = open_store()
    assert [t.jobname for t in other.load(cid).tasks] == ["late"]
    assert len(store.list()) == 2


def test_a_self_reference_is_kept_inside_one_record(store, open_store):
    task = Task()
    task.me = task
    oid = store.save(task)
    assert store.list() == [oid]
    loaded = open_store().load(oid)
    assert loaded.me is loaded


def test_a_reference_cycle_between_records_is_refused(store):
    a, b = Task(jobname="a"), Task(jobname="b")
    a.other = b
    b.other = a
    with pytest.raises(SaveError) as excinfo:
        store.save(a)
    assert "cycle" in str(excinfo.value)
    assert excinfo.value.target in (a.persistent_id, b.persistent_id)
    assert store.list() == []


def test_a_longer_reference_cycle_is_refused(store):
    a, b, c = TaskCollection(jobname="a"), TaskCollection(jobname="b"), TaskCollection(jobname="c")
    a.add(b)
    b.add(c)
    c.add(a)
    with pytest.raises(SaveError, match="cycle"):
        store.save_many([a])
    assert store.list() == []


def test_a_cycle_through_an_already_saved_object_is_refused(store, open_store):
    child = Task(jobname="child")
    parent = TaskCollection(jobname="parent", tasks=[child])
    pid = store.save(parent)
    child.parent = parent  # the saved, unchanged parent now closes a cycle
    with pytest.raises(SaveError, match="reference cycle"):
        store.save(child)
    # what is stored must still load
    assert open_store().load(pid).jobname == "parent"


# -- errors ---------------------------------------------------------------------------


def test_an_unpicklable_attribute_raises_save_error(store):
    kept = store.save(Task(jobname="kept"))
    task = Task(callback=lambda: 1)
    with pytest.raises(SaveError) as excinfo:
        store.save(task)
    assert excinfo.value.target == task.persistent_id
    assert store.list() == [kept]
    locked = Task(lock=threading.Lock())
    with pytest.raises(SaveError):
        store.save(locked)
    assert store.list() == [kept]
    assert store.load(kept).jobname == "kept"


def test_an_unpicklable_child_fails_the_whole_batch(store):
    collection = TaskCollection(tasks=[Task(jobname="fine"), Task(handle=threading.Lock())])
    with pytest.raises(SaveError):
        store.save(collection)
    assert store.list() == []


def test_loading_a_missing_id_raises_load_error_naming_it(store):
    with pytest.raises(LoadError) as excinfo:
        store.load("Task.999")
    assert excinfo.value.id == "Task.999"
    assert "Task.999" in str(excinfo.value)
    assert isinstance(excinfo.value, gc3session.Error)


def test_loading_a_removed_id_raises_load_error(store, open_store):
    oid = store.save(Task())
    store.remove(oid)
    with pytest.raises(LoadError) as excinfo:
        open_store().load(oid)
    assert excinfo.value.id == oid


def test_ids_that_share_a_number_in_one_batch_each_get_their_own_answer(store, open_store):
    """SQL rows are keyed by number: the id that holds the row loads, the other is told whose it is."""
    oid = store.save(Task(jobname="held"))
    other = f"Other.{oid.partition('.')[2]}"
    errors: dict[str, LoadError] = {}
    loaded = open_store().load_many([oid, other], errors=errors)
    assert list(loaded) == [oid] and loaded[oid].jobname == "held"
    assert list(errors) == [other]
    if isinstance(store, SqlStore):
        assert f"holds object {oid!r}" in str(errors[other])
    errors.clear()
    loaded = open_store().load_many([other, oid], errors=errors)  # in the other order too
    assert list(loaded) == [oid] and list(errors) == [other]


def test_missing_ids_are_read_once_with_their_batch(store, open_store, monkeypatch):
    """A session whose store lost its records must not cost one query for each of them."""
    kept = store.save_many([Task(jobname="kept"), TaskCollection(tasks=[Task(jobname="child")])])
    lost = [f"Task.{n}" for n in range(900_001, 900_301)]
    other = open_store()
    reads: list[list[str]] = []
    real = other._read_for_load
    monkeypatch.setattr(other, "_read_for_load", lambda ids: reads.append(list(ids)) or real(ids))
    errors: dict[str, LoadError] = {}
    loaded = other.load_many([*lost, *kept], errors=errors)
    assert list(loaded) == kept and loaded[kept[1]].tasks[0].jobname == "child"
    assert sorted(errors) == sorted(lost) and all(isinstance(e, NoSuchObject) for e in errors.values())
    assert len(reads) == 2, [len(r) for r in reads]  # the batch, then the collection's child
    assert len(reads[0]) == len(lost) + len(kept)


def test_load_many_collects_errors_when_asked(store):
    good = store.save(Task(jobname="good"))
    errors: dict[str, LoadError] = {}
    loaded = store.load_many([good, "Task.9999"], errors=errors)
    assert list(loaded) == [good]
    assert list(errors) == ["Task.9999"]
    assert isinstance(errors["Task.9999"], LoadError)
    assert errors["Task.9999"].id == "Task.9999"
    with pytest.raises(LoadError) as excinfo:
        store.load_many([good, "Task.9999"])
    assert excinfo.value.id == "Task.9999"


def test_loading_pauses_the_cyclic_garbage_collector_and_restores_it(store, open_store, monkeypatch):
    ids = [store.save(GcWitness(jobname=f"w{i}")) for i in range(3)]
    monkeypatch.setattr(GcWitness, "seen", [])
    assert gc.isenabled()
    loaded = open_store().load_many(ids)
    assert [t.jobname for t in loaded.values()] == ["w0", "w1", "w2"]
    assert GcWitness.seen == [False, False, False] and gc.isenabled()
    monkeypatch.setattr(GcWitness, "fail", True)
    with pytest.raises(LoadError, match="refused to unpickle"):
        open_store().load(ids[0])
    assert gc.isenabled()  # back on after a failed load too
    monkeypatch.setattr(GcWitness, "fail", False)
    gc.disable()
    try:  # a collector the program turned off stays off
        assert list(open_store().load_many([ids[1]])) == [ids[1]]
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_saving_pauses_the_cyclic_garbage_collector_and_restores_it(store, monkeypatch):
    """A batch makes containers, not garbage: a full collection in the middle of a flush cost a fifth of it."""
    monkeypatch.setattr(GcWitness, "seen_saving", [])
    store.save_many([GcWitness(jobname=f"w{i}") for i in range(3)])
    assert GcWitness.seen_saving == [False, False, False] and gc.isenabled()
    monkeypatch.setattr(GcWitness, "fail", True)
    with pytest.raises(SaveError, match="refused to pickle"):
        store.save(GcWitness(jobname="bad"))
    assert gc.isenabled()  # back on after a failed save too
    monkeypatch.setattr(GcWitness, "fail", False)
    gc.disable()
    try:  # a collector the program turned off stays off
        store.save(GcWitness(jobname="more"))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_record_whose_class_is_gone_fails_to_load_naming_its_id(store, open_store, monkeypatch):
    oid = store.save(OldTask(jobname="old"))
    good = store.save(Task(jobname="good"))
    monkeypatch.delattr(helpers, "OldTask")
    other = open_store()
    with pytest.raises(LoadError) as excinfo:
        other.load(oid)
    assert excinfo.value.id == oid
    assert oid in str(excinfo.value)
    errors: dict[str, LoadError] = {}
    loaded = other.load_many([oid, good], errors=errors)
    assert list(loaded) == [good] and list(errors) == [oid]


def test_class_map_loads_a_renamed_class(store, open_store, monkeypatch):
    oid = store.save(OldTask(jobname="moved", alpha=3))
    monkeypatch.delattr(helpers, "OldTask")
    with pytest.raises(LoadError):
        open_store().load(oid)
    mapped = open_store(class_map={"helpers.OldTask": "helpers.NewTask"})
    loaded = mapped.load(oid)
    assert type(loaded) is NewTask
    assert (loaded.jobname, loaded.alpha) == ("moved", 3)
    assert loaded.persistent_id == oid


def test_class_map_must_name_module_and_class(open_store):
    with pytest.raises(InvalidArgument):
        open_store(class_map={"OldTask": "helpers.NewTask"})


def test_allowed_classes_refuse_other_globals(store, open_store):
    plain = store.save(Task(jobname="plain", when=datetime.date(2024, 1, 1)))
    with_point = store.save(Task(point=Point(1, 2)))
    with_function = store.save(Task(join=os.path.join))
    strict = open_store(allowed_classes=["gc3session"])
    assert strict.load(plain).when == datetime.date(2024, 1, 1)
    for oid, refused in ((with_point, "helpers.Point"), (with_function, "join")):
        with pytest.raises(LoadError) as excinfo:
            strict.load(oid)
        assert excinfo.value.id == oid
        assert refused in str(excinfo.value)


def test_a_global_refused_once_is_refused_every_time_and_the_lists_are_read_only(store, open_store):
    with_point = store.save(Task(point=Point(1, 2)))
    strict = open_store(allowed_classes=["gc3session"])
    for _ in range(2):  # looked-up globals are remembered: a refusal must not be
        strict.invalidate_cache()
        with pytest.raises(LoadError, match=r"helpers\.Point"):
            strict.load(with_point)
    serializer = Serializer(class_map={"a.B": "c.D"}, allowed_classes=["gc3session"])
    with pytest.raises(TypeError):
        serializer.class_map["x.Y"] = "z.W"  # type: ignore[index]
    with pytest.raises(AttributeError):
        serializer.allowed = None  # type: ignore[misc]
    assert serializer.class_map == {"a.B": "c.D"} and serializer.allowed == ("gc3session",)


def test_allowed_classes_accept_modules_and_classes(store, open_store):
    oid = store.save(Task(point=Point(1, 2)))
    assert open_store(allowed_classes=["helpers"]).load(oid).point.y == 2
    assert open_store(allowed_classes=[Point]).load(oid).point.x == 1
    assert open_store(allowed_classes="helpers.Point").load(oid).point.x == 1
    with pytest.raises(LoadError):
        open_store(allowed_classes=["help"]).load(oid)  # a prefix of a name is not its module


def test_allowed_classes_must_list_user_task_classes(store, open_store):
    oid = store.save(FitTask(alpha=1.0))
    with pytest.raises(LoadError):
        open_store(allowed_classes=[]).load(oid)
    assert open_store(allowed_classes=[FitTask]).load(oid).alpha == 1.0


# -- metadata -----------------------------------------------------------------------


def test_metadata_has_every_field(store):
    child = Task(jobname="child")
    collection = TaskCollection(jobname="grid", tasks=[child])
    collection.state = State.RUNNING
    collection.execution.returncode = 0
    oid = store.save(collection)
    meta = store.metadata(oid)
    assert METADATA_FIELDS <= set(meta)
    assert meta["format"] == FORMAT_VERSION
    assert meta["version"] == gc3session.__version__
    assert meta["id"] == oid
    assert meta["cls"] == "gc3session.task.TaskCollection"
    assert meta["jobname"] == "grid"
    assert meta["state"] == "RUNNING"
    assert meta["children"] == [child.persistent_id]
    assert isinstance(meta["created"], float) and isinstance(meta["modified"], float)
    assert meta["created"] <= meta["modified"]
    assert meta["history"] == [[t, str(s)] for t, s in collection.execution.history]
    assert [s for _, s in meta["history"]] == ["NEW", "RUNNING"]
    json.dumps(meta)  # plain JSON types only


def test_metadata_of_a_plain_persistable(store):
    oid = store.save(Bare(1))
    meta = store.metadata(oid)
    assert meta["cls"] == "helpers.Bare"
    assert meta["jobname"] is None
    assert meta["state"] is None
    assert meta["children"] == []
    assert meta["history"] == []


def test_metadata_is_read_without_unpickling(store, open_store, monkeypatch):
    oid = store.save(OldTask(jobname="gone"))
    monkeypatch.delattr(helpers, "OldTask")
    other = open_store()
    meta = other.metadata(oid)
    assert meta["cls"] == "helpers.OldTask"
    assert meta["jobname"] == "gone"
    assert meta["state"] == "NEW"
    assert dict(other.iter_metadata())[oid]["jobname"] == "gone"
    assert other.list(jobname="gone") == [oid]


def test_metadata_created_stays_and_modified_moves_on(store, open_store):
    task = Task()
    oid = store.save(task)
    first = store.metadata(oid)
    task.state = State.TERMINATED
    store.save(task)
    second = store.metadata(oid)
    assert second["created"] == first["created"]
    assert second["modified"] >= first["modified"]
    assert second["state"] == "TERMINATED"
    # also after a reload in another handle
    other = open_store()
    loaded = other.load(oid)
    loaded.jobname = "again"
    other.save(loaded)
    assert other.metadata(oid)["created"] == first["created"]


def test_metadata_of_a_missing_id_raises_load_error(store):
    with pytest.raises(LoadError) as excinfo:
        store.metadata("Task.4242")
    assert excinfo.value.id == "Task.4242"


def test_iter_metadata(store):
    ids = [store.save(Task(jobname=f"j{i}")) for i in range(3)]
    everything = list(store.iter_metadata())
    assert [oid for oid, _ in everything] == ids
    assert [meta["jobname"] for _, meta in everything] == ["j0", "j1", "j2"]
    some = dict(store.iter_metadata([ids[2], "Task.77777"]))
    assert some[ids[2]]["jobname"] == "j2"
    assert isinstance(some["Task.77777"], LoadError)
    assert some["Task.77777"].id == "Task.77777"


@pytest.mark.parametrize("skip", [[8], list(range(2, 40))], ids=["one-gap", "sparse"])
def test_reads_give_the_ids_asked_for_and_no_others_in_their_span(store, skip):
    # SQL stores read a run of numbers as a range: the rows between that nobody asked for stay out
    saved = store.save_many([Task(jobname=f"j{i}") for i in range(1, 41)])
    asked = [oid for number, oid in enumerate(saved, 1) if number not in skip]
    store.invalidate_cache()
    assert [oid for oid, _ in store.iter_summaries(asked)] == asked
    assert [meta["id"] for _, meta in store.iter_metadata(asked)] == asked
    assert set(store.occupants(asked)) == set(asked)
    names = {oid: f"j{number}" for number, oid in enumerate(saved, 1)}
    loaded = store.load_many(asked)
    assert list(loaded) == asked and all(loaded[oid].jobname == names[oid] for oid in asked)
    prefix, number = parse_id(saved[2])
    stranger = f"Other{prefix}.{number}"  # a number in the run, held by another id
    run = [*saved[:2], stranger, *saved[3:]]
    found = dict(store.iter_summaries(run))
    assert isinstance(found[stranger], NoSuchObject) and found[saved[-1]]["jobname"] == "j40"
    assert [oid for oid, meta in store.iter_metadata(run) if isinstance(meta, dict)] == [*saved[:2], *saved[3:]]
    errors: dict[str, LoadError] = {}
    store.invalidate_cache()
    loaded = store.load_many([*saved, stranger], errors=errors)  # both ids of the shared number asked for
    assert list(loaded) == saved and set(errors) == {stranger}


def test_iter_metadata_and_summaries_read_a_stream_of_ids_a_batch_at_a_time(store):
    saved = store.save_many([Task(jobname=f"j{i}") for i in range(2500)])
    for method in (store.iter_metadata, store.iter_summaries):
        taken = 0

        def ids():
            nonlocal taken
            for oid in saved:
                taken += 1
                yield oid

        stream = method(ids())
        first, meta = next(stream)
        assert first == saved[0] and meta["jobname"] == "j0"
        assert taken <= store_module.LOAD_BATCH  # not the whole stream before the first answer
        rest = list(stream)
        assert taken == 2500 and [meta["jobname"] for _, meta in rest][-1] == "j2499"
    stream = store.iter_metadata(iter([saved[0], "../x"]))
    with pytest.raises(InvalidArgument, match="not a valid object id"):
        list(stream)


@pytest.mark.parametrize(
    "bad", ["../x", "Task.1\nTask.2", "Task.1\n", "Task.01", "Task.1\x00", 17, None, b"Task.1", "Tâche.1 "]
)
def test_id_chunks_checks_every_id_and_names_the_bad_one(bad):
    good = [f"Task.{i}" for i in range(1, 6)] + ["Tâche.7", "_x.8"]
    assert list(store_module.id_chunks(iter(good), 3)) == [good[:3], good[3:6], good[6:]]
    for position in (0, 3, 6):
        ids = [*good[:position], bad, *good[position:]]
        chunks = store_module.id_chunks(ids, 4)
        before = [oid for _ in range(position // 4 + (position % 4 > 0)) for oid in next(chunks)]
        assert before == good[:position]  # the ids before the bad one come first
        with pytest.raises(InvalidArgument, match="not a valid object id") as excinfo:
            next(chunks)
        assert repr(bad) in str(excinfo.value)


def test_id_chunks_give_the_ids_read_before_the_stream_failed():
    def stream():
        yield from ["Task.1", "Task.2"]
        raise OSError("the index cannot be read on")

    chunks = store_module.id_chunks(stream(), 4)
    assert next(chunks) == ["Task.1", "Task.2"]
    with pytest.raises(OSError, match="cannot be read on"):
        next(chunks)


def test_iter_children_gives_each_records_own_children(store):
    kids = [Task(jobname="a"), Task(jobname="b")]
    collection = store.save(TaskCollection(tasks=kids))
    lone = store.save(Task())
    absent = f"Task.{number(lone) + 1000}"
    found = dict(store.iter_children([collection, lone, absent]))
    assert found[collection] == [kid.persistent_id for kid in kids]
    assert found[lone] == []
    assert isinstance(found[absent], NoSuchObject) and found[absent].id == absent


# -- list, remove ---------------------------------------------------------------------


def test_list_is_oldest_first(store):
    ids = [store.save(Task()) for _ in range(5)]
    assert store.list() == sorted(ids, key=number)


def test_list_of_an_empty_store(store):
    assert store.list() == []


def test_list_filters_on_metadata(store):
    running = Task(jobname="r")
    running.state = State.RUNNING
    done = FitTask(jobname="d")
    done.state = State.TERMINATED
    new = Task(jobname="n")
    ids = dict(zip("rdn", store.save_many([running, done, new]), strict=True))
    assert store.list(state="RUNNING") == [ids["r"]]
    assert store.list(state=State.TERMINATED) == [ids["d"]]
    assert store.list(jobname="n") == [ids["n"]]
    assert store.list(cls="helpers.FitTask") == [ids["d"]]
    assert store.list(cls="gc3session.task.Task", state="NEW") == [ids["n"]]
    assert store.list(state="STOPPED") == []
    assert store.list(jobname="r", state="NEW") == []


def test_list_filters_follow_later_saves(store):
    task = Task()
    oid = store.save(task)
    assert store.list(state="NEW") == [oid]
    task.state = State.RUNNING
    store.save(task)
    assert store.list(state="NEW") == []
    assert store.list(state="RUNNING") == [oid]


def test_remove_deletes_one_record(store, open_store):
    a, b = store.save(Task()), store.save(Task())
    store.remove(a)
    assert store.list() == [b]
    with pytest.raises(LoadError):
        store.load(a)
    other = open_store()
    assert other.list() == [b]
    with pytest.raises(LoadError):
        other.load(a)


def test_remove_of_a_missing_id_is_quiet(store):
    store.remove("Task.31337")
    store.remove_many(["Task.31337", "Task.31338"])
    store.remove_many([])


def test_remove_many(store):
    ids = [store.save(Task()) for _ in range(6)]
    store.remove_many([ids[0], ids[2], ids[2], ids[4], "Task.98765"])
    assert store.list() == [ids[1], ids[3], ids[5]]


def test_removing_a_container_keeps_its_children(store):
    child = Task()
    cid = store.save(TaskCollection(tasks=[child]))
    store.remove(cid)
    assert store.list() == [child.persistent_id]


# -- pickle protocol, options, life cycle -------------------------------------------


class RecordingSerializer(Serializer):
    """Remembers the bytes of every record it writes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.written: list[bytes] = []

    def dumps(self, obj, reference):
        data = super().dumps(obj, reference)
        self.written.append(data)
        return data


def test_default_protocol_is_fixed_and_not_the_highest():
    assert DEFAULT_PROTOCOL == 4
    assert gc3session.persistence.serialization.DEFAULT_PROTOCOL == DEFAULT_PROTOCOL
    assert Serializer().protocol == DEFAULT_PROTOCOL


def test_records_use_the_default_protocol(store, open_store):
    assert store.serializer.protocol == DEFAULT_PROTOCOL
    recording = RecordingSerializer()
    handle = open_store(serializer=recording)
    handle.save(TaskCollection(tasks=[Task()]))
    assert len(recording.written) == 2
    for data in recording.written:
        assert data[:2] == pickle.PROTO + bytes([DEFAULT_PROTOCOL])


class DescribesBadly(Serializer):
    """A serializer whose own describe() adds a field of the test's choosing."""

    def __init__(self, extra):
        super().__init__()
        self.extra = extra

    def describe(self, obj):
        if self.extra == "raise":
            raise KeyError("no such field")
        return {**super().describe(obj), **self.extra}


def _circular():
    loop: list = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(("extra", "reason"), [
    ({"site": _circular()}, "contains itself"),
    ({"when": datetime.datetime(2026, 1, 1)}, "datetime is not JSON serializable"),
    ({"id": "Task.99"}, "fields that the store fills itself: id"),
    ({1: "one"}, "field names that are no strings: 1"),
    ({"children": "Task.5"}, "children that are no list of ids"),
    ("raise", "no such field"),
])
def test_metadata_a_custom_describe_cannot_give_is_a_save_error_naming_the_task(store, open_store, extra, reason):
    handle = open_store(serializer=DescribesBadly(extra))
    task = Task(jobname="t")
    with pytest.raises(SaveError, match=reason) as info:
        handle.save(task)
    assert info.value.target == task.persistent_id and "cannot make the metadata of Task" in str(info.value)
    assert store.list() == []
    assert open_store(serializer=DescribesBadly({"site": "lab"})).save(Task()) in store.list()


def test_a_describe_set_on_the_serializer_itself_is_checked_too(store, open_store):
    serializer = Serializer()
    serializer.describe = lambda obj: {"id": "Task.999"}  # type: ignore[method-assign]
    with pytest.raises(SaveError, match="fields that the store fills itself: id"):
        open_store(serializer=serializer).save(Task())
    assert store.list() == []


def test_a_history_entry_that_is_no_time_and_state_is_a_save_error(store):
    task = Task(jobname="t")
    task.execution.history.append(("yesterday", "RUNNING"))
    with pytest.raises(SaveError, match="cannot make the metadata of Task") as info:
        store.save(task)
    assert info.value.target == task.persistent_id and store.list() == []


class Unpicklable:
    def __reduce__(self):
        raise TypeError("not today")


class PicklesWhilePickled:
    """Pickling it runs another ``dumps`` of the same serializer, as a ``__reduce__`` might."""

    serializer = Serializer()

    def __init__(self, inner):
        self.inner = inner

    def __reduce__(self):
        return pickle.loads, (self.serializer.dumps(self.inner, no_reference),)


def no_reference(child):
    raise AssertionError(f"unexpected reference to {child!r}")


def test_serializer_pickles_each_object_on_its_own():
    # one pickler serves many dumps(): nothing may carry over from one pickle to the next
    serializer = PicklesWhilePickled.serializer
    shared = ["shared"]
    task = Task(files=shared)
    first = serializer.dumps(task, no_reference)
    assert serializer.dumps(task, no_reference) == first == Serializer().dumps(task, no_reference)
    second = serializer.dumps(Task(files=shared, again=shared), no_reference)
    assert pickle.loads(second).again == ["shared"]
    with pytest.raises(TypeError, match="not today"):
        serializer.dumps(Task(bad=Unpicklable()), no_reference)
    assert serializer.dumps(task, no_reference) == first
    assert pickle.loads(serializer.dumps([PicklesWhilePickled({"a": 1}), shared], no_reference)) == [{"a": 1}, shared]
    assert serializer.dumps(task, no_reference) == first
    for twin in (pickle.loads(pickle.dumps(serializer)), copy.copy(serializer)):
        assert twin.dumps(task, no_reference) == first
        assert twin._idle is not serializer._idle


@pytest.mark.parametrize("text", ['{"a":1}', ' {"a": [1, 2.5, null]} \n', '"x"', "[]", '{"s":"\\u00e9"}'])
def test_decode_json_reads_what_json_loads_reads(text):
    assert decode_json(text) == json.loads(text)


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.5, None, True]}, {"s": "\u00e9 \ud800 \"q\""}, ((1.5, "NEW"),), "x", 3, [], {"inf": float("inf")}],
)
def test_encode_json_writes_what_json_dumps_writes(value):
    assert encode_json(value) == json.dumps(value, separators=(",", ":"))
    assert encode_json(value).isascii()


def test_encode_json_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        encode_json({"a": object()})


@pytest.mark.parametrize("text", ["", " ", '{"a":1} x', "[1] [2]", "{", '{"a":1}\n{"b":2}', "x", ",1"])
def test_decode_json_refuses_what_json_loads_refuses(text):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as excinfo:
        decode_json(text)
    assert (excinfo.value.msg, excinfo.value.pos) == (expected.value.msg, expected.value.pos)


def test_protocol_can_be_chosen_and_bad_ones_are_refused(open_store):
    assert open_store(protocol=2).serializer.protocol == 2
    with pytest.raises(InvalidArgument):
        open_store(protocol=99)


@pytest.mark.parametrize("options", [{"frobnicate": True}, {"allowed_class": ["helpers"]}, {"echo": True}])
def test_options_no_store_takes_are_refused(store_url, options):
    # a typo would be ignored: allowed_class instead of allowed_classes would unpickle anything
    with pytest.raises(InvalidArgument, match=f"unknown option {next(iter(options))!r}"):
        make_store(store_url, **options)


@pytest.mark.parametrize(("options", "message"), [
    ({"class_map": ["old.Task"]}, "class_map must map old 'module.Name' strings to new ones, not a list"),
    ({"class_map": "old.Task"}, "class_map must map .* not a str"),
    ({"allowed_classes": 1}, "allowed_classes must be module prefixes or classes .* not 1"),
    ({"allowed_classes": ["helpers", 1]}, "allowed_classes entries must be module prefixes or classes, not 1"),
    ({"allowed_classes": [""]}, "allowed_classes entries must be .* not ''"),
    ({"serializer": "pickle"}, "serializer must be a gc3session.persistence.Serializer, not 'pickle'"),
    ({"serializer": Serializer(), "allowed_classes": ["helpers"]}, "give class_map and allowed_classes to the"),
    ({"idfactory": "Task"}, "idfactory must be a gc3session.persistence.IdFactory, not 'Task'"),
    ({"protocol": "4"}, "pickle protocol must be 2 to"),
])
def test_store_options_of_the_wrong_type_are_invalid_arguments(store_url, options, message):
    with pytest.raises(InvalidArgument, match=message):
        make_store(store_url, **options)


def test_store_is_a_context_manager_and_close_is_idempotent(store_url):
    with make_store(store_url) as store:
        oid = store.save(Task())
    store.close()
    with make_store(store_url) as again:
        assert again.load(oid).persistent_id == oid


def test_post_fork_keeps_the_store_usable(store, open_store):
    first = store.save(Task())
    store.pre_fork()
    store.post_fork()
    second = store.save(Task())
    assert number(second) > number(first)
    assert sorted(open_store().list()) == sorted([first, second])


def test_size_of_a_store_directory_that_cannot_be_listed_is_unknown(tmp_path, monkeypatch):
    store = FilesystemStore(tmp_path / "s")
    store.save(Task())
    assert store.size() > 0

    def refuse():
        raise PermissionError(13, "Permission denied", str(tmp_path / "s"))

    monkeypatch.setattr(store, "_names", refuse)
    assert store.size() is None


def test_store_str_and_repr_hide_a_password(tmp_path, private_registry):
    register("gc3test", make_helper_store)
    store = make_store(f"gc3test://user:hunter2@localhost{tmp_path}/s")
    assert isinstance(store, Store)
    for text in (str(store), repr(store)):
        assert "hunter2" not in text
        assert "user:***@localhost" in text


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://me:my/secret@db/test#table=t", "postgresql://me:***@db/test#table=t"),  # "/" in it
    ("mysql+pymysql://root:p@ss@localhost/test", "mysql+pymysql://root:***@localhost/test"),  # "@" in it
    ("postgresql://me@db/test?password=x&sslmode=require", "postgresql://me@db/test?password=***&sslmode=require"),
    ("postgresql://db:5432/test", "postgresql://db:5432/test"),
    ("sqlite:////data/a@b/tasks.db", "sqlite:////data/a@b/tasks.db"),
])
def test_mask_password_hides_every_part_of_a_password(url, shown):
    assert store_module.mask_password(url) == shown


# -- the exceptions -------------------------------------------------------------------


def test_every_error_is_a_gc3session_error():
    from gc3session.exceptions import LoadWarning

    errors = [
        InvalidArgument("bad"),
        LoadError("Task.1", "gone"),
        SaveError("Task.2", "disk full"),
        StoreError("sqlite:///x", "locked"),
        gc3session.SessionError("/s/store.url", "missing"),
    ]
    for error in errors:
        assert isinstance(error, gc3session.Error)
    assert isinstance(InvalidArgument("x"), ValueError)
    assert issubclass(LoadWarning, Warning)


def test_errors_name_what_is_at_fault_and_pickle_cleanly():
    cases = [
        (LoadError("Task.1", "gone"), "id", "Task.1"),
        (SaveError("Task.2", "disk full"), "target", "Task.2"),
        (StoreError("sqlite:///x.db", "locked"), "url", "sqlite:///x.db"),
        (gc3session.SessionError("/s/store.url", "missing"), "path", "/s/store.url"),
    ]
    for error, attribute, value in cases:
        assert getattr(error, attribute) == value
        assert value in str(error)
        assert error.reason in str(error)
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert getattr(copy, attribute) == value
        assert str(copy) == str(error)


# -- make_store and register ------------------------------------------------------------


def test_make_store_with_a_plain_path(tmp_path):
    store = make_store(str(tmp_path / "a"))
    assert isinstance(store, FilesystemStore)
    assert store.directory == tmp_path / "a"
    assert (tmp_path / "a").is_dir()
    assert isinstance(make_store(tmp_path / "b"), FilesystemStore)


def test_make_store_with_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = make_store("rel")
    assert isinstance(store, FilesystemStore)
    assert store.directory == tmp_path / "rel"


def test_make_store_with_a_file_url(tmp_path):
    store = make_store(f"file://{tmp_path}/viaurl")
    assert isinstance(store, FilesystemStore)
    assert store.directory == tmp_path / "viaurl"
    oid = store.save(Task())
    assert (tmp_path / "viaurl" / oid).is_file()
    assert isinstance(make_store(f"file://localhost{tmp_path}/local"), FilesystemStore)
    assert (tmp_path / "local").is_dir()


def test_url_schemes_and_hosts_ignore_case(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a scheme taken as part of a relative path would land here
    assert make_store(f"FILE://{tmp_path}/upper").directory == tmp_path / "upper"
    assert make_store(f"File://LocalHost{tmp_path}/host").directory == tmp_path / "host"
    for url in (f"SQLITE:///{tmp_path}/upper.db", f"SQLite+pysqlite:///{tmp_path}/driver.db"):
        store = make_store(url)
        oid = store.save(Task(jobname=url))
        store.close()
        store = make_store(url)
        assert store.load(oid).jobname == url
        store.close()
    assert sorted(name for name in os.listdir(tmp_path) if not name.endswith(("-wal", "-shm"))) == [
        "driver.db", "host", "upper", "upper.db"]


def test_make_store_refuses_a_relative_file_url():
    with pytest.raises(InvalidArgument):
        make_store("file://relative/path")


def test_make_store_refuses_an_unknown_scheme_naming_it_and_the_known_ones():
    with pytest.raises(InvalidArgument) as excinfo:
        make_store("nosuchdb://host/db")
    message = str(excinfo.value)
    assert "nosuchdb" in message
    for known in ("file", "sqlite", "postgresql", "mysql", "mariadb"):
        assert known in message
    assert isinstance(excinfo.value, ValueError)


def test_make_store_hides_the_password_of_an_unknown_scheme():
    with pytest.raises(InvalidArgument) as excinfo:
        make_store("nosuchdb://user:hunter2@host/db")
    assert "hunter2" not in str(excinfo.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 42])
def test_make_store_refuses_empty_or_odd_urls(bad):
    with pytest.raises(InvalidArgument):
        make_store(bad)


def test_make_store_returns_a_store_as_it_is(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    assert make_store(store) is store


def test_make_store_passes_keywords_to_the_store(tmp_path):
    store = make_store(str(tmp_path / "p"), protocol=3, class_map={"a.B": "c.D"})
    assert store.serializer.protocol == 3
    assert store.serializer.class_map == {"a.B": "c.D"}


def test_filesystem_store_ignores_keywords_of_sql_stores(tmp_path):
    # so that one Session() call fits a session whatever its store.url names (echo=, pool_size= no store takes)
    store = make_store(str(tmp_path / "s"), table_name="jobs", extra_fields={}, existing_table=True)
    assert isinstance(store, FilesystemStore)
    oid = store.save(Task())
    assert store.list() == [oid]
    direct = FilesystemStore(tmp_path / "t", None, DEFAULT_PROTOCOL, table_name="x", create=True)
    assert direct.list() == []


def test_make_store_expands_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("GC3SESSION_TEST_BASE", str(tmp_path))
    store = make_store("${GC3SESSION_TEST_BASE}/expanded")
    assert store.directory == tmp_path / "expanded"
    url_store = make_store("file://${GC3SESSION_TEST_BASE}/viaurl")
    assert url_store.directory == tmp_path / "viaurl"


def test_make_store_refuses_an_unset_variable(monkeypatch):
    monkeypatch.delenv("GC3SESSION_TEST_UNSET", raising=False)
    with pytest.raises(InvalidArgument, match="GC3SESSION_TEST_UNSET"):
        make_store("${GC3SESSION_TEST_UNSET}/x")


@pytest.fixture
def private_registry(monkeypatch):
    """Let a test register schemes without leaking them to the others."""
    monkeypatch.setattr(store_module, "_registry", dict(store_module._registry))


def test_register_adds_a_scheme(tmp_path, private_registry):
    calls = []

    def constructor(url, **kwargs):
        calls.append((url, kwargs))
        return make_helper_store(url, **kwargs)

    register("gc3test", constructor)
    store = make_store(f"gc3test://{tmp_path}/custom", protocol=3)
    assert calls == [(f"gc3test://{tmp_path}/custom", {"protocol": 3})]
    assert isinstance(store, Store)
    oid = store.save(Task())
    assert (tmp_path / "custom" / oid).is_file()
    # a +driver suffix and upper case reach the same constructor
    make_store(f"GC3TEST+fast://{tmp_path}/custom")
    assert len(calls) == 2
    with pytest.raises(InvalidArgument) as excinfo:
        make_store("other://x")
    assert "gc3test" in str(excinfo.value)


def test_register_refuses_a_bad_scheme(private_registry):
    for bad in ["", "1abc", "has space", "a+b", "x://"]:
        with pytest.raises(InvalidArgument):
            register(bad, make_helper_store)


def test_a_scheme_from_an_entry_point(tmp_path, private_registry, monkeypatch):
    entry = importlib.metadata.EntryPoint(name="epstore", value="helpers:make_helper_store", group="gc3session.stores")

    def fake_entry_points(group=None, **_):
        return [entry] if group == "gc3session.stores" else []

    monkeypatch.setattr(store_module, "entry_points", fake_entry_points)
    store = make_store(f"epstore://{tmp_path}/ep")
    assert isinstance(store, FilesystemStore)
    assert store.directory == tmp_path / "ep"
    assert "epstore" in store_module._registry


# -- the filesystem store ---------------------------------------------------------------


def record_path(store: FilesystemStore, oid: str) -> pathlib.Path:
    return store.directory / oid


def test_filesystem_record_is_a_listing_line_a_json_line_then_the_pickle(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    task = Task(jobname="x")
    task.execution.state = State.TERMINATED
    task.execution.returncode = 3
    oid = store.save(TaskCollection(tasks=[task]))
    child = task.persistent_id
    listing, line, data = record_path(store, oid).read_bytes().split(b"\n", 2)
    meta = json.loads(line)
    assert meta["id"] == oid and meta["children"] == [child]
    assert meta["size"] == len(data)
    assert meta["crc32"] == zlib.crc32(data)
    assert data[:2] == pickle.PROTO + bytes([DEFAULT_PROTOCOL])
    collection = "gc3session.task.TaskCollection"
    assert json.loads(listing) == [oid, collection, meta["jobname"], "NEW", None, meta["modified"], [child]]
    listing, line, _ = record_path(store, child).read_bytes().split(b"\n", 2)
    meta = json.loads(line)
    assert json.loads(listing) == [child, "gc3session.task.Task", "x", "TERMINATED", 3, meta["modified"], []]
    assert [meta[name] for name in SUMMARY_FIELDS] == json.loads(listing)


def test_filesystem_records_without_a_listing_line_still_load_and_list(tmp_path):
    """Records as 0.2 and earlier wrote them: the metadata line first."""
    store = FilesystemStore(tmp_path / "s")
    ids = store.save_many([Task(jobname="old"), TaskCollection(tasks=[Task(jobname="kid")])])
    for oid in store.list():
        path = record_path(store, oid)
        path.write_bytes(path.read_bytes().partition(b"\n")[2])
        assert path.read_bytes().startswith(b'{"format":1,')
    fresh = FilesystemStore(tmp_path / "s")
    assert fresh.load(ids[0]).jobname == "old"
    assert fresh.load(ids[1]).tasks[0].jobname == "kid"
    summaries = dict(fresh.iter_summaries(fresh.list()))
    metadata = dict(fresh.iter_metadata(fresh.list()))
    assert summaries == metadata and summaries[ids[0]]["jobname"] == "old"
    assert summaries[ids[1]]["children"] == [fresh.load(ids[1]).tasks[0].persistent_id]


def test_filesystem_listing_reads_the_listing_line_and_falls_back_to_the_metadata(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    first, second, third = store.save_many([Task(jobname="a"), Task(jobname="b"), Task(jobname="c")])
    # the listing line alone is read: one changed by hand shows (the metadata line stays the truth for loads)
    path = record_path(store, first)
    listing, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(listing.replace(b'"a"', b'"edited"') + b"\n" + rest)
    # a damaged listing line: the metadata line is read instead
    for oid, bad in [(second, b'["Task.2","x"]'), (third, b"[not json")]:
        path = record_path(store, oid)
        path.write_bytes(bad + b"\n" + path.read_bytes().split(b"\n", 1)[1])
    fresh = FilesystemStore(tmp_path / "s")
    summaries = dict(fresh.iter_summaries([first, second, third]))
    assert [summaries[oid]["jobname"] for oid in (first, second, third)] == ["edited", "b", "c"]
    assert summaries[second] == fresh.metadata(second) and "history" in summaries[second]
    assert set(summaries[first]) == set(SUMMARY_FIELDS)
    assert fresh.load(first).jobname == "a" and fresh.metadata(first)["jobname"] == "a"
    assert [t.jobname for t in fresh.load_many([second, third]).values()] == ["b", "c"]


def test_filesystem_listing_of_long_short_odd_and_missing_records(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    big = TaskCollection(jobname="big", tasks=[Task() for _ in range(60)])
    junk, short, gone = store.save_many([Task(jobname="junk"), Task(jobname="short"), Task()])
    big_id = store.save(big)
    assert len(record_path(store, big_id).read_bytes().partition(b"\n")[0]) > SUMMARY_BLOCK
    path = record_path(store, junk)  # a listing line with something after its array
    listing, rest = path.read_bytes().split(b"\n", 1)
    path.write_bytes(listing.replace(b'"junk"', b'"listed"') + b" x\n" + rest)
    record_path(store, short).write_bytes(record_path(store, short).read_bytes().partition(b"\n")[0])
    record_path(store, gone).unlink()
    found = dict(FilesystemStore(tmp_path / "s").iter_summaries([big_id, junk, short, gone]))
    # the whole of a listing line longer than the first read, from the listing line (no history in it)
    assert found[big_id]["children"] == [t.persistent_id for t in big.tasks] and "history" not in found[big_id]
    assert found[junk]["jobname"] == "junk" and "history" in found[junk]  # not a listing line: the metadata
    assert isinstance(found[short], LoadError) and "truncated" in found[short].reason
    assert isinstance(found[gone], NoSuchObject) and found[gone].id == gone


def test_filesystem_listing_reads_healthy_records_once_each_on_its_fast_path(tmp_path, monkeypatch):
    store = FilesystemStore(tmp_path / "s")
    big = TaskCollection(jobname="big", tasks=[Task() for _ in range(60)])  # a listing line longer than a read
    ids = [*store.save_many([Task(jobname=str(i)) for i in range(5)]), store.save(big)]
    listing = FilesystemStore(tmp_path / "s")
    opened: list[str] = []
    real = os.open

    def counted(path: str, *args: object, **kwargs: object) -> int:
        opened.append(os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counted)
    monkeypatch.setattr(os, "supports_dir_fd", {*os.supports_dir_fd, counted})
    monkeypatch.setattr(FilesystemStore, "_summary_of", None)  # the general path: not for healthy records
    found = dict(listing.iter_summaries(ids))
    assert [found[oid]["jobname"] for oid in ids] == ["0", "1", "2", "3", "4", "big"]
    # the directory, then each record once, by its name in it
    assert opened == [os.path.join(listing.directory, ""), *ids]


def test_filesystem_store_writes_the_chosen_protocol(tmp_path):
    store = FilesystemStore(tmp_path / "s", protocol=2)
    oid = store.save(Task())
    data = record_path(store, oid).read_bytes().split(b"\n", 2)[2]
    assert data[:2] == pickle.PROTO + bytes([2])
    assert FilesystemStore(tmp_path / "s").load(oid).persistent_id == oid


def test_filesystem_store_leaves_no_temporary_files(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    tasks = [Task(jobname=str(i)) for i in range(20)]
    store.save_many(tasks)
    for task in tasks[:10]:
        task.state = State.RUNNING
        store.save(task)
    store.remove_many([t.persistent_id for t in tasks[10:15]])
    with pytest.raises(SaveError):
        store.save(Task(lock=threading.Lock()))
    names = os.listdir(store.directory)
    assert not [n for n in names if n.startswith(TEMP_PREFIX)]
    assert sorted(n for n in names if not n.startswith(".")) == sorted(t.persistent_id for t in tasks[:10] + tasks[15:])


@pytest.mark.parametrize("fsync", [False, True])
def test_filesystem_store_with_fsync(tmp_path, monkeypatch, fsync):
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    store = FilesystemStore(tmp_path / "s", fsync=fsync)
    oid = store.save(Task())
    assert FilesystemStore(tmp_path / "s").load(oid).persistent_id == oid
    names = {os.path.basename(path) for path in synced}
    # the record and the id counter (the temporary files they are written to, then their directory)
    assert (any(oid in name for name in names) and any(COUNTER_FILENAME in name for name in names)) == fsync


def test_filesystem_counter_lives_in_the_store_directory(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task()) for _ in range(5)]
    counter = store.directory / COUNTER_FILENAME
    assert counter.is_file()
    assert int(counter.read_text()) > max(number(oid) for oid in ids)


def test_filesystem_counter_missing_or_damaged_restarts_above_the_highest_id(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task()) for _ in range(4)]
    highest = max(number(oid) for oid in ids)
    counter = store.directory / COUNTER_FILENAME
    counter.unlink()
    assert number(FilesystemStore(tmp_path / "s").save(Task())) == highest + 1
    for offset, damage in enumerate(["garbage\n", "0\n", ""], start=2):
        counter.write_text(damage)
        with pytest.warns(RepairWarning, match="damaged"):
            assert number(FilesystemStore(tmp_path / "s").save(Task())) == highest + offset


def test_filesystem_store_lists_only_record_files(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    oid = store.save(Task())
    (store.directory / "notes.txt").write_text("hello")
    (store.directory / f"{TEMP_PREFIX}Task.99-abcd").write_bytes(b"partial")
    (store.directory / "Task.007").write_text("not an id")
    assert store.list() == [oid]
    assert [i for i, _ in store.iter_metadata()] == [oid]


def test_filesystem_store_creates_its_directory_or_refuses(tmp_path):
    FilesystemStore(tmp_path / "deep" / "er")
    assert (tmp_path / "deep" / "er").is_dir()
    with pytest.raises(StoreError):
        FilesystemStore(tmp_path / "missing", create=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError):
        FilesystemStore(tmp_path / "afile")


@pytest.mark.parametrize(
    "damage",
    ["empty", "truncated-listing", "truncated-metadata", "truncated-data", "garbage", "not-an-object",
     "old-not-an-object", "flipped-byte", "bad-pickle", "nested-too-deep"],
)
def test_filesystem_damaged_record_gives_load_error_naming_the_id(tmp_path, damage):
    store = FilesystemStore(tmp_path / "s")
    oid = store.save(Task(jobname="victim", payload=list(range(50))))
    good = store.save(Task(jobname="good"))
    path = record_path(store, oid)
    content = path.read_bytes()
    listing, line, data = content.split(b"\n", 2)
    head = listing + b"\n"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated-listing":
        path.write_bytes(listing[: len(listing) // 2])
    elif damage == "truncated-metadata":
        path.write_bytes(head + line[: len(line) // 2])
    elif damage == "truncated-data":
        path.write_bytes(content[: len(head) + len(line) + 1 + len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01garbage\nmore garbage")
    elif damage == "not-an-object":
        path.write_bytes(head + b"[1, 2, 3]\n" + data)
    elif damage == "old-not-an-object":  # read as a listing line, and what follows as the metadata line
        path.write_bytes(b"[1, 2, 3]\n" + data)
    elif damage == "flipped-byte":
        middle = len(data) // 2
        path.write_bytes(head + line + b"\n" + data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "bad-pickle":
        junk = b"this is not a pickle"
        meta = json.loads(line)
        meta.update(size=len(junk), crc32=zlib.crc32(junk))
        path.write_bytes(encode_record(meta, junk))
    elif damage == "nested-too-deep":  # the JSON scanner recurses: RecursionError, not a bad record, before
        path.write_bytes(b"[" * 100_000 + b"\n" + b"{" * 100_000 + b"\n" + data)

    fresh = FilesystemStore(tmp_path / "s")
    listed = dict(fresh.iter_summaries([oid, good]))  # a listing goes on past a damaged record
    assert listed[good]["jobname"] == "good"
    if damage in ("empty", "garbage", "nested-too-deep"):  # no listing line, nor metadata, to show
        assert isinstance(listed[oid], LoadError) and listed[oid].id == oid
    with pytest.raises(LoadError) as excinfo:
        fresh.load(oid)
    assert excinfo.value.id == oid
    assert oid in str(excinfo.value)
    errors: dict[str, LoadError] = {}
    assert list(fresh.load_many([oid, good], errors=errors)) == [good]
    assert errors[oid].id == oid


def test_filesystem_record_of_another_id_gives_load_error(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    a = store.save(Task(jobname="a"))
    impostor = f"Task.{number(a) + 100}"
    (store.directory / impostor).write_bytes(record_path(store, a).read_bytes())
    with pytest.raises(LoadError) as excinfo:
        FilesystemStore(tmp_path / "s").load(impostor)
    assert excinfo.value.id == impostor
    assert a in str(excinfo.value)


def test_filesystem_metadata_of_damaged_records(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    oid = store.save(Task())
    record_path(store, oid).write_bytes(b"")
    with pytest.raises(LoadError) as excinfo:
        store.metadata(oid)
    assert excinfo.value.id == oid
    assert isinstance(dict(store.iter_metadata())[oid], LoadError)


def test_filesystem_metadata_of_records_that_cannot_be_read(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    good, bad = store.save(Task(jobname="good")), store.save(Task())
    record_path(store, bad).unlink()
    record_path(store, bad).mkdir()  # open works on a directory, read does not
    found = dict(store.iter_metadata([good, bad, "Task.999"]))
    assert found[good]["jobname"] == "good"
    assert isinstance(found[bad], LoadError) and str(record_path(store, bad)) in found[bad].reason
    assert isinstance(found["Task.999"], NoSuchObject)


def test_filesystem_metadata_when_the_store_directory_is_gone(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    oid = store.save(Task())
    shutil.rmtree(tmp_path / "s")
    found = dict(store.iter_metadata([oid]))
    assert isinstance(found[oid], NoSuchObject) and oid in str(found[oid])


def test_filesystem_listing_closes_what_it_opens(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task()) for _ in range(3)]
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(50):
        listing = store.iter_metadata(ids)
        next(listing)
        listing.close()  # stopped half way
        assert len(list(store.iter_metadata(ids))) == 3
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def test_filesystem_damaged_child_fails_the_container(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    child = Task()
    cid = store.save(TaskCollection(tasks=[child]))
    record_path(store, child.persistent_id).write_bytes(b"junk")
    with pytest.raises(LoadError) as excinfo:
        FilesystemStore(tmp_path / "s").load(cid)
    assert child.persistent_id in str(excinfo.value)


def test_filesystem_store_keeps_one_object_per_file_in_a_shared_directory(tmp_path):
    first, second = FilesystemStore(tmp_path / "s"), FilesystemStore(tmp_path / "s")
    a, b = first.save(Task()), second.save(Task())
    assert a != b
    assert sorted(first.list()) == sorted([a, b])
    assert second.size() > 0


HUGE = "Task.999999999999999999"  # a valid id: the highest number an id holds


def test_a_number_that_leaves_no_room_for_new_ids_is_refused(store):
    foreign = Task(jobname="huge")
    foreign.persistent_id = HUGE
    with pytest.raises(SaveError, match=rf"{HUGE}: its number is too high"):
        store.save(foreign)
    data = pickle.dumps(Task())
    with pytest.raises(SaveError, match=rf"{HUGE}: its number is too high"):
        store.import_records([(HUGE, {"id": HUGE, "size": len(data), "crc32": zlib.crc32(data)}, data)])
    assert number(store.save(Task())) < 10**9  # the counter did not move


def test_a_lost_counter_restarts_below_a_record_that_leaves_no_room(store, store_url, monkeypatch):
    with monkeypatch.context() as earlier:  # as an earlier version, whose replace() took any id, counter unmoved
        earlier.setattr(store_module, "LAST_TAKEN", store_module.LAST_NUMBER)
        earlier.setattr(store, "skip_past", lambda number: None)
        store.replace(HUGE, Task(jobname="huge"))
    kept = store.save(Task())
    if isinstance(store, FilesystemStore):
        (store.directory / COUNTER_FILENAME).unlink()
    else:
        with store.engine.begin() as conn:
            conn.execute(store.counters.delete().where(store.counters.c.name == store.table_name))
    again = make_store(store_url)
    try:
        assert number(again.save(Task())) == number(kept) + 1
    finally:
        again.close()


def test_a_counter_past_the_last_number_is_a_clear_error(store, store_url):
    first = store.save(Task())
    if isinstance(store, FilesystemStore):
        (store.directory / COUNTER_FILENAME).write_text(f"{10**18}\n")
    else:  # as an earlier version left it after taking HUGE
        with store.engine.begin() as conn:
            counter = store.counters.c.name == store.table_name
            conn.execute(store.counters.update().where(counter).values(next_id=10**18))
    again = make_store(store_url)
    try:
        if isinstance(store, FilesystemStore):  # a counter file holding what no id can is damaged: counted again
            with pytest.warns(RepairWarning, match="damaged"):
                assert parse_id(again.save(Task()))[1] == parse_id(first)[1] + 1
        else:
            with pytest.raises(StoreError, match="run out of object ids"):
                again.save(Task())
    finally:
        again.close()


def test_an_import_never_takes_a_number_handed_out_to_an_object_not_saved_yet(open_store, tmp_path):
    here = open_store()
    pending = Task(jobname="pending")
    oid = here.assign_id(pending)  # handed out; saved later
    elsewhere = FilesystemStore(tmp_path / "elsewhere")
    assert elsewhere.save(Task(jobname="imported")) == oid  # both number from 1
    elsewhere.replace("Task.40", Task(jobname="far"))
    exported = [(i, *entry) for i, entry in elsewhere.export([oid, "Task.40"])]
    other = open_store()  # another handle, as another process would have
    with pytest.raises(SaveError, match=rf"{oid}: .*handed out number"):
        other.import_records(exported)
    assert other.list() == []
    assert here.save(pending) == oid
    other.import_records(exported[1:])  # beyond the counter: kept, and never handed out
    other.import_records(exported[1:])  # a row already there is the caller's to overwrite
    assert number(here.save(Task())) > 40
    other.invalidate_cache()
    assert [other.load(i).jobname for i in (oid, "Task.40")] == ["pending", "far"]


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 8)), max_size=12))
def test_merged_spans_hold_the_same_numbers_in_fewer_ranges(bounds):
    spans = [range(start, start + length) for start, length in bounds]
    merged = store_module._merged(spans)
    assert {n for span in merged for n in span} == {n for span in spans for n in span}
    assert all(a.stop < b.start for a, b in itertools.pairwise(merged))  # none overlap or touch


def test_a_store_directory_that_cannot_be_listed_is_a_save_error_on_adding(tmp_path, monkeypatch):
    # the first id reservation of a handle lists the records: a disk error there is no bare OSError
    make_store(str(tmp_path / "s")).save(Task())
    store = make_store(str(tmp_path / "s"))

    def failing(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(os, "scandir", failing)
    with pytest.raises(SaveError, match="cannot list the records: Input/output error") as excinfo:
        store.save(Task())
    assert excinfo.value.target == str(tmp_path / "s")


def test_a_string_where_a_list_of_ids_is_due_is_refused_as_such(store):
    oid = store.save(Task())
    for call in (store.load_many, lambda ids: list(store.iter_metadata(ids)), store.remove_many):
        with pytest.raises(InvalidArgument, match=f"expected a list of ids, not the string '{oid}'"):
            call(oid)
    assert store.list() == [oid]


def test_a_pickler_that_made_a_big_pickle_is_not_used_again(tmp_path):
    # its memo table never shrinks and clearing it walks it whole: every later small save paid for the big one
    # (speed is measured by benchmarks/run.py; this checks the mechanism)
    store = make_store(str(tmp_path / "s"))
    store.save(Task())
    (pickler,) = store.serializer._idle
    store.save(Task(strings=[str(i) for i in range(20_000)]))
    assert pickler not in store.serializer._idle
    store.save(Task())
    assert len(store.serializer._idle) == 1 and store.serializer._idle[0] is not pickler
    store.save(Task(jobname="small again"))
    assert len(store.serializer._idle) == 1  # a small pickle's pickler goes back to the pool


def test_options_beside_a_store_object_are_refused_not_ignored(tmp_path):
    # an allow-list given beside a store made already would be dropped silently
    made = make_store(str(tmp_path / "records"))
    with pytest.raises(InvalidArgument, match="options allowed_classes are for making a store"):
        make_store(made, allowed_classes=["helpers"])
    with pytest.raises(InvalidArgument, match="options allowed_classes are for making a store"):
        Session(tmp_path / "s", store_or_url=made, allowed_classes=["helpers"])
    assert make_store(made) is made


def test_a_store_of_a_plugin_gets_its_own_options_through_store_options(tmp_path, private_registry):
    # the documented way to write a store: its own options from **options, store_options(options) to the base
    class RegionStore(FilesystemStore):
        def __init__(self, url, **options):
            self.region = options["region"]  # left in: store_options drops what it does not know
            super().__init__(url.partition("://")[2], **store_module.store_options(options))

    store_module.register("region", RegionStore)
    store = make_store(f"region://{tmp_path}/records", region="us", allowed_classes=["helpers"])
    assert store.region == "us" and store.serializer.allowed == ("helpers",)
