"""Objects that carry an id from another store never overwrite what this store holds under that id."""

from __future__ import annotations

from typing import Any

import pytest

from gc3session import SaveError, Session, Task, TaskCollection
from gc3session.persistence import make_store
from gc3session.persistence.idfactory import parse_id


@pytest.fixture
def two_stores(store_url_of: Any) -> Any:
    """``two_stores(kind)`` gives two fresh stores of that kind (both numbering from 1); all are closed afterwards."""
    opened: list[Any] = []

    def open_two(kind: str) -> tuple[Any, Any]:
        opened.extend([make_store(store_url_of(kind)), make_store(store_url_of(kind))])
        return opened[-2], opened[-1]

    yield open_two
    for store in opened:
        store.close()


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql", "mysql"])
def test_an_object_from_another_store_does_not_overwrite_a_different_object(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    mine = Task("mine")
    oid = here.save(mine)
    foreign = Task("foreign")
    assert there.save(foreign) == oid  # both stores start numbering at the same place
    with pytest.raises(SaveError, match=f"{oid}.*another object"):
        here.save(foreign)
    here.invalidate_cache()
    assert here.load(oid).jobname == "mine"


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql", "mysql"])
def test_a_foreign_id_with_another_prefix_and_the_same_number_is_refused_too(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    oid = here.save(Task("mine"))
    foreign = TaskCollection("foreign")
    other = there.save(foreign)
    assert parse_id(other)[1] == parse_id(oid)[1] and other != oid
    # SQL rows are keyed by the number; files are named by the whole id, but the number is handed out already
    with pytest.raises(SaveError, match=f"{other}: .*(another object|handed out number 1 already)"):
        here.save(foreign)
    here.invalidate_cache()
    assert here.load(oid).jobname == "mine"
    assert here.list() == [oid]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_a_foreign_id_whose_number_was_handed_out_here_is_refused(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    kept = here.save(Task("kept"))
    gone = here.save(Task("gone"))
    here.remove(gone)
    spare = here._numbers[-1] if here._numbers else None  # a number this handle reserved and has not used yet
    foreign = [Task(f"foreign{i}") for i in range(6)]
    there.save_many(foreign)
    by_number = {parse_id(t.persistent_id)[1]: t for t in foreign}
    with pytest.raises(SaveError, match="handed out number"):
        here.save(by_number[parse_id(gone)[1]])  # its slot is free, but a removed object had that number
    if spare is not None:
        with pytest.raises(SaveError, match="handed out number"):
            here.save(by_number[spare])  # a new object of ``here`` would get it
    assert here.list() == [kept]


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql", "mysql"])
def test_a_foreign_number_beyond_the_counter_is_kept_and_never_handed_out(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    here.save(Task("first"))  # ``here`` now holds a reserved block of numbers
    for _ in range(40):
        there.save(Task("filler"))
    foreign = Task("foreign")
    fid = there.save(foreign)
    assert here.save(foreign) == fid
    new_ids = here.save_many([Task(f"new{i}") for i in range(100)])
    assert fid not in new_ids
    here.invalidate_cache()
    assert here.load(fid).jobname == "foreign"


def test_two_foreign_objects_with_one_number_in_a_batch_are_refused(two_stores: Any) -> None:
    here, there = two_stores("file")
    _, elsewhere = two_stores("file")
    a, b = Task("a"), TaskCollection("b")
    for _ in range(3):
        there.save(Task("filler"))
        elsewhere.save(Task("filler"))
    there.save(a)
    elsewhere.save(b)
    assert parse_id(a.persistent_id)[1] == parse_id(b.persistent_id)[1]
    with pytest.raises(SaveError, match="also saved in this batch"):
        here.save_many([a, b])
    assert here.list() == []


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql", "mysql"])
def test_a_foreign_object_under_a_free_id_is_saved_there_with_its_children(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    for _ in range(5):
        there.save(Task("filler"))
    child = Task("child")
    parent = TaskCollection("parent", tasks=[child])
    pid = there.save(parent)
    reader = make_store(there.url)
    loaded = reader.load(pid)  # unchanged, and unknown to ``here``
    reader.close()
    assert here.save(loaded) == pid
    here.invalidate_cache()
    again = here.load(pid)
    assert again.tasks[0].jobname == "child"  # the child came along: no dangling reference
    fresh = here.save(Task("new"))
    assert parse_id(fresh)[1] > parse_id(child.persistent_id)[1]  # the counter moved past them


def test_the_same_store_through_another_handle_is_no_foreign_store(tmp_path: Any, store_url_of: Any) -> None:
    url = store_url_of("sqlite")
    first, second = make_store(url), make_store(url)
    try:
        oid = first.save(Task("shared"))
        task = first.load(oid)
        task.state = "RUNNING"
        assert second.save(task) == oid
        second.invalidate_cache()
        assert second.load(oid).state == "RUNNING"
    finally:
        first.close()
        second.close()


def test_replace_still_overwrites_on_purpose(two_stores: Any) -> None:
    here, there = two_stores("file")
    oid = here.save(Task("mine"))
    foreign = Task("foreign")
    there.save(foreign)
    here.replace(oid, foreign)
    here.invalidate_cache()
    assert here.load(oid).jobname == "foreign"


def test_adding_a_task_from_another_session_keeps_both_sessions_whole(tmp_path: Any) -> None:
    with Session(tmp_path / "a", autoload_plugins=False) as a, Session(tmp_path / "b", autoload_plugins=False) as b:
        theirs = Task("theirs")
        a.add(theirs)
        mine = Task("mine")
        oid = b.add(mine)
        assert theirs.persistent_id == oid
        with pytest.raises(SaveError, match="another task under this id"):
            b.add(theirs)
        with pytest.raises(SaveError, match="another task under this id"):
            b.add(theirs, flush=False)
        assert b.list_ids() == [oid] and b.tasks[oid] is mine
        mine.state = "TERMINATED"
    reopened = Session(tmp_path / "b", autoload_plugins=False).tasks[oid]
    assert reopened.jobname == "mine" and reopened.state == "TERMINATED"
