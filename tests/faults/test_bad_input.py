"""Bad input: damaged session files, hostile ids, corrupt records and rows.

Every bad input must end in a clear ``gc3session.exceptions`` error that
names the file or id at fault (never a bare KeyError, IndexError,
UnpicklingError, JSONDecodeError, UnicodeDecodeError, OSError...), and must
never cost any other data: the session's other tasks still load, and a later
flush keeps a damaged id in ``index.txt`` for a person to repair.

Ids are never paths: an id such as ``../../etc/passwd`` (in a call, in the
index, or as a reference inside a record) is refused before it reaches the
filesystem, which an audit hook proves by recording every file the library
opens, creates, renames or removes; and a session file that is a symlink
leading outside the session is never written through.  ``session-tool``
reads the same damaged metadata without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gc3session import Session, Task, TaskCollection
from gc3session.cli import main as session_tool
from gc3session.exceptions import (
    Error,
    InvalidArgument,
    LoadError,
    LoadWarning,
    RunRecordWarning,
    SaveError,
    SessionError,
)
from gc3session.persistence import FilesystemStore, Store, make_store
from gc3session.persistence.filesystem import encode_record
from gc3session.persistence.idfactory import parse_id

KINDS = ["file", "sqlite", "postgresql", "mysql"]


# -- fixtures and helpers ----------------------------------------------------------


@pytest.fixture
def new_session(tmp_path, store_url_of) -> Callable[[str], Session]:
    """A new session of a kind: ``file`` keeps its store inside the session directory (the default)."""
    created: list[Session] = []

    def make(kind: str, name: str = "s") -> Session:
        path = tmp_path / name
        session = Session(path) if kind == "file" else Session(path, store_or_url=store_url_of(kind))
        created.append(session)
        return session

    yield make
    for session in created:
        session.store.close()


def index_of(session_path: str | Path) -> list[str]:
    """The non-blank lines of a session's index, as text."""
    text = Path(session_path, "index.txt").read_text("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def reopen(path: str | Path, **kwargs: Any) -> Session:
    return Session(path, **kwargs)


def assert_names(error: BaseException, *names: str) -> None:
    """``error`` is a gc3session error whose message names each of ``names``."""
    assert isinstance(error, Error), f"{type(error).__name__} is not a gc3session error: {error}"
    for name in names:
        assert name in str(error), f"{name!r} not named in: {error}"


def sample(session: Session) -> dict[str, str]:
    """Three tasks and a collection with a child: ``{role: id}``."""
    ids = {
        "first": session.add(Task(jobname="first")),
        "victim": session.add(Task(jobname="victim", payload=list(range(50)))),
        "third": session.add(Task(jobname="third")),
    }
    ids["grid"] = session.add(TaskCollection(jobname="grid", tasks=[Task(jobname="child")]))
    ids["child"] = session.tasks[ids["grid"]].tasks[0].persistent_id
    return ids


# -- raw access to records: files or rows -------------------------------------------


class Raw:
    """Read and overwrite a stored record as it is, without going through the store's checks."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sql = not isinstance(store, FilesystemStore)

    def get(self, oid: str) -> tuple[str, bytes]:
        """``(metadata text, pickle)`` of a healthy record."""
        if self.sql:
            table = self.store.table
            with self.store.engine.connect() as conn:
                meta, data = conn.execute(
                    sa.select(table.c.meta, table.c.data).where(table.c.id == parse_id(oid)[1])
                ).one()
            return meta, bytes(data)
        content = Path(self.store.directory, oid).read_bytes()
        assert content.startswith(b"["), "a record file starts with its listing line"
        line, _, data = content.partition(b"\n")[2].partition(b"\n")
        return line.decode("ascii"), data

    def put(self, oid: str, meta: str, data: bytes) -> None:
        """Overwrite the record; a file gets no listing line, so that listings read ``meta`` too."""
        if self.sql:
            table = self.store.table
            with self.store.engine.begin() as conn:
                moved = conn.execute(
                    sa.update(table).where(table.c.id == parse_id(oid)[1]).values(meta=meta, data=data)
                )
            assert moved.rowcount == 1
        else:
            Path(self.store.directory, oid).write_bytes(meta.encode("utf-8", "surrogateescape") + b"\n" + data)

    def put_file(self, oid: str, content: bytes) -> None:
        assert not self.sql
        Path(self.store.directory, oid).write_bytes(content)

    def delete(self, oid: str) -> None:
        if self.sql:
            table = self.store.table
            with self.store.engine.begin() as conn:
                conn.execute(sa.delete(table).where(table.c.id == parse_id(oid)[1]))
        else:
            os.unlink(Path(self.store.directory, oid))

    def snapshot(self, oid: str) -> Any:
        """Whatever is stored for ``oid`` right now, to compare later."""
        if self.sql:
            table = self.store.table
            with self.store.engine.connect() as conn:
                row = conn.execute(
                    sa.select(table.c.persistent_id, table.c.meta, table.c.data).where(table.c.id == parse_id(oid)[1])
                ).first()
            return None if row is None else (row[0], row[1], bytes(row[2]))
        path = Path(self.store.directory, oid)
        if path.is_dir():
            return "a directory"
        return path.read_bytes() if path.exists() else None


def meta_text(meta: Any) -> str:
    return json.dumps(meta, separators=(",", ":"))


def with_checks(meta: dict[str, Any], data: bytes) -> dict[str, Any]:
    """``meta`` with size and checksum that match ``data``."""
    return {**meta, "size": len(data), "crc32": zlib.crc32(data)}


def without_checks(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in ("size", "crc32")}


JUNK = bytes(range(256)).replace(b"\n", b"") * 3

#: name -> damage(raw, victim id, other id); each leaves a record that must not load.
Damage = Callable[[Raw, str, str], None]


def _empty(raw: Raw, oid: str, other: str) -> None:
    if raw.sql:
        raw.put(oid, "", b"")
    else:
        raw.put_file(oid, b"")


def _truncated_pickle(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    raw.put(oid, meta, data[: len(data) // 2])


def _truncated_pickle_without_checks(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    raw.put(oid, meta_text(without_checks(json.loads(meta))), data[: len(data) // 2])


def _truncated_metadata(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    if raw.sql:
        raw.put(oid, meta[: len(meta) // 2], data)
    else:
        raw.put_file(oid, meta.encode()[: len(meta) // 2])  # cut inside the first line


def _pickle_only(raw: Raw, oid: str, other: str) -> None:
    _meta, data = raw.get(oid)
    if raw.sql:
        raw.put(oid, "", data)
    else:
        raw.put_file(oid, data)


def _metadata_not_json(raw: Raw, oid: str, other: str) -> None:
    _meta, data = raw.get(oid)
    raw.put(oid, "{'id': 'not json'", data)


def _metadata_binary(raw: Raw, oid: str, other: str) -> None:
    _meta, data = raw.get(oid)
    if raw.sql:
        raw.put(oid, "\x01\x02\ufffd\x7f junk", data)
    else:
        raw.put_file(oid, JUNK[:100] + b"\n" + data)


def _metadata_json_of(value: Any) -> Damage:
    def damage(raw: Raw, oid: str, other: str) -> None:
        _meta, data = raw.get(oid)
        raw.put(oid, meta_text(value), data)

    return damage


def _metadata_without_id(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    raw.put(oid, meta_text({k: v for k, v in json.loads(meta).items() if k != "id"}), data)


def _junk_pickle(raw: Raw, oid: str, other: str) -> None:
    meta, _data = raw.get(oid)
    raw.put(oid, meta_text(with_checks(json.loads(meta), JUNK)), JUNK)


def _junk_pickle_without_checks(raw: Raw, oid: str, other: str) -> None:
    meta, _data = raw.get(oid)
    raw.put(oid, meta_text(without_checks(json.loads(meta))), JUNK)


def _binary_junk(raw: Raw, oid: str, other: str) -> None:
    if raw.sql:
        raw.put(oid, "\ufffd\ufffd", JUNK)
    else:
        raw.put_file(oid, JUNK)


def _another_objects_record(raw: Raw, oid: str, other: str) -> None:
    raw.put(oid, *raw.get(other))


def _another_objects_pickle(raw: Raw, oid: str, other: str) -> None:
    meta, _ = raw.get(oid)
    _, data = raw.get(other)
    raw.put(oid, meta_text(with_checks(json.loads(meta), data)), data)


def _wrong_size(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    fields = json.loads(meta)
    raw.put(oid, meta_text({**fields, "size": fields["size"] + 1}), data)


def _wrong_crc(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    fields = json.loads(meta)
    raw.put(oid, meta_text({**fields, "crc32": fields["crc32"] ^ 1}), data)


def _flipped_byte(raw: Raw, oid: str, other: str) -> None:
    meta, data = raw.get(oid)
    middle = len(data) // 2
    raw.put(oid, meta, data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :])


def _missing(raw: Raw, oid: str, other: str) -> None:
    raw.delete(oid)


def _a_directory(raw: Raw, oid: str, other: str) -> None:
    raw.delete(oid)
    Path(raw.store.directory, oid).mkdir()


DAMAGES: dict[str, Damage] = {
    "empty": _empty,
    "truncated-pickle": _truncated_pickle,
    "truncated-pickle-without-checks": _truncated_pickle_without_checks,
    "truncated-metadata": _truncated_metadata,
    "pickle-without-metadata": _pickle_only,
    "metadata-not-json": _metadata_not_json,
    "metadata-binary": _metadata_binary,
    "metadata-a-list": _metadata_json_of([1, 2, 3]),
    "metadata-a-string": _metadata_json_of("Task.1"),
    "metadata-null": _metadata_json_of(None),
    "metadata-a-number": _metadata_json_of(42),
    "metadata-without-id": _metadata_without_id,
    "junk-pickle": _junk_pickle,
    "junk-pickle-without-checks": _junk_pickle_without_checks,
    "binary-junk": _binary_junk,
    "another-objects-record": _another_objects_record,
    "another-objects-pickle": _another_objects_pickle,
    "wrong-size": _wrong_size,
    "wrong-crc": _wrong_crc,
    "flipped-byte": _flipped_byte,
    "missing": _missing,
    "a-directory": _a_directory,
}


# -- damaged records and rows --------------------------------------------------------


# a record that is a directory only exists in the filesystem store
DAMAGE_CASES = [(kind, damage) for kind in KINDS for damage in DAMAGES if damage != "a-directory" or kind == "file"]


@pytest.mark.parametrize(("kind", "damage"), DAMAGE_CASES)
def test_a_damaged_record_is_reported_by_id_and_costs_nothing_else(new_session, kind, damage):
    session = new_session(kind)
    ids = sample(session)
    victim = ids["victim"]
    raw = Raw(session.store)
    DAMAGES[damage](raw, victim, ids["third"])
    damaged = raw.snapshot(victim)

    # reopening reports the damaged id, and only that one; the others load
    with pytest.warns(LoadWarning, match=re.escape(victim)):
        again = reopen(session.path)
    assert list(again.load_errors) == [victim]
    error = again.load_errors[victim]
    assert isinstance(error, LoadError)
    assert error.id == victim
    assert_names(error, victim)
    assert sorted(again.list_ids()) == sorted([ids["first"], ids["third"], ids["grid"]])
    assert {again.tasks[oid].jobname for oid in again.list_ids()} == {"first", "third", "grid"}
    assert again.tasks[ids["grid"]].tasks[0].jobname == "child"

    # loading it on purpose raises LoadError naming it, on the session and on the store
    with pytest.raises(LoadError) as excinfo:
        again.load(victim)
    assert excinfo.value.id == victim
    with pytest.raises(LoadError) as excinfo:
        again.store.load_many([ids["first"], victim])
    assert excinfo.value.id == victim
    errors: dict[str, LoadError] = {}
    loaded = again.store.load_many([ids["first"], victim, ids["third"]], errors=errors)
    assert list(loaded) == [ids["first"], ids["third"]]
    assert list(errors) == [victim]

    # reading metadata never raises anything but LoadError
    try:
        again.store.metadata(victim)
    except LoadError as error:
        assert error.id == victim
    for oid, meta in again.store.iter_metadata([ids["first"], victim]):
        assert isinstance(meta, dict) or (isinstance(meta, LoadError) and meta.id == oid)
    listed = dict(again.store.iter_metadata())
    assert listed[ids["third"]]["jobname"] == "third"
    summaries = dict(again.store.iter_summaries())
    assert summaries[ids["first"]]["jobname"] == "first"

    # later work: an append, a rewrite of the index, save_all, flush
    new = again.add(Task(jobname="new"))
    again.remove(ids["first"])
    again.tasks[ids["third"]].execution.state = "RUNNING"
    again.save_all()
    again.flush()
    assert victim in index_of(again.path)
    assert sorted(index_of(again.path)) == sorted([victim, ids["third"], ids["grid"], new])
    assert raw.snapshot(victim) == damaged, "the damaged record was changed: a person can no longer repair it"
    again.close()

    with pytest.warns(LoadWarning, match=re.escape(victim)):
        third = reopen(session.path)
    assert list(third.load_errors) == [victim]
    assert third.tasks[ids["third"]].state == "RUNNING"
    assert third.tasks[new].jobname == "new"


@pytest.mark.parametrize(
    "field, value",
    [
        ("references", 5),
        ("references", [5, None, {"a": 1}]),
        ("references", "Task.1"),
        ("children", 5),
        ("children", [5, None, ["x"]]),
        ("children", {"Task.1": 1}),
        ("history", "not a list"),
        ("history", [[1, 2, 3], "x", None]),
        ("size", "12"),
        ("crc32", [1]),
        ("jobname", {"a": [1]}),
        ("state", 17),
        ("cls", None),
        ("created", "yesterday"),
        ("format", 999),
    ],
)
@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_metadata_fields_of_the_wrong_type_never_raise_a_bare_error(new_session, kind, field, value):
    session = new_session(kind)
    ids = sample(session)
    victim = ids["victim"]
    raw = Raw(session.store)
    meta, data = raw.get(victim)
    raw.put(victim, meta_text({**json.loads(meta), field: value}), data)

    # opening: the task loads, or it is reported; the others load either way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = reopen(session.path)
    assert all(issubclass(w.category, LoadWarning) for w in caught), [str(w.message) for w in caught]
    assert set(again.load_errors) <= {victim}
    assert {ids["first"], ids["third"], ids["grid"]} <= set(again.list_ids())
    for _oid, meta in again.store.iter_metadata():
        assert isinstance(meta, (dict, LoadError))
    list(again.store.iter_summaries())
    again.add(Task(jobname="new"))
    again.save_all()
    assert victim in index_of(again.path)

    # session-tool reads the same metadata: one clear line at worst, never a traceback
    for args in (["ls", "--recursive"], ["ls", "--format", "json"], ["ls", "--format", "csv"], ["show", None],
                 ["log"], ["stats"], ["verify"], ["rm", "--dry-run", None]):
        argv = [args[0], again.path, *[victim if a is None else a for a in args[1:]]]
        result = CliRunner().invoke(session_tool, argv)
        assert result.exit_code in (0, 1), (argv, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, repr(result.exception))
        assert "Traceback" not in result.output

    # removing it without loading it reads its metadata for children: a bad field must not break that
    lazy = reopen(session.path, task_ids=[])
    lazy.remove(victim)
    assert victim not in index_of(session.path)
    assert ids["first"] in index_of(session.path)
    assert raw.snapshot(victim) is None


# -- the index --------------------------------------------------------------------


def test_index_blank_lines_duplicates_and_crlf_are_tolerated_and_a_rewrite_keeps_every_id(new_session):
    session = new_session("file")
    ids = sample(session)
    a, b, c = ids["first"], ids["victim"], ids["third"]
    grid = ids["grid"]
    Path(session.path, "index.txt").write_bytes(
        f"\n\n{a}\r\n  {b}\t\n\n{a}\n{c}\r\n{b}\n\n   \n{grid}\n{c}\n".encode()
    )
    again = reopen(session.path)
    assert again.list_ids() == [a, b, c, grid]
    assert again.load_errors == {}
    again.add(Task(jobname="new"))  # append after the messy lines
    assert index_of(again.path).count(a) == 2
    again.remove(b)  # a rewrite: duplicates collapse, nothing else goes
    lines = index_of(again.path)
    assert sorted(set(lines)) == sorted({a, c, grid, *again.list_ids()})
    assert b not in lines
    assert reopen(session.path).list_ids() == again.list_ids()


JUNK_LINES = {
    "binary": JUNK[:200],
    "traversal": b"../../etc/passwd",
    "absolute-path": b"/etc/passwd",
    "traversal-after-an-id": b"Task.1/../../../etc/passwd",
    "nul-after-an-id": b"Task.1\x00",
    "nul-inside-an-id": b"Task\x00.1",
    "nul-alone": b"\x00\x00\x00",
    "dot-dot": b"..",
    "leading-zero": b"Task.01",
    "negative": b"Task.-1",
    "no-number": b"Task.",
    "utf8-bom": b"\xef\xbb\xbfTask.1",
    "a-megabyte-line": b"x" * (1 << 20),
}


@pytest.mark.parametrize("junk", list(JUNK_LINES))
def test_an_index_line_that_is_no_id_is_a_session_error_naming_the_file_and_costs_nothing(new_session, junk):
    session = new_session("file")
    ids = sample(session)
    index = Path(session.path, "index.txt")
    content = index.read_bytes() + JUNK_LINES[junk] + b"\n" + b"Task.1\n"
    index.write_bytes(content)
    records = {oid: Path(session.store.directory, oid).read_bytes() for oid in ids.values()}

    with pytest.raises(SessionError) as excinfo:
        reopen(session.path)
    assert excinfo.value.path == str(index)
    assert_names(excinfo.value, str(index), "line 5")
    assert len(str(excinfo.value)) < 1000, "the message quotes a whole megabyte"

    # nothing was written: the index and every record are as they were, and load
    assert index.read_bytes() == content
    store = make_store(session.store.directory)
    for oid, record in records.items():
        assert Path(session.store.directory, oid).read_bytes() == record
    assert {oid: t.jobname for oid, t in store.load_many(ids.values()).items()}[ids["victim"]] == "victim"
    store.close()


@pytest.mark.parametrize("junk", ["binary", "traversal", "nul-after-an-id", "a-megabyte-line"])
def test_a_junk_index_line_written_while_a_session_is_open_survives_its_rewrites(new_session, junk):
    """A line someone else wrote is never dropped or changed by a flush: a person may want to fix it."""
    session = new_session("file")
    ids = sample(session)
    index = Path(session.path, "index.txt")
    line = JUNK_LINES[junk]
    with open(index, "ab") as f:
        f.write(line + b"\n")
    session.add(Task(jobname="appended"))  # append
    session.remove(ids["first"])  # rewrite
    session.forget(ids["third"])  # rewrite
    lines = index.read_bytes().split(b"\n")
    assert line in lines, "a rewrite changed or dropped a line it does not understand"
    assert ids["victim"].encode() in lines
    assert ids["first"].encode() not in lines


def test_a_long_torn_last_line_does_not_swallow_the_next_id(new_session):
    """A write cut short leaves a last line without newline; the next add must not glue its id to it."""
    session = new_session("file")
    first = session.add(Task(jobname="first"))
    index = Path(session.path, "index.txt")
    with open(index, "ab") as f:
        f.write(b"J" * 10_000)  # torn: no newline, longer than any block read at once
    again = reopen(session.path)
    assert again.list_ids() == [first]
    added = again.add(Task(jobname="added"))
    third = reopen(session.path)
    assert third.load_errors == {}
    assert third.list_ids() == [first, added], f"index now holds {index_of(session.path)!r:.200}"


@pytest.mark.parametrize(
    "bad_id",
    [
        "Task." + "9" * 19,  # just above a 64-bit integer
        "Task." + "9" * 40,
        "Task." + "1" * 5000,  # more digits than int() converts by default
        "T" * 300 + ".1",  # longer than a file name may be
    ],
    ids=["19-digits", "40-digits", "5000-digits", "300-letter-prefix"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_an_index_id_out_of_range_is_reported_and_costs_nothing(new_session, kind, bad_id):
    session = new_session(kind)
    ids = sample(session)
    index = Path(session.path, "index.txt")
    with open(index, "a") as f:
        f.write(bad_id + "\n")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = reopen(session.path)
    except SessionError as error:  # refusing the whole index is fine, if it names the file
        assert error.path == str(index)
        assert len(str(error)) < 1000
        again = None
    if again is not None:
        assert [w.category for w in caught] == [LoadWarning]
        assert list(again.load_errors) == [bad_id]
        assert_names(again.load_errors[bad_id])
        assert sorted(again.list_ids()) == sorted([ids["first"], ids["victim"], ids["third"], ids["grid"]])
        again.add(Task(jobname="new"))
        again.remove(ids["first"])
        assert bad_id in index_of(session.path)
    # asking the store for it directly: an error naming it, never a bare one
    store = make_store(session.store.url) if kind != "file" else make_store(session.store.directory)
    try:
        with pytest.raises(Error):
            store.load(bad_id)
        with pytest.raises(Error):
            store.metadata(bad_id)
        try:
            store.remove_many([bad_id])  # quiet, or a clear error
        except Error:
            pass
        assert store.load(ids["victim"]).jobname == "victim"
    finally:
        store.close()


# -- store.url --------------------------------------------------------------------

STORE_URLS: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "blank-lines": b"\n  \n\t\n",
    "binary": JUNK[:300],
    "invalid-utf8": b"\xff\xfejobs\n",
    "nul-byte": b"jobs\x00evil\n",
    "unknown-scheme": b"gopher://example.org/store\n",
    "malformed-port": b"postgresql+psycopg://user@127.0.0.1:notaport/db\n",
    "a-100k-line": b"x" * 100_000 + b"\n",
}


@pytest.mark.parametrize("problem", list(STORE_URLS))
def test_a_bad_store_url_is_an_error_naming_the_file_and_costs_nothing(new_session, problem):
    session = new_session("file")
    ids = sample(session)
    url_file = Path(session.path, "store.url")
    index_before = Path(session.path, "index.txt").read_bytes()
    content = STORE_URLS[problem]
    url_file.unlink()
    if content is not None:
        url_file.write_bytes(content)

    with pytest.raises(Error) as excinfo:
        reopen(session.path)
    assert_names(excinfo.value, "store.url")
    assert len(str(excinfo.value)) < 2000
    if problem == "unknown-scheme":
        assert_names(excinfo.value, "gopher")

    # nothing was rewritten, nothing lost: put the URL back and everything loads
    assert Path(session.path, "index.txt").read_bytes() == index_before
    assert (url_file.read_bytes() if url_file.exists() else None) == content
    url_file.write_text("jobs\n")
    again = reopen(session.path)
    assert sorted(again.list_ids()) == sorted([ids["first"], ids["victim"], ids["third"], ids["grid"]])


# -- files and directories swapped ---------------------------------------------------


def _swap_to_directory(path: Path) -> None:
    if path.exists():
        path.unlink()
    path.mkdir()
    (path / "something").write_text("x")


@pytest.mark.parametrize("name", ["index.txt", "store.url"])
def test_a_session_file_that_is_a_directory_is_a_session_error(new_session, name):
    session = new_session("file")
    ids = sample(session)
    path = Path(session.path, name)
    saved = path.read_bytes()
    _swap_to_directory(path)
    with pytest.raises(SessionError) as excinfo:
        reopen(session.path)
    assert excinfo.value.path == str(path)
    assert (path / "something").exists(), "the directory in the way was touched"
    shutil.rmtree(path)
    path.write_bytes(saved)
    assert sorted(reopen(session.path).list_ids()) == sorted([ids["first"], ids["victim"], ids["third"], ids["grid"]])


def test_a_store_directory_that_is_a_file_is_an_error_naming_it(new_session):
    session = new_session("file")
    ids = sample(session)
    jobs = Path(session.store.directory)
    jobs.rename(jobs.with_name("jobs-aside"))
    jobs.write_text("not a directory")
    with pytest.raises(Error) as excinfo:
        reopen(session.path)
    assert_names(excinfo.value, str(jobs))
    assert jobs.read_text() == "not a directory"
    jobs.unlink()
    jobs.with_name("jobs-aside").rename(jobs)
    assert reopen(session.path).tasks[ids["victim"]].jobname == "victim"


def test_a_session_path_that_is_a_file_is_a_session_error(tmp_path):
    path = tmp_path / "s"
    path.write_text("precious")
    with pytest.raises(SessionError) as excinfo:
        Session(path)
    assert excinfo.value.path == str(path)
    assert path.read_text() == "precious"


def test_a_counter_that_is_a_directory_fails_add_with_an_error_naming_it(new_session):
    session = new_session("file")
    ids = sample(session)
    counter = Path(session.store.directory, ".next_id")
    _swap_to_directory(counter)
    again = reopen(session.path)
    assert again.load_errors == {}
    with pytest.raises(SaveError) as excinfo:
        again.add(Task(jobname="new"))
    assert_names(excinfo.value, ".next_id")
    assert sorted(index_of(session.path)) == sorted([ids["first"], ids["victim"], ids["third"], ids["grid"]])


def test_a_lock_file_that_is_a_directory_fails_add_with_an_error_naming_it(new_session):
    session = new_session("file")
    ids = sample(session)
    _swap_to_directory(Path(session.path, ".lock"))
    with pytest.warns(RunRecordWarning, match=r"\.lock"):  # the run is not recorded; the session opens
        again = reopen(session.path)
    with pytest.raises(Error) as excinfo:
        again.add(Task(jobname="new"))
    assert_names(excinfo.value, ".lock")
    assert sorted(index_of(session.path)) == sorted([ids["first"], ids["victim"], ids["third"], ids["grid"]])


@pytest.mark.parametrize("name", ["created", "finished"])
def test_a_timestamp_file_that_is_a_directory_gives_a_gc3session_error(new_session, name):
    session = new_session("file")
    ids = sample(session)
    _swap_to_directory(Path(session.path, name))
    again = reopen(session.path)  # opening reads no timestamp file
    assert again.load_errors == {}
    with pytest.raises(Error) as excinfo:
        (again.set_start_timestamp if name == "created" else again.set_end_timestamp)()
    assert_names(excinfo.value, name)
    assert sorted(index_of(session.path)) == sorted(ids[k] for k in ("first", "victim", "third", "grid"))
    # starting a new session there (load=False) must say what is in the way, not raise IsADirectoryError
    with pytest.raises(Error) as excinfo:
        Session(session.path, load=False)
    assert_names(excinfo.value, name)


@pytest.mark.parametrize("target", ["missing", "empty", "holding-an-id"])
@pytest.mark.parametrize("name", ["index.txt", "created", "finished", "store.url"])
def test_a_session_file_that_is_a_symlink_leading_outside_is_never_written_through(tmp_path, name, target):
    """A session someone else made may hold symlinks: using it must not create or change files elsewhere."""
    session = Session(tmp_path / "s")
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(3)]
    session.store.close()
    outside = tmp_path / "elsewhere" / f"{name}-target"
    outside.parent.mkdir()
    content = {"missing": None, "empty": b"", "holding-an-id": f"{ids[0]}\n".encode()}[target]
    if name == "store.url" and content is not None:
        content = b"jobs\n"
    if content is not None:
        outside.write_bytes(content)
        os.utime(outside, (1_000_000, 1_000_000))
    link = tmp_path / "s" / name
    link.unlink(missing_ok=True)  # a new session has no "finished" yet
    link.symlink_to(outside)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LoadWarning)  # the index may now name fewer tasks
            again = Session(tmp_path / "s")
            again.add(Task(jobname="new"))
            again.remove(again.list_ids()[0]) if again.list_ids() else None
            again.set_start_timestamp()
            again.set_end_timestamp()
            again.close()
    except Error:
        pass  # refusing is fine
    if content is None:
        assert not outside.exists(), f"{outside} was created through the symlink {name}"
    else:
        assert outside.read_bytes() == content, f"{outside} was written through the symlink {name}"
        assert os.stat(outside).st_mtime == 1_000_000, f"{outside} was touched through the symlink {name}"


# -- ids are never paths ----------------------------------------------------------

TRAVERSALS = [
    "../../victim",
    "../../etc/passwd",
    "../victim",
    "/etc/passwd",
    "Task.1/../../../victim",
    "..",
    ".",
    "",
    "Task.1\x00../../victim",
    "Task.1\x00",
    "Task\x00.1",
    "Task.1\n",
    "Task.1/",
    "jobs/Task.1",
    "./Task.1",
]

AUDITED = {
    "open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate",
    "os.chmod", "os.utime", "os.link", "os.symlink", "shutil.rmtree", "shutil.copyfile", "os.chown",
}
_accesses: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _accesses is None or event not in AUDITED:
        return
    for arg in args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.copyfile") else args[:1]:
        if isinstance(arg, (str, bytes, os.PathLike)):
            try:
                _accesses.append(os.path.normpath(os.path.abspath(os.fsdecode(arg))))
            except (TypeError, ValueError):
                _accesses.append(repr(arg))


sys.addaudithook(_audit)


@contextmanager
def file_accesses() -> Iterator[list[str]]:
    """Every path opened, listed, created, renamed or removed inside the block."""
    global _accesses
    seen: list[str] = []
    _accesses = seen
    try:
        yield seen
    finally:
        _accesses = None


def tree(root: Path, skip: Path) -> dict[str, tuple[int, float]]:
    """Size and mtime of every file below ``root``, except below ``skip`` and the test's own stores."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in filenames + dirnames:
            if name.startswith("store-") or Path(dirpath, name) == skip:
                continue
            stat = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def plant_victims(session: Session) -> list[Path]:
    """Valid-looking records where each traversal id would lead, so that reading one would succeed."""
    base = Path(session.store.directory) if isinstance(session.store, FilesystemStore) else Path(session.path) / "jobs"
    victims = []
    for oid in TRAVERSALS:
        if "\x00" in oid or not oid.strip("./\n") or oid.startswith("/"):
            continue
        target = Path(os.path.normpath(base / oid))
        if target.exists() or base in target.parents or target == base:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        task = Task(jobname="victim-was-read")
        task.persistent_id = oid
        data = __import__("pickle").dumps(task, protocol=4)
        target.write_bytes(encode_record(with_checks({"id": oid}, data), data))
        victims.append(target)
    return victims


def assert_stayed_inside(accesses: list[str], root: Path, allowed: list[Path], victims: list[Path]) -> None:
    for path in accesses:
        assert not path.endswith(os.path.join("etc", "passwd")), f"{path} was accessed"
        assert Path(path) not in victims, f"{path} was accessed"
        if Path(path) == root or root in Path(path).parents:
            assert any(Path(path) == a or a in Path(path).parents for a in allowed), f"{path} was accessed"


@pytest.mark.parametrize("kind", KINDS)
def test_ids_that_are_no_ids_are_refused_before_any_file_is_touched(tmp_path, store_url_of, kind):
    root = tmp_path / "a" / "b"
    path = root / "s"
    session = Session(path) if kind == "file" else Session(path, store_or_url=store_url_of(kind))
    good = session.add(Task(jobname="good"))
    victims = plant_victims(session)
    assert victims
    before = tree(tmp_path, skip=path)
    store = session.store
    allowed = [path]

    calls: dict[str, Callable[[str], Any]] = {
        "session.load": lambda oid: session.load(oid),
        "session.load_many": lambda oid: session.load_many([good, oid]),
        "session.load-no-add": lambda oid: session.load(oid, add=False),
        "session.remove": lambda oid: session.remove(oid),
        "session.forget": lambda oid: session.forget(oid),
        "Session(task_ids)": lambda oid: Session(path, task_ids=[oid]),
        "store.load": lambda oid: store.load(oid),
        "store.load_many-errors": lambda oid: store.load_many([oid], errors={}),
        "store.metadata": lambda oid: store.metadata(oid),
        "store.iter_metadata": lambda oid: list(store.iter_metadata([oid])),
        "store.iter_summaries": lambda oid: list(store.iter_summaries([oid])),
        "store.remove": lambda oid: store.remove(oid),
        "store.remove_many": lambda oid: store.remove_many([good, oid]),
        "store.replace": lambda oid: store.replace(oid, Task(jobname="intruder")),
        "store.export": lambda oid: list(store.export([oid])),
        "store.import_records": lambda oid: store.import_records([(oid, {"id": oid}, b"")]),
    }
    with file_accesses() as accesses:
        for oid in TRAVERSALS:
            for name, call in calls.items():
                with pytest.raises(Error) as excinfo:
                    call(oid)
                assert isinstance(excinfo.value, (InvalidArgument, LoadError, SessionError)), (name, oid)
            if "\x00" in oid:
                continue  # not something a shell can pass
            for command in (["show", str(path), oid], ["rm", str(path), oid], ["rm", "--dry-run", str(path), oid]):
                result = CliRunner().invoke(session_tool, command)
                assert result.exit_code == 1, (command, result.output)
                assert result.exception is None or isinstance(result.exception, SystemExit), (command, result.exception)
    assert_stayed_inside(accesses, root, allowed, victims)
    assert tree(tmp_path, skip=path) == before, "a file outside the session was created or changed"
    assert Session(path).tasks[good].jobname == "good"


def referring_record(session: Session, oid: str, target: str, form: str) -> bytes:
    """A record of a task whose ``child`` attribute refers to the stored object ``target``."""
    import io
    import pickle

    planted = Task(jobname="planted", child=Task(jobname="stand-in"))
    planted.persistent_id = oid
    if form == "as-the-store-writes-it":
        data = session.store.serializer.dumps(planted, lambda child: target)
    else:  # the persistent-id form of pickle's own protocol
        planted.child = "REFERENCE"

        class Referring(pickle.Pickler):
            def persistent_id(self, obj: Any) -> str | None:
                return target if isinstance(obj, str) and obj == "REFERENCE" else None

        buffer = io.BytesIO()
        Referring(buffer, protocol=4).dump(planted)
        data = buffer.getvalue()
    meta = with_checks({"id": oid, "references": [target], "children": [target]}, data)
    return encode_record(meta, data)


@pytest.mark.parametrize("form", ["as-the-store-writes-it", "pickle-persistent-id"])
def test_a_reference_inside_a_record_cannot_lead_outside_the_store(tmp_path, form):
    """A planted record refers to ``../../victim``: loading it must not read that file."""
    root = tmp_path / "a" / "b"
    path = root / "s"
    session = Session(path)
    good = session.add(Task(jobname="good"))
    victims = plant_victims(session)
    before = tree(tmp_path, skip=path)
    Path(session.store.directory, "Task.99").write_bytes(referring_record(session, "Task.99", "../../victim", form))
    with open(Path(path, "index.txt"), "a") as f:
        f.write("Task.99\n")

    with file_accesses() as accesses, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = Session(path)
        try:
            make_store(session.store.directory).load("Task.99")
        except LoadError as error:
            refused: LoadError | None = error
        else:
            refused = None
        lazy = Session(path, task_ids=[])  # removal reads children from metadata
        lazy.remove("Task.99")
    assert_stayed_inside(accesses, root, [path], victims)
    assert tree(tmp_path, skip=path) == before
    assert all(v.exists() for v in victims)
    assert refused is not None, "a record referring to ../../victim loaded"
    assert list(again.load_errors) == ["Task.99"]
    assert [w for w in caught if "Task.99" in str(w.message) or "../../victim" in str(w.message)]
    assert again.tasks[good].jobname == "good"


def test_a_planted_reference_to_a_valid_id_loads(tmp_path):
    """Control for the test above: the planted record is a real reference, so refusing it means something."""
    session = Session(tmp_path / "s")
    good = session.add(Task(jobname="good"))
    Path(session.store.directory, "Task.99").write_bytes(
        referring_record(session, "Task.99", good, "as-the-store-writes-it")
    )
    loaded = make_store(session.store.directory).load("Task.99")
    assert loaded.child.jobname == "good"
    assert loaded.child.persistent_id == good


# -- values the stores must take, or refuse clearly ----------------------------------


@pytest.mark.parametrize(
    "jobname",
    ["lone \ud800 surrogate", "nul \x00 byte", "x" * 100_000, "emoji \U0001f600 and accents éà", "quote ' \" ; --"],
    ids=["surrogate", "nul", "100k", "unicode", "quotes"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_an_odd_jobname_is_saved_or_refused_clearly_and_costs_nothing(new_session, kind, jobname):
    session = new_session(kind)
    ids = sample(session)
    try:
        oid = session.add(Task(jobname=jobname, note=jobname))
    except SaveError as error:  # refusing is fine, if it says what
        assert "cannot" in str(error)
        oid = None
    session.add(Task(jobname="after"))
    again = reopen(session.path)
    assert again.load_errors == {}
    assert {ids["first"], ids["victim"], ids["third"], ids["grid"]} <= set(again.list_ids())
    if oid is not None:
        assert again.tasks[oid].jobname == jobname
        assert again.tasks[oid].note == jobname
    assert oid is None or oid in index_of(session.path)
