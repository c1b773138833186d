"""Ids: their syntax, the file counter, the per-user data directory."""

from __future__ import annotations

import helpers
import pytest

from gc3session import InvalidArgument, Task, TaskCollection
from gc3session.exceptions import RepairWarning
from gc3session.persistence import FilesystemStore, IdFactory
from gc3session.persistence.filesystem import COUNTER_FILENAME
from gc3session.persistence.idfactory import DATA_DIR_VARIABLE, FileCounter, is_id, parse_id, user_data_dir


@pytest.mark.parametrize(
    ("oid", "expected"),
    [
        ("Task.17", ("Task", 17)),
        ("Task.1", ("Task", 1)),
        ("TaskCollection.1024", ("TaskCollection", 1024)),
        ("_private.3", ("_private", 3)),
        ("Tâche.5", ("Tâche", 5)),
        ("Fit2.90000000000", ("Fit2", 90000000000)),
    ],
)
def test_parse_id_accepts_valid_ids(oid, expected):
    assert parse_id(oid) == expected
    assert is_id(oid)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "",
        "Task.017",
        "Task.0",
        "Task",
        "Task.",
        ".17",
        "17",
        "Task.-1",
        "Task.1.2",
        "Task.1 ",
        " Task.1",
        "Task.1\n",
        "2Task.1",
        "Ta sk.1",
        "Task/1",
        "Task.\u0661",  # ARABIC-INDIC DIGIT ONE: not an ASCII digit
        "Task.1e3",
    ],
)
def test_parse_id_rejects_anything_else(bad):
    with pytest.raises(InvalidArgument) as excinfo:
        parse_id(bad)
    assert repr(bad) in str(excinfo.value)
    assert not is_id(bad)


@pytest.mark.parametrize("bad", [None, 17, b"Task.1", ("Task", 1)])
def test_parse_id_rejects_non_strings(bad):
    with pytest.raises(InvalidArgument):
        parse_id(bad)


def test_invalid_argument_is_a_value_error():
    with pytest.raises(ValueError):
        parse_id("Task.0")


def test_id_factory_formats_with_the_class_name_or_a_prefix():
    assert IdFactory().format(Task(), 3) == "Task.3"
    assert IdFactory().format(TaskCollection(), 4) == "TaskCollection.4"
    assert IdFactory(prefix="Job").format(Task(), 5) == "Job.5"


def test_id_factory_falls_back_when_the_class_name_is_no_prefix():
    odd = type("not-a-name", (), {})()
    factory = IdFactory()
    assert factory.format(odd, 2) == "Object.2"
    assert factory.format(odd, 3) == "Object.3"  # the prefix of each class is worked out once, then reused
    assert factory.format(Task(), 4) == "Task.4"


def test_id_factory_follows_a_prefix_set_later():
    factory = IdFactory()
    assert factory.format(Task(), 1) == "Task.1"
    factory.prefix = "Job"
    assert factory.format(Task(), 2) == "Job.2"
    factory.prefix = "not valid"
    assert factory.format(Task(), 3) == "Object.3"
    factory.prefix = None
    assert factory.format(Task(), 4) == "Task.4"


@pytest.mark.parametrize("bad", ["", "has space", "1abc", "a.b", "../x"])
def test_id_factory_refuses_a_bad_prefix(bad):
    with pytest.raises(InvalidArgument):
        IdFactory(prefix=bad)


def test_store_uses_its_id_factory_prefix(tmp_path):
    store = FilesystemStore(tmp_path / "s", idfactory=IdFactory(prefix="Job"))
    oid = store.save(Task())
    assert oid.startswith("Job.")
    assert FilesystemStore(tmp_path / "s").load(oid).persistent_id == oid


# -- FileCounter ----------------------------------------------------------------------


def test_file_counter_hands_out_consecutive_numbers(tmp_path):
    counter = FileCounter(tmp_path / "counter")
    assert list(counter.reserve(1)) == [1]
    assert list(counter.reserve(3)) == [2, 3, 4]
    assert (tmp_path / "counter").read_text().strip() == "5"
    assert list(FileCounter(tmp_path / "counter").reserve(2)) == [5, 6]


def test_file_counter_starts_where_told(tmp_path):
    counter = FileCounter(tmp_path / "counter", start=lambda: 100)
    assert list(counter.reserve(2)) == [100, 101]
    assert list(counter.reserve(1)) == [102]


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-5", b"0", b"1.5", b"\x00\x01", b"\xff\xfe7\n", b"1" * 25 + b"\n", b"\xd9\xa3\n"]
)  # the last three: not UTF-8, a number no id can hold, a digit that is not ASCII
def test_a_damaged_counter_restarts_at_start(tmp_path, content):
    path = tmp_path / "counter"
    path.write_bytes(content)
    counter = FileCounter(path, start=lambda: 42)
    with pytest.warns(RepairWarning, match="damaged"):
        assert list(counter.reserve(1)) == [42]
    assert path.read_text().strip() == "43"


def test_a_damaged_store_counter_restarts_above_the_highest_id(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task()) for _ in range(3)]
    store.remove(ids[0])
    (tmp_path / "s" / COUNTER_FILENAME).write_text("not a number\n")
    fresh = FilesystemStore(tmp_path / "s")
    with pytest.warns(RepairWarning, match="damaged"):
        new = fresh.save(Task())
    assert parse_id(new)[1] == max(parse_id(oid)[1] for oid in ids) + 1


def test_a_missing_store_counter_restarts_above_the_highest_id(tmp_path):
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task()) for _ in range(3)]
    (tmp_path / "s" / COUNTER_FILENAME).unlink()
    new = FilesystemStore(tmp_path / "s").save(Task())
    assert parse_id(new)[1] == max(parse_id(oid)[1] for oid in ids) + 1


def test_a_counter_behind_the_records_does_not_overwrite_them(tmp_path):
    """A counter that went back (restored from an old backup, edited by hand) must not reuse an id."""
    store = FilesystemStore(tmp_path / "s")
    ids = [store.save(Task(jobname=str(i))) for i in range(3)]
    (tmp_path / "s" / COUNTER_FILENAME).write_text("1\n")
    with pytest.warns(RepairWarning, match="behind"):
        new = FilesystemStore(tmp_path / "s").save(Task(jobname="new"))
    assert new not in ids
    assert parse_id(new)[1] > max(parse_id(oid)[1] for oid in ids)
    assert FilesystemStore(tmp_path / "s").metadata(ids[0])["jobname"] == "0"


def test_file_counter_never_hands_out_a_number_twice_across_processes(tmp_path):
    path = str(tmp_path / "counter")
    results = helpers.run_in_processes(helpers.reserve_numbers, [(path, 50)] * 4, str(tmp_path / "gate"))
    numbers = [n for result in results for n in result]
    assert len(numbers) == 200
    assert sorted(numbers) == list(range(1, 201))
    for result in results:
        assert result == sorted(result), "each process sees the counter move forward"


# -- the per-user data directory -----------------------------------------------------


def test_data_dir_variable_moves_the_global_counter(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path / "data"))
    assert user_data_dir() == tmp_path / "data"
    assert (tmp_path / "data").is_dir()
    factory = IdFactory()
    assert factory.new(Task()) == "Task.1"
    assert factory.new(TaskCollection()) == "TaskCollection.2"
    assert IdFactory().new(Task()) == "Task.3", "a new factory continues the same counter"
    assert (tmp_path / "data" / "next_id.txt").read_text().strip() == "4"


def test_data_dir_variable_name():
    assert DATA_DIR_VARIABLE == "GC3SESSION_DATA_DIR"


def test_id_factory_with_its_own_counter(tmp_path):
    factory = IdFactory(counter=FileCounter(tmp_path / "c", start=lambda: 10))
    assert factory.new(Task()) == "Task.10"
    assert factory.new(Task()) == "Task.11"


def test_stores_do_not_use_the_global_counter(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path / "data"))
    FilesystemStore(tmp_path / "s").save(Task())
    assert not (tmp_path / "data" / "next_id.txt").exists()
