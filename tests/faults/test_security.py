"""Security: hostile pickles, ``${NAME}`` in store URLs, private store.url, hidden passwords, SQL injection.

* ``make_store(url, allowed_classes=[...])`` loads through a restricted
  unpickler: any global that is not listed (module prefixes or classes) or a
  plain data type is refused with LoadError, and a pickle that would run a
  command never runs (a marker file proves it; a control load without the
  restriction proves the payload is real).
* ``${NAME}`` in a store URL is expanded when the store is opened and never
  written back expanded; an unset variable is an InvalidArgument naming it.
* ``store.url`` is created 0600; passwords never appear in output, logs or
  exceptions, not even in chained causes, for servers up or down.
* SQL: table names are validated; values holding SQL text are stored as text.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import logging
import os
import pathlib
import re
import stat
import tempfile
import traceback
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import FitTask, Point

from gc3session import Session, State, Task, TaskCollection, TemporarySession
from gc3session.cli import main as session_tool
from gc3session.exceptions import Error, InvalidArgument, LoadError, LoadWarning
from gc3session.persistence import Store, make_store
from gc3session.persistence.store import mask_password

KINDS = ["file", "sqlite", "postgresql", "mysql"]
SQL_KINDS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(autouse=True)
def temporary_directories_in_tmp_path(tmp_path, monkeypatch):
    """Keep TemporarySession's directories under tmp_path."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    """A list to put opened stores in; each is closed afterwards."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def opened(stores: list[Store], url: str, **kwargs: Any) -> Store:
    store = make_store(url, **kwargs)
    stores.append(store)
    return store


# -- hostile pickles ---------------------------------------------------------------------


def _text(value: str) -> bytes:
    raw = value.encode()
    assert len(raw) < 256
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def calling_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle that calls ``module.name(argument)`` when loaded (``name`` may be dotted)."""
    return b"\x80\x04" + _text(module) + _text(name) + b"\x93" + _text(argument) + b"\x85R."


def plant(store: Store, oid: str, data: bytes) -> None:
    """Write a record as it is, with metadata that passes every check."""
    store.import_records([(oid, {"format": 1, "id": oid, "size": len(data), "crc32": zlib.crc32(data)}, data)])


class Payload:
    """Pickles as a call of ``os.system(command)``: what a hostile record would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def hostile_records(store: Store, marker: Path) -> dict[str, str]:
    """Plant each kind of hostile record in ``store``; return ``{name: id}``.

    Each runs ``touch marker`` when loaded without restriction.
    """
    command = f"touch {marker}"
    python = f"__import__('os').system({command!r})"
    planted = {}
    for number, (name, module, attribute, argument) in enumerate(
        [
            ("posix.system", "posix", "system", command),
            ("os.system", "os", "system", command),
            ("builtins.eval", "builtins", "eval", python),
            ("builtins.exec", "builtins", "exec", python),
            ("subprocess.getoutput", "subprocess", "getoutput", command),
            ("os.system reached through an allowed module", "helpers", "os.system", command),
        ],
        start=900,
    ):
        oid = f"Task.{number}"
        plant(store, oid, calling_pickle(module, attribute, argument))
        planted[name] = oid
    inside = Task(jobname="trojan", payload=Payload(command))
    planted["os.system inside an allowed Task"] = store.save(inside)
    child = Task(jobname="trojan-child", payload=Payload(command))
    parent = TaskCollection(jobname="innocent", tasks=[child])
    planted["os.system in a child record"] = store.save(parent)
    return planted


@pytest.mark.parametrize("allowed", [["helpers"], [FitTask], ["helpers.FitTask", "gc3session"]], ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_allowed_classes_refuse_every_other_global_and_nothing_runs(tmp_path, store_url_of, stores, kind, allowed):
    url = store_url_of(kind)
    marker = tmp_path / "marker"
    planted = hostile_records(opened(stores, url), marker)
    restricted = opened(stores, url, allowed_classes=allowed)
    child = restricted.metadata(planted["os.system in a child record"])["children"][0]
    for name, oid in planted.items():
        with pytest.raises(LoadError) as excinfo:
            restricted.load(oid)
        assert not marker.exists(), f"{name}: the pickle ran under allowed_classes={allowed!r}"
        assert excinfo.value.id == oid, (name, str(excinfo.value))  # the record asked for, and the one at fault
        assert oid in str(excinfo.value) and ("child" not in name or f"refers to {child}" in str(excinfo.value))
        errors: dict[str, LoadError] = {}
        assert restricted.load_many([oid], errors=errors) == {}
        assert not marker.exists(), name
        assert list(errors) == [oid]


@pytest.mark.parametrize("kind", ["file", "sqlite"])
def test_the_hostile_records_are_real(tmp_path, store_url_of, stores, kind):
    """Control: without allowed_classes each planted pickle runs its command (so the test above can fail)."""
    url = store_url_of(kind)
    marker = tmp_path / "marker"
    planted = hostile_records(opened(stores, url), marker)
    for name, oid in planted.items():
        unrestricted = opened(stores, url)
        try:
            unrestricted.load(oid)
        except LoadError:
            pass  # it ran, then turned out not to be a task
        assert marker.exists(), f"{name}: the control payload did not run"
        marker.unlink()


PLAIN_DATA = {
    "none": None,
    "bool": True,
    "int": 2**100,
    "float": float("inf"),
    "complex": 1 + 2j,
    "str": "text ünïcode",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"abc"),
    "list": [1, [2, [3]]],
    "tuple": (1, (2,)),
    "dict": {"a": {"b": 1}},
    "set": {1, 2},
    "frozenset": frozenset({3}),
    "range": range(1, 10, 2),
    "slice": slice(1, 5, 2),
    "ordered": collections.OrderedDict(a=1),
    "deque": collections.deque([1, 2]),
    "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
    "date": datetime.date(2024, 1, 2),
    "time": datetime.time(3, 4),
    "timedelta": datetime.timedelta(seconds=5),
    "decimal": decimal.Decimal("1.10"),
    "fraction": fractions.Fraction(1, 3),
    "uuid": uuid.UUID(int=12345),
    "path": pathlib.Path("/some/where"),
    "purepath": pathlib.PurePosixPath("rel/path"),
    "a_state": State.RUNNING,
}


@pytest.mark.parametrize(
    "allowed, fit_ok, point_ok",
    [
        (["helpers"], True, True),
        ("helpers", True, True),
        ([FitTask], True, False),
        (["helpers.FitTask"], True, False),
        (["helpers.FitTask", Point], True, True),
        (["helpers.FitTask", "helpers.Point"], True, True),
        ([], False, False),
        (["help"], False, False),
        (["helpers.Fit"], False, False),
        (["helpersx"], False, False),
        (["helpers.Point"], False, True),
        (["gc3session"], False, False),
    ],
    ids=repr,
)
@pytest.mark.parametrize("kind", KINDS)
def test_allowed_classes_accept_what_is_listed_and_plain_data(store_url_of, stores, kind, allowed, fit_ok, point_ok):
    url = store_url_of(kind)
    writer = opened(stores, url)
    plain = writer.save(Task(jobname="plain", **PLAIN_DATA))
    fit = writer.save(FitTask(jobname="fit", alpha=0.5, **PLAIN_DATA))
    with_point = writer.save(Task(jobname="with-point", where=Point(1, 2)))
    restricted = opened(stores, url, allowed_classes=allowed)

    task = restricted.load(plain)  # plain data and gc3session's own classes are always allowed
    for name, value in PLAIN_DATA.items():
        assert getattr(task, name) == value, name
        assert type(getattr(task, name)) is type(value), name
    assert task.state == State.NEW

    if fit_ok:
        loaded = restricted.load(fit)
        assert isinstance(loaded, FitTask) and loaded.alpha == 0.5 and loaded.decimal == PLAIN_DATA["decimal"]
    else:
        with pytest.raises(LoadError) as excinfo:
            restricted.load(fit)
        assert excinfo.value.id == fit
        assert "helpers.FitTask" in str(excinfo.value)
    if point_ok:
        assert restricted.load(with_point).where.y == 2
    else:
        with pytest.raises(LoadError) as excinfo:
            restricted.load(with_point)
        assert excinfo.value.id == with_point
        assert "helpers.Point" in str(excinfo.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_opened_with_allowed_classes_reports_hostile_tasks_and_keeps_them(tmp_path, store_url_of, kind):
    path = tmp_path / "s"
    marker = tmp_path / "marker"
    session = Session(path) if kind == "file" else Session(path, store_or_url=store_url_of(kind))
    fit = session.add(FitTask(jobname="fit", alpha=1.5))
    plain = session.add(Task(jobname="plain"))
    planted = hostile_records(session.store, marker)
    with open(path / "index.txt", "a") as f:
        f.write("".join(f"{oid}\n" for oid in planted.values()))
    session.store.close()

    with pytest.warns(LoadWarning):
        again = Session(path, allowed_classes=["helpers"])
    assert not marker.exists()
    assert sorted(again.load_errors) == sorted(planted.values())
    assert again.tasks[fit].alpha == 1.5
    assert again.tasks[plain].jobname == "plain"
    again.add(Task(jobname="after"))
    again.remove(plain)
    assert all(oid in Path(path, "index.txt").read_text().split() for oid in planted.values())
    assert not marker.exists()

    with pytest.warns(LoadWarning):
        stricter = Session(path, allowed_classes=[])
    assert fit in stricter.load_errors
    assert "helpers.FitTask" in str(stricter.load_errors[fit])
    assert not marker.exists()

    with pytest.warns(LoadWarning):
        temporary = TemporarySession(again.store.url, allowed_classes=["helpers"])
    assert set(planted.values()) <= set(temporary.load_errors)
    assert temporary.tasks[fit].alpha == 1.5
    temporary.store.close()
    assert not marker.exists()


# -- ${NAME} in store URLs ------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    """``url`` (``driver://user@host...``) with ``password`` put in as it is."""
    head, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    assert at, f"{url} has no user part"
    return f"{head}{sep}{userinfo.split(':')[0]}:{password}@{hostpart}"


def server_password(url: str) -> str:
    """The password the test server needs, or a made-up one a trust-auth server ignores."""
    return sa.engine.make_url(url.partition("#")[0]).password or "Zq7-trust-auth-ignores-this"


def url_with_variables(kind: str, tmp_path: Path, store_url_of: Any, monkeypatch: Any) -> tuple[str, dict[str, str]]:
    """A store URL of ``kind`` written with ``${...}`` variables, and the variables' values (set)."""
    values: dict[str, str]
    if kind == "file":
        values = {"GC3_TEST_STORE_DIR": str(tmp_path / "store-dir")}
        url = "${GC3_TEST_STORE_DIR}/jobs"
    elif kind == "sqlite":
        values = {"GC3_TEST_DB_DIR": str(tmp_path)}
        url = "sqlite:///${GC3_TEST_DB_DIR}/store.db"
    elif kind == "postgresql" or sa.engine.make_url(store_url_of(kind).partition("#")[0]).password:
        base = store_url_of(kind)  # the test PostgreSQL server has trust auth: any password will do
        values = {"GC3_TEST_DB_PASSWORD": server_password(base)}
        url = with_password(base, "${GC3_TEST_DB_PASSWORD}")
    else:  # a server without password: put the host in a variable instead
        base = store_url_of(kind)
        host = sa.engine.make_url(base.partition("#")[0]).host
        values = {"GC3_TEST_DB_HOST": host}
        url = base.replace(f"@{host}", "@${GC3_TEST_DB_HOST}", 1)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return url, values


@pytest.mark.parametrize("kind", KINDS)
def test_store_url_variables_are_expanded_on_open_and_never_written_back(
    tmp_path, store_url_of, monkeypatch, caplog, kind
):
    caplog.set_level(logging.DEBUG)
    url, values = url_with_variables(kind, tmp_path, store_url_of, monkeypatch)
    path = tmp_path / "s"
    url_file = path / "store.url"

    session = Session(path, store_or_url=url)
    assert url_file.read_text() == url + "\n"
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(3)]
    session.remove(ids[0])
    session.tasks[ids[1]].execution.state = "RUNNING"
    session.close()
    assert url_file.read_text() == url + "\n"

    again = Session(path)
    assert again.list_ids() == ids[1:]
    assert again.tasks[ids[1]].state == State.RUNNING
    assert again.store_url == url
    again.add(Task(jobname="more"))
    again.set_end_timestamp()
    again.close()
    content = url_file.read_text()
    assert content == url + "\n"
    for value in values.values():
        assert value not in content
    shown = [repr(again), repr(again.store), str(again.store)]
    for command in ("stats", "ls", "verify"):
        result = CliRunner().invoke(session_tool, [command, str(path)])
        assert result.exit_code == 0, result.output
        shown += [result.output, result.stderr]
    if "GC3_TEST_DB_PASSWORD" in values:  # a password from a variable shows nowhere, like any other
        assert_hidden(values["GC3_TEST_DB_PASSWORD"], caplog.text, *shown)
    if kind == "file":
        assert Path(values["GC3_TEST_STORE_DIR"], "jobs", ids[1]).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_session_over_a_store_object_writes_the_url_unexpanded(tmp_path, store_url_of, stores, monkeypatch, kind):
    """A store opened from a URL with ${NAME} must not leave the expanded value in the session directory."""
    url, values = url_with_variables(kind, tmp_path, store_url_of, monkeypatch)
    store = opened(stores, url)
    session = Session(tmp_path / "s", store_or_url=store)
    session.add(Task(jobname="t"))
    content = Path(session.path, "store.url").read_text()
    for value in values.values():
        assert value not in content, f"store.url holds the value of a variable: {content!r}"


def test_an_unset_variable_is_an_invalid_argument_naming_it_and_no_value(tmp_path, monkeypatch):
    secret = "Zq7-value-of-a-set-variable"
    monkeypatch.setenv("GC3_TEST_SET", secret)
    monkeypatch.delenv("GC3_TEST_UNSET", raising=False)
    urls = [
        "postgresql+psycopg://user:${GC3_TEST_SET}@${GC3_TEST_UNSET}:5432/db",
        "postgresql+psycopg://user:${GC3_TEST_UNSET}@${GC3_TEST_SET}:5432/db",
        "${GC3_TEST_SET}/${GC3_TEST_UNSET}/jobs",
        "sqlite:///${GC3_TEST_UNSET}/store.db#table=${GC3_TEST_SET}",
    ]
    for url in urls:
        with pytest.raises(InvalidArgument) as excinfo:
            make_store(url)
        assert "GC3_TEST_UNSET" in str(excinfo.value)
        assert_hidden(secret, error=excinfo.value)

        # the same from a session's store.url: the file is left as it is
        path = tmp_path / f"s{urls.index(url)}"
        path.mkdir()
        (path / "store.url").write_text(url + "\n")
        (path / "index.txt").write_text("Task.1\n")
        with pytest.raises(InvalidArgument) as excinfo:
            Session(path)
        assert "GC3_TEST_UNSET" in str(excinfo.value)
        assert_hidden(secret, error=excinfo.value)
        assert (path / "store.url").read_text() == url + "\n"
        assert (path / "index.txt").read_text() == "Task.1\n"


def test_a_variable_value_is_not_expanded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GC3_TEST_OUTER", str(tmp_path / "${GC3_TEST_INNER}"))
    monkeypatch.setenv("GC3_TEST_INNER", "expanded-twice")
    store = make_store("${GC3_TEST_OUTER}/jobs")
    assert Path(store.directory) == tmp_path / "${GC3_TEST_INNER}" / "jobs"


@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_url_in_a_variable_is_a_url_not_a_directory(tmp_path, store_url_of, monkeypatch, kind):
    """The scheme was looked for before the variable was expanded: the tasks went to a local directory named
    after the URL, password included."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GC3_TEST_WHOLE_URL", store_url_of(kind))
    session = Session(tmp_path / "s", store_or_url="${GC3_TEST_WHOLE_URL}")
    oid = session.add(Task(jobname="t"))
    session.close()
    assert (tmp_path / "s" / "store.url").read_text() == "${GC3_TEST_WHOLE_URL}\n"
    again = Session(tmp_path / "s")
    assert again.tasks[oid].jobname == "t" and again.store.url == "${GC3_TEST_WHOLE_URL}"
    assert type(again.store) is type(make_store(store_url_of(kind)))
    again.close()
    assert not [p for p in os.listdir(tmp_path) if ":" in p], os.listdir(tmp_path)


@pytest.mark.parametrize("url", [" sqlite:///{tmp}/a.db ", "\tsqlite:///{tmp}/a.db"])
def test_a_url_with_blanks_around_it_is_still_a_url(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)  # where a directory named after it would go
    session = Session(tmp_path / "s", store_or_url=url.format(tmp=tmp_path))
    session.add(Task())
    assert (tmp_path / "a.db").exists() and not (tmp_path / "s" / "jobs").exists()
    session.close()


@pytest.mark.parametrize("url", [
    "postgresql:/me:Zq7secret@127.0.0.1/db", "postgresql+psycopg:me:Zq7secret@127.0.0.1/db", "sqlite:{tmp}/a.db",
    "file:{tmp}/store", "mysql:/root@127.0.0.1/test",
])
def test_a_url_without_its_two_slashes_is_refused_not_taken_for_a_directory(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    url = url.format(tmp=tmp_path)
    scheme = url.partition(":")[0]
    with pytest.raises(InvalidArgument, match=f"lacks the // after {re.escape(scheme)}:") as excinfo:
        Session(tmp_path / "s", store_or_url=url)
    assert_hidden("Zq7secret", error=excinfo.value)
    with pytest.raises(InvalidArgument, match="lacks the //"):
        make_store(url)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_password_holding_a_newline_is_masked_whole():
    assert mask_password("postgresql://me:Zq7\nsecret@host/db") == "postgresql://me:***@host/db"
    secret = "Zq7" + "secret"  # not in the source line that the traceback shows
    with pytest.raises(InvalidArgument) as excinfo:
        make_store(f"file://me:{secret}@fileserver/data")
    assert_hidden(secret, error=excinfo.value)


# -- store.url is private ------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000])
@pytest.mark.parametrize("kind", KINDS)
def test_store_url_is_created_0600_whatever_the_umask(tmp_path, store_url_of, kind, umask):
    url = None if kind == "file" else store_url_of(kind)
    old = os.umask(umask)
    try:
        session = Session(tmp_path / "s", store_or_url=url)
        assert mode_of(tmp_path / "s" / "store.url") == 0o600
        session.add(Task())
        session.close()
        Session(tmp_path / "s").add(Task())
        assert mode_of(tmp_path / "s" / "store.url") == 0o600

        # a session started again over an old, readable store.url makes it private
        os.chmod(tmp_path / "s" / "store.url", 0o644)
        Session(tmp_path / "s", load=False, store_or_url=url)
        assert mode_of(tmp_path / "s" / "store.url") == 0o600

        # a directory with other files only is completed into a session: store.url private too
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        Session(tmp_path / "other", store_or_url=url)
        assert mode_of(tmp_path / "other" / "store.url") == 0o600

        temporary = TemporarySession(url or str(tmp_path / "s" / "jobs"))
        assert mode_of(Path(temporary.path, "store.url")) == 0o600
        temporary.close()
    finally:
        os.umask(old)


def test_the_cli_copy_writes_a_private_store_url(tmp_path):
    source = Session(tmp_path / "s")
    source.add(Task())
    result = CliRunner().invoke(session_tool, ["copy", str(tmp_path / "s"), str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert mode_of(tmp_path / "copy" / "store.url") == 0o600


# -- passwords are never shown ---------------------------------------------------------------

SECRETS = ["Zq7Secr3tPassw0rd", "p@ss:w/rd %#?&=Zq7"]


def forms(secret: str) -> list[str]:
    """The ways a password may show: as it is, and URL-encoded."""
    return sorted({secret, quote(secret, safe=""), quote(secret)})


def assert_hidden(secret: str, *texts: str, error: BaseException | None = None) -> None:
    """No form of ``secret`` in ``texts``, nor anywhere in ``error``, its causes and its traceback."""
    shown = list(texts)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        shown += [str(error), repr(error), repr(error.args), "".join(traceback.format_exception(error))]
        shown += [str(getattr(error, name, "")) for name in ("url", "target", "path", "reason", "orig", "statement")]
        error = error.__cause__ or error.__context__
    for text in shown:
        for form in forms(secret):
            assert form not in text, f"the password shows in: {text[:500]}"


def unreachable_urls(secret: str) -> dict[str, str]:
    pw = quote(secret, safe="")
    return {
        "pg-refused": f"postgresql+psycopg://postgres:{pw}@127.0.0.1:1/test",
        "pg-unknown-host": f"postgresql+psycopg://postgres:{pw}@no-such-host.invalid:5432/test",
        "pg-no-such-database": f"postgresql+psycopg://postgres:{pw}@127.0.0.1:5432/no_such_database_zq7",
        "pg-no-such-role": f"postgresql+psycopg://no_such_role_zq7:{pw}@127.0.0.1:5432/test",
        "pg-bad-port": f"postgresql+psycopg://postgres:{pw}@127.0.0.1:99999/test",
        "pg-no-driver": f"postgresql+nosuchdriver://postgres:{pw}@127.0.0.1/test",
        "mysql-refused": f"mysql+pymysql://root:{pw}@127.0.0.1:1/test",
        "mysql-access-denied": f"mysql+pymysql://no_such_user_zq7:{pw}@127.0.0.1:3306/test",
        "mysql-no-driver": f"mysql+nosuchdriver://root:{pw}@127.0.0.1/test",
        "mysql-bad-table": f"mysql+pymysql://root:{pw}@127.0.0.1:1/test#table=bad-name",
        "pg-bad-fragment": f"postgresql+psycopg://postgres:{pw}@127.0.0.1:1/test#tabel=x",
    }


@pytest.mark.parametrize("secret", SECRETS, ids=["plain", "special-characters"])
@pytest.mark.parametrize("where", list(unreachable_urls("x")))
def test_a_password_never_shows_when_a_server_cannot_be_used(tmp_path, caplog, capsys, secret, where):
    caplog.set_level(logging.DEBUG)
    url = unreachable_urls(secret)[where] + ("" if "#" in unreachable_urls(secret)[where] else "#table=t_zq7")
    errors: list[BaseException] = []

    def attempt(call: Any) -> None:
        try:
            call()
        except Exception as error:  # bare errors are for test_bad_input; here only the password matters
            errors.append(error)
        else:
            raise AssertionError(f"{where}: no error")

    attempt(lambda: make_store(url))
    attempt(lambda: Session(tmp_path / "new", store_or_url=url))
    attempt(lambda: TemporarySession(url))
    path = tmp_path / "s"
    path.mkdir()
    (path / "store.url").write_text(url + "\n")
    (path / "index.txt").write_text("Task.1\n")
    attempt(lambda: Session(path))

    runner = CliRunner()
    outputs = []
    for args in (["ls", path], ["show", path, "Task.1"], ["log", path], ["stats", path], ["verify", path],
                 ["rm", path, "Task.1"], ["destroy", "--yes", path], ["copy", path, tmp_path / "copy"],
                 ["--debug", "ls", path]):
        result = runner.invoke(session_tool, [str(a) for a in args])
        outputs += [result.output, result.stderr, repr(result.exception)]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            errors.append(result.exception)
    captured = capsys.readouterr()
    assert_hidden(secret, caplog.text, captured.out, captured.err, *outputs)
    for error in errors:
        assert_hidden(secret, error=error)


@pytest.fixture
def pg_url_with_password(store_url_of) -> tuple[str, str]:
    """A PostgreSQL store URL (fresh table) with a password in it, and the password."""
    base = store_url_of("postgresql")
    secret = server_password(base)
    return with_password(base, quote(secret, safe="")), secret


def test_a_password_never_shows_while_a_store_is_used(tmp_path, caplog, capsys, pg_url_with_password):
    url, secret = pg_url_with_password
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    errors: list[BaseException] = []

    session = Session(tmp_path / "s", store_or_url=url)
    ids = [session.add(Task(jobname=f"t{i}")) for i in range(3)]
    session.add(TaskCollection(jobname="grid", tasks=[Task(jobname="c")]))
    session.tasks[ids[0]].execution.state = "TERMINATED"
    session.save_all()
    session.remove(ids[2])
    texts += [repr(session), str(session), repr(session.store), str(session.store), repr(session.store.engine)]
    texts += [repr(session.store.engine.url), str(session.store.size())]
    for call in (
        lambda: session.store.list(no_such_column=1),
        lambda: session.load("Task.999999"),
        lambda: make_store(url.replace("#table=", "#table=missing_"), create=False),
        lambda: make_store(url.replace("#table=", "#table=1")),
    ):
        with pytest.raises(Error) as excinfo:
            call()
        errors.append(excinfo.value)
    session.close()

    again = Session(tmp_path / "s")
    texts.append(repr(again))
    runner = CliRunner()
    for args in (["ls", again.path], ["ls", "--format", "json", again.path], ["show", again.path, ids[0]],
                 ["log", again.path], ["stats", again.path], ["verify", again.path],
                 ["copy", again.path, tmp_path / "copy"], ["stats", tmp_path / "copy"]):
        result = runner.invoke(session_tool, [str(a) for a in args])
        assert result.exit_code == 0, (args, result.output)
        texts += [result.output, result.stderr]
    captured = capsys.readouterr()
    assert "***" in " ".join(texts)  # the URL is shown, masked
    assert_hidden(secret, caplog.text, captured.out, captured.err, *texts)
    for error in errors:
        assert_hidden(secret, error=error)


def test_a_password_given_as_a_query_parameter_never_shows(tmp_path, caplog):
    secret = "Zq7QueryPassw0rd"
    caplog.set_level(logging.DEBUG)
    url = f"postgresql+psycopg://postgres@127.0.0.1:1/test?password={secret}#table=t_zq7"
    with pytest.raises(Error) as excinfo:
        make_store(url)
    assert_hidden(secret, caplog.text, error=excinfo.value)
    path = tmp_path / "s"
    path.mkdir()
    (path / "store.url").write_text(url + "\n")
    result = CliRunner().invoke(session_tool, ["stats", str(path)])
    assert_hidden(secret, result.output, result.stderr)


# -- SQL: table names, and SQL text in values --------------------------------------------

BAD_TABLE_NAMES = [
    "store; DROP TABLE canary",
    "store --",
    "a b",
    "1abc",
    "a-b",
    'a"b',
    "a`b",
    "a'b",
    "canary)",
    "x" * 64,
    "tâble",
    "a\x00b",
    "a.b",
]


class SqlBase(NamedTuple):
    url: str  # a database URL, no table
    engine: sa.Engine
    canary: str  # a table of one row that no test may touch


@pytest.fixture(params=SQL_KINDS)
def sql_base(request, tmp_path, store_url_of) -> Iterator[SqlBase]:
    """A database of each SQL kind in turn (skipped or failed as conftest says), with a canary table."""
    kind = request.param
    url = f"sqlite:///{tmp_path}/db.sqlite" if kind == "sqlite" else store_url_of(kind).partition("#")[0]
    engine = sa.create_engine(url)
    canary = f"canary_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {canary} (n INTEGER)"))
        conn.execute(sa.text(f"INSERT INTO {canary} VALUES (1)"))
    yield SqlBase(url, engine, canary)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {canary}"))
    engine.dispose()


@pytest.fixture
def table_name(sql_base) -> Iterator[str]:
    """A fresh table name in ``sql_base``, dropped (with its counter row) afterwards."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    yield table
    with sql_base.engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        if sa.inspect(conn).has_table("gc3session_counters"):
            conn.execute(sa.text("DELETE FROM gc3session_counters WHERE name = :n"), {"n": table})


def tables_of(base: SqlBase) -> set[str]:
    return set(sa.inspect(base.engine).get_table_names())


def canary_alive(base: SqlBase) -> bool:
    with base.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT n FROM {base.canary}")).scalar() == 1


@pytest.mark.parametrize("name", BAD_TABLE_NAMES, ids=repr)
def test_table_names_that_are_no_plain_identifier_are_refused(tmp_path, sql_base, name):
    from gc3session.persistence import SqlStore

    before = tables_of(sql_base)
    with pytest.raises(InvalidArgument):
        SqlStore(sql_base.url, table_name=name)
    with pytest.raises(InvalidArgument):
        make_store(f"{sql_base.url}#table={name}")
    with pytest.raises(InvalidArgument):
        Session(tmp_path / "s", store_or_url=f"{sql_base.url}#table={name}")
    assert tables_of(sql_base) == before
    assert canary_alive(sql_base)


SQL_TEXT = [
    "'); DROP TABLE {canary}; --",
    "\"; DROP TABLE {canary}; --",
    "' OR '1'='1",
    "Robert'); DELETE FROM {table}; --",
    "%s %(x)s ? :name $1",
    "\\'; \\\\ \\x00",
    "`backticks` /* comment */ #hash",
]


def test_values_holding_sql_text_are_stored_as_text(tmp_path, sql_base, table_name):
    session = Session(tmp_path / "s", store_or_url=f"{sql_base.url}#table={table_name}")
    bystander = session.add(Task(jobname="bystander"))
    texts = [t.format(canary=sql_base.canary, table=table_name) for t in SQL_TEXT]
    ids = {session.add(Task(jobname=text, note=text, attr=text)): text for text in texts}
    session.add(TaskCollection(jobname=texts[0], tasks=[Task(jobname=texts[1])]))
    assert canary_alive(sql_base)

    for oid, text in ids.items():
        assert session.store.metadata(oid)["jobname"] == text
        assert session.store.list(jobname=text)[:1] == [oid]
        assert bystander not in session.store.list(jobname=text)
    assert session.store.list(state="' OR '1'='1") == []
    with pytest.raises(InvalidArgument):
        session.store.list(**{"state = 'NEW' OR 1=1 --": 1})
    session.store.close()

    again = Session(tmp_path / "s")
    for oid, text in ids.items():
        assert again.tasks[oid].jobname == text
        assert again.tasks[oid].note == text
        assert again.tasks[oid].attr == text
    assert again.tasks[bystander].jobname == "bystander"
    again.remove(next(iter(ids)))
    again.store.close()
    assert canary_alive(sql_base)
    assert {table_name, sql_base.canary} <= tables_of(sql_base)
    with sql_base.engine.connect() as conn:
        stored = set(conn.execute(sa.text(f"SELECT jobname FROM {table_name}")).scalars())
    assert set(texts[1:]) | {"bystander"} <= stored
    assert texts[0] in stored  # the collection's


def test_an_extra_field_named_with_sql_text_harms_nothing(sql_base, table_name):
    from gc3session.persistence import SqlStore

    evil = f'x"; DROP TABLE {sql_base.canary}; --'
    SqlStore(sql_base.url, table_name=table_name).close()  # the table exists first: the column comes by ALTER TABLE
    try:
        extra = {sa.Column(evil, sa.Text): lambda t: t.jobname}
        store = SqlStore(sql_base.url, table_name=table_name, extra_fields=extra)
    except Error:
        pass  # refusing the name is fine too
    else:
        oid = store.save(Task(jobname="j"))
        assert store.load(oid).jobname == "j"
        store.close()
    assert canary_alive(sql_base)
    assert table_name in tables_of(sql_base)
