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


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql"])
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


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql"])
def test_a_foreign_id_with_another_prefix_and_the_same_number_is_refused_too(two_stores: Any, kind: str) -> None:
    here, there = two_stores(kind)
    oid = here.save(Task("mine"))
    foreign = TaskCollection("foreign")
    other = there.save(foreign)
    assert parse_id(other)[1] == parse_id(oid)[1] and other != oid
    if kind == "file":  # files are named by the whole id: no clash
        assert here.save(foreign) == other
        assert here.load(oid).jobname == "mine"
    else:  # SQL rows are keyed by the number
        with pytest.raises(SaveError, match="another object"):
            here.save(foreign)
        here.invalidate_cache()
        assert here.load(oid).jobname == "mine"


@pytest.mark.parametrize("kind", ["file", "sqlite", "postgresql"])
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
        with pytest.raises(SaveError, match="another object"):
            b.add(theirs)
        assert b.list_ids() == [oid]
    assert Session(tmp_path / "b", autoload_plugins=False).tasks[oid].jobname == "mine"
