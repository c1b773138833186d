"""What only SQL stores do: tables, columns, upserts, extra fields, drivers, forks, sharing."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Bare

from gc3session import Session, State, Task, TaskCollection
from gc3session.exceptions import InvalidArgument, LoadError, SaveError, StoreError
from gc3session.persistence import SqlStore, make_store
from gc3session.persistence import sql as sql_module
from gc3session.persistence.accessors import GET
from gc3session.persistence.idfactory import parse_id
from gc3session.persistence.sql import META_COLUMNS, SQLITE_PAGE_SIZE
from gc3session.persistence.store import mask_password

SQL_KINDS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(params=SQL_KINDS)
def sql_kind(request: Any) -> str:
    return request.param


@pytest.fixture
def sql_url(sql_kind: str, store_url_of: Callable[[str], str]) -> str:
    return store_url_of(sql_kind)


@pytest.fixture
def opened(sql_url: str) -> Any:
    stores: list[SqlStore] = []

    def opener(url: str = sql_url, **kwargs: Any) -> SqlStore:
        store = make_store(url, **kwargs)
        assert isinstance(store, SqlStore)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        store.close()


def table_of(url: str) -> str:
    return url.rpartition("#table=")[2] if "#table=" in url else "store"


def test_make_store_gives_sql_store_with_engine_and_table(opened: Any, sql_url: str) -> None:
    store = opened()
    assert isinstance(store.engine, sa.Engine)
    assert isinstance(store.table, sa.Table)
    assert store.table_name == table_of(sql_url)
    assert store.table.name == store.table_name
    names = {c.name for c in store.table.columns}
    assert {"id", "data", "state", "jobname", "cls", "children", "created", "modified", "meta"} <= names
    assert store.table.c.id.primary_key


def test_table_name_argument_wins_over_fragment_and_default(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    with make_store(url) as default, make_store(url + "#table=frag") as frag:
        assert default.table_name == "store"
        assert frag.table_name == "frag"
    with SqlStore(url + "#table=frag", table_name="arg") as arg:
        assert arg.table_name == "arg"
    assert set(sa.inspect(sa.create_engine(url)).get_table_names()) >= {"store", "frag", "arg"}


@pytest.mark.parametrize("name", ["bad name", "x;DROP TABLE store", "1abc", "a" * 64, "tab-le"])
def test_table_name_must_be_plain_identifier(tmp_path: Any, name: str) -> None:
    with pytest.raises(InvalidArgument, match="table name"):
        SqlStore(f"sqlite:///{tmp_path}/a.db", table_name=name)
    with pytest.raises(InvalidArgument, match="table"):
        make_store(f"sqlite:///{tmp_path}/a.db#table={name}")


@pytest.mark.parametrize("fragment", ["tbl=x", "table=", "table"])
def test_bad_fragment_is_refused(tmp_path: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match="#table=NAME"):
        make_store(f"sqlite:///{tmp_path}/a.db#{fragment}")


def test_rows_carry_metadata_columns(opened: Any) -> None:
    store = opened()
    task = Task(jobname="fit-1")
    task.state = State.RUNNING
    oid = store.save(task)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(store.table)).mappings().one()
    assert row["persistent_id"] == oid
    assert row["state"] == "RUNNING"
    assert row["jobname"] == "fit-1"
    assert row["cls"] == "gc3session.task.Task"
    assert row["id"] == int(oid.split(".")[1])
    assert row["created"] <= row["modified"]


def test_meta_column_holds_only_the_fields_without_a_column(opened: Any) -> None:
    store = opened()
    child = Task(jobname="child")
    parent = TaskCollection(jobname="parent", tasks=[child])
    parent.state = State.TERMINATED
    parent.execution.returncode = 3
    oid = store.save(parent)
    with store.engine.connect() as conn:
        text = conn.execute(sa.select(store.table.c.meta).where(store.table.c.persistent_id == oid)).scalar_one()
    kept = json.loads(text)
    assert not set(kept) & set(META_COLUMNS)
    assert kept["id"] == oid and kept["references"] == [child.persistent_id]
    meta = store.metadata(oid)  # the columns fill the record in again
    assert meta["state"] == "TERMINATED" and meta["returncode"] == 3 and meta["jobname"] == "parent"
    assert meta["cls"] == "gc3session.task.TaskCollection" and meta["children"] == [child.persistent_id]
    assert meta["created"] <= meta["modified"]
    assert dict(store.iter_metadata([oid]))[oid] == meta
    assert store.occupants([oid])[oid] == meta
    store.invalidate_cache()
    assert store.load(oid).tasks[0].jobname == "child"


def test_rows_that_repeat_the_columns_in_meta_are_read_as_they_are(opened: Any) -> None:
    store = opened()
    oid = store.save(Task(jobname="old"))
    full = {**store.metadata(oid), "jobname": "as the JSON has it", "children": ["Task.99"], "returncode": None}
    with store.engine.begin() as conn:  # a row as earlier versions wrote it: every field in the JSON too
        conn.execute(sa.update(store.table).values(meta=json.dumps(full), returncode=7))
    assert store.metadata(oid) == full  # the JSON wins over the columns
    store.invalidate_cache()
    assert store.load(oid).jobname == "old"


def test_a_jobname_a_column_cannot_hold_stays_exact_in_the_metadata(opened: Any) -> None:
    store = opened()
    oid = store.save(Task(jobname="lone \ud800 surrogate"))
    with store.engine.connect() as conn:
        column = conn.execute(sa.select(store.table.c.jobname)).scalar_one()
    assert column == "lone ? surrogate"  # UTF-8 cannot hold a lone surrogate
    assert store.metadata(oid)["jobname"] == "lone \ud800 surrogate"


def test_a_nul_in_a_listing_field_stays_exact_in_the_metadata(opened: Any) -> None:
    store = opened()  # PostgreSQL's text cannot hold NUL: the column holds NULL there, on every database alike
    stateful = Bare("no execution: describe() takes its state")
    stateful.state = "NUL\0STATE"
    ids = store.save_many([Task(jobname="with\0nul"), stateful, Task(jobname="plain")])
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(store.table.c.jobname, store.table.c.state).order_by(store.table.c.id)).all()
    assert [row[0] for row in rows] == [None, None, "plain"]
    assert rows[1][1] is None
    assert store.metadata(ids[0])["jobname"] == "with\0nul"
    assert store.metadata(ids[1])["state"] == "NUL\0STATE"
    store.invalidate_cache()
    assert store.load(ids[0]).jobname == "with\0nul"


@pytest.mark.parametrize("returncode", [3221225477, -(2**31) - 1, 2**70])  # a Windows crash code, and beyond
def test_values_the_columns_cannot_hold_stay_exact_in_the_metadata(opened: Any, returncode: int) -> None:
    store = opened()
    task = Task(jobname="ran")
    task.execution.returncode = returncode
    state = "WAITING_FOR_A_LICENCE_SERVER_TO_ANSWER"  # longer than the state column's 32 characters
    stateful = Bare("no execution: describe() takes its state")
    stateful.state = state
    oid, odd = store.save_many([task, stateful])
    with store.engine.connect() as conn:
        columns = dict(conn.execute(sa.select(store.table.c.persistent_id, store.table.c.returncode)).all())
        states = dict(conn.execute(sa.select(store.table.c.persistent_id, store.table.c.state)).all())
    assert columns[oid] is None and states[odd] is None  # the columns hold NULL ...
    assert store.metadata(oid)["returncode"] == returncode  # ... and the metadata the exact values
    assert store.metadata(odd)["state"] == state
    store.invalidate_cache()
    assert store.load(oid).execution.returncode == returncode
    assert store.load(odd).state == state


def test_a_damaged_children_column_is_logged_and_counts_as_none(opened: Any, caplog: Any) -> None:
    store = opened()
    oid = store.save(Task())
    with store.engine.begin() as conn:
        conn.execute(sa.update(store.table).values(children="{not json"))
    assert store.metadata(oid)["children"] == []
    assert "children column" in caplog.text and oid in caplog.text


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated-data", "meta-not-json", "meta-of-another-id"])
def test_a_damaged_row_gives_a_load_error_naming_the_id(opened: Any, damage: str) -> None:
    store = opened()
    oid = store.save(Task(jobname="victim", payload=list(range(50))))
    good = store.save(Task(jobname="good"))
    table = store.table
    row = table.c.persistent_id == oid
    with store.engine.connect() as conn:
        data, meta = conn.execute(sa.select(table.c.data, table.c.meta).where(row)).one()
    middle = len(data) // 2
    values = {
        "flipped-byte": {"data": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]},
        "truncated-data": {"data": data[:middle]},
        "meta-not-json": {"meta": meta[: len(meta) // 2]},
        "meta-of-another-id": {"meta": json.dumps({**json.loads(meta), "id": good})},
    }[damage]
    with store.engine.begin() as conn:
        conn.execute(sa.update(table).where(row).values(**values))
    store.invalidate_cache()
    with pytest.raises(LoadError) as excinfo:
        store.load(oid)
    assert excinfo.value.id == oid
    errors: dict[str, LoadError] = {}
    assert list(store.load_many([oid, good], errors=errors)) == [good]
    assert errors[oid].id == oid


def test_a_table_name_that_needs_quoting(opened: Any, store_url_of: Callable[..., str], sql_kind: str) -> None:
    # a SQL keyword in SQLite's own database; on the shared servers a unique name that only quoting keeps mixed-case
    table = "order" if sql_kind == "sqlite" else f"Order_{secrets.token_hex(4)}"
    url = store_url_of(sql_kind, table)
    child = Task(jobname="child")
    oid = opened(url).save(TaskCollection(jobname="parent", tasks=[child]))
    kid = child.persistent_id
    fresh = opened(url)
    assert fresh.table_name == table
    assert fresh.load(oid).tasks[0].jobname == "child"
    assert {i: m["jobname"] for i, m in fresh.iter_summaries([oid, kid])} == {oid: "parent", kid: "child"}
    assert fresh.metadata(kid)["jobname"] == "child" and fresh.occupants([oid])[oid]["id"] == oid
    assert [i for i, entry in fresh.export([oid, kid]) if not isinstance(entry, LoadError)] == [oid, kid]
    assert fresh.size() > 0
    fresh.remove_many([oid, kid])
    assert fresh.list() == []


def test_text_in_the_data_column_is_a_load_error(tmp_path: Any) -> None:
    store = SqlStore(f"sqlite:///{tmp_path}/s.db")  # only SQLite lets a BLOB column hold text
    oid, good = store.save(Task()), store.save(Task(jobname="good"))
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE store SET data = 'not a pickle' WHERE persistent_id = :o"), {"o": oid})
    store.invalidate_cache()
    errors: dict[str, LoadError] = {}
    assert list(store.load_many([oid, good], errors=errors)) == [good]
    assert errors[oid].id == oid and "holds str" in str(errors[oid])
    store.close()


def test_a_driver_without_positional_parameters_is_a_clear_error(tmp_path: Any) -> None:
    store = SqlStore(f"sqlite:///{tmp_path}/s.db")
    oid = store.save(Task())
    store.invalidate_cache()
    store.engine.dialect.paramstyle = "named"  # as a driver that takes only :name parameters would have it
    with pytest.raises(StoreError, match="'named' parameters"):
        store.load(oid)
    store.close()


def test_a_new_sqlite_database_gets_big_pages_and_a_write_ahead_log(tmp_path: Any) -> None:
    make_store(f"sqlite:///{tmp_path}/new.db").close()
    with sqlite3.connect(tmp_path / "new.db") as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == SQLITE_PAGE_SIZE
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with sqlite3.connect(tmp_path / "old.db") as db:  # an existing database keeps its pages
        db.execute("PRAGMA page_size=4096")
        db.execute("CREATE TABLE other (x INTEGER)")
    with make_store(f"sqlite:///{tmp_path}/old.db") as store:
        store.save(Task())
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096


def test_ids_come_from_the_database_counter(opened: Any) -> None:
    first, second = opened(), opened()
    a = first.save(Task())
    b = second.save(Task())
    c = first.save(Task())
    numbers = [int(x.split(".")[1]) for x in (a, b, c)]
    assert len(set(numbers)) == 3


def test_list_filters_are_done_in_sql(opened: Any) -> None:
    store = opened()
    tasks = [Task(jobname=f"t{i}") for i in range(6)]
    for t in tasks[:2]:
        t.state = State.TERMINATED
    store.save_many(tasks)
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    done = store.list(state="TERMINATED")
    assert done == [t.persistent_id for t in tasks[:2]]
    assert store.list(state=State.TERMINATED, jobname="t1") == [tasks[1].persistent_id]
    assert any("WHERE" in s and "state" in s for s in statements)
    with pytest.raises(InvalidArgument, match="cannot filter"):
        store.list(colour="red")


def test_save_many_uses_one_upsert_transaction(opened: Any) -> None:
    store = opened()
    tasks = [Task(jobname=f"t{i}") for i in range(1200)]
    for task in tasks:  # ids first: what follows must be writes only
        store.assign_id(task)
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2].upper()))
    store.save_many(tasks)
    writes = [s for s in statements if s.lstrip().startswith("INSERT")]
    assert writes and all("ON CONFLICT" in s or "ON DUPLICATE KEY" in s for s in writes)
    assert not any(s.lstrip().startswith("SELECT") and store.table_name.upper() in s for s in statements)
    for t in tasks[:5]:
        t.state = State.RUNNING
    store.save_many(tasks[:5])
    store.invalidate_cache()
    assert [store.load(t.persistent_id).state for t in tasks[:6]] == [State.RUNNING] * 5 + [State.NEW]
    assert len(store.list()) == 1200


def test_a_listing_takes_one_connection_and_ends_each_read(opened: Any) -> None:
    store = opened()
    tasks = [Task(jobname=f"t{i}") for i in range(1200)]
    store.save_many(tasks)
    ids = [t.persistent_id for t in tasks] + ["Task.999999"]
    checkouts: list[Any] = []
    sa.event.listen(store.engine, "checkout", lambda *a: checkouts.append(a))
    listing = store.iter_summaries(iter(ids))
    first = next(listing)
    other = opened()  # a writer while the listing is half way: neither waits for the other
    other.save(Task(jobname="meanwhile"))
    rest = list(listing)
    assert len(checkouts) == 1
    assert first[1]["jobname"] == "t0" and [m["jobname"] for _, m in rest[:-1]] == [f"t{i}" for i in range(1, 1200)]
    assert isinstance(rest[-1][1], LoadError)
    checkouts.clear()
    assert len(list(store.iter_metadata(ids[:600]))) == 600 and len(checkouts) == 1
    stopped = store.iter_summaries(ids)
    next(stopped)
    stopped.close()  # a listing stopped half way gives its connection back
    assert store.engine.pool.checkedout() == 0


def test_sql_text_in_values_is_just_text(opened: Any) -> None:
    store = opened()
    evil = "x'); DROP TABLE store; --"
    oid = store.save(Task(jobname=evil, note="'; DELETE FROM gc3session_counters; --"))
    store.invalidate_cache()
    assert store.load(oid).jobname == evil
    assert store.list(jobname=evil) == [oid]
    assert sa.inspect(store.engine).has_table(store.table_name)


def test_extra_fields_with_get_accessor(opened: Any, sql_url: str) -> None:
    column = sa.Column("exit_code", sa.Integer)
    store = opened(extra_fields={column: GET.execution.returncode, sa.Column("alpha", sa.Float): GET.params["alpha"]})
    task = Task(params={"alpha": 0.5})
    task.execution.returncode = 3
    oid = store.save(task)
    broken = store.save(Task())  # no params: the accessor fails, NULL is stored
    with store.engine.connect() as conn:
        rows = {r.persistent_id: r for r in conn.execute(sa.select(store.table))}
    assert rows[oid].exit_code == 3 and rows[oid].alpha == 0.5
    assert rows[broken].alpha is None
    assert store.list(exit_code=3) == [oid]
    # the same mapping can serve a second store handle (columns are copied)
    again = opened(extra_fields={column: GET.execution.returncode})
    assert again.list(exit_code=3) == [oid]


class Shouting(sa.types.TypeDecorator):
    """A column type that converts what it stores."""

    impl = sa.String(50)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value == "unstorable":
            raise ValueError("cannot shout that")
        return None if value is None else value.upper()


def test_extra_fields_go_through_their_column_types(opened: Any) -> None:
    # rows reach the driver without SQLAlchemy's processing of each row: the extra columns' own conversions still run
    # (a column name that is no parameter name: the driver's SQL names the parameters its own way)
    store = opened(extra_fields={sa.Column("params json", sa.JSON): GET.params,
                                 sa.Column("loud", Shouting): GET.jobname})
    oid = store.save(Task(jobname="quiet", params={"alpha": [1, 2]}))
    with store.engine.connect() as conn:
        params, loud = conn.execute(sa.select(store.table.c["params json"], store.table.c.loud)).one()
    assert params == {"alpha": [1, 2]}
    assert loud == "QUIET"
    with pytest.raises(SaveError, match="extra field loud"):
        store.save(Task(jobname="unstorable"))
    assert store.list() == [oid]


@pytest.mark.parametrize("extra", [[sa.Column("x", sa.Integer)], {sa.Column("x", sa.Integer): "jobname"}, 1])
def test_extra_fields_that_are_no_mapping_of_columns_to_functions_are_refused(opened: Any, extra: Any) -> None:
    # a getter that is no function would fail on every save, and each failure stores NULL
    with pytest.raises(InvalidArgument, match=r"extra_fields must map sqlalchemy\.Column objects to functions"):
        opened(extra_fields=extra)


def test_missing_extra_column_is_added_to_existing_table(opened: Any) -> None:
    plain = opened()
    oid = plain.save(Task(size=7))
    plain.close()
    store = opened(extra_fields={sa.Column("size", sa.Integer): GET.size})
    assert "size" in {c["name"] for c in sa.inspect(store.engine).get_columns(store.table_name)}
    store.replace(oid, store.load(oid))
    assert store.list(size=7) == [oid]


def test_existing_foreign_table_is_refused(opened: Any, sql_url: str) -> None:
    engine = opened().engine
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE not_ours_x (id INTEGER PRIMARY KEY, data TEXT)")
    try:
        base = sql_url.partition("#")[0]
        with pytest.raises(StoreError, match="not a gc3session store"):
            make_store(f"{base}#table=not_ours_x")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE not_ours_x")


def test_a_table_without_its_primary_key_is_read_but_never_written(opened: Any, sql_url: str) -> None:
    """A backup restored by hand with CREATE TABLE ... AS SELECT keeps no key: MariaDB's upsert then added a
    row for each save of a task, and the others failed with a driver message about ON CONFLICT."""
    store = opened()
    oid = store.save(Task(jobname="v1"))
    table, engine = table_of(sql_url), store.engine
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table}_copy AS SELECT * FROM {table}")
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"ALTER TABLE {table}_copy RENAME TO {table}")
    again = opened()
    task = again.load(oid)  # what it holds can still be read, and copied elsewhere
    assert task.jobname == "v1" and again.list() == [oid]
    task.jobname = "v2"
    with pytest.raises(StoreError, match=f"table '{table}' has no primary key .* on id alone") as info:
        again.save(task)
    fix = info.value.reason.rpartition("restore the key: ")[2]
    with engine.begin() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() == 1
        conn.exec_driver_sql(fix)  # as the error says
    third = opened()
    third.save(task)
    assert third.load(oid).jobname == "v2" and third.list() == [oid]


def test_a_password_holding_at_signs_is_masked_in_every_message(tmp_path: Any) -> None:
    for url in ("postgresql+psycopg://me:pa@ss:wo@127.0.0.1/test", "postgresql+psycopg://me:pa@ssWORD@127.0.0.1:1/t"):
        with pytest.raises((InvalidArgument, StoreError)) as info:
            make_store(url)
        text = str(info.value)
        assert "'***@127.0.0.1'" in text, text  # what SQLAlchemy took for the host or port
        assert not any(piece in text for piece in ("pa@", "ssWORD", "ss:wo", "'wo@")), text


def test_a_url_option_the_driver_cannot_take_is_an_invalid_argument(tmp_path: Any) -> None:
    with pytest.raises(InvalidArgument, match="could not convert string to float: 'abc'"):
        make_store(f"sqlite:///{tmp_path}/a.db?timeout=abc")


def test_create_false_refuses_missing_table(tmp_path: Any) -> None:
    sqlite3.connect(tmp_path / "a.db").close()
    with pytest.raises(StoreError, match="no table"):
        SqlStore(f"sqlite:///{tmp_path}/a.db", create=False)


def test_create_false_refuses_a_missing_sqlite_file_without_creating_it(tmp_path: Any) -> None:
    with pytest.raises(StoreError, match=f"no database file {tmp_path}/gone.db") as info:
        SqlStore(f"sqlite:///{tmp_path}/gone.db", create=False)
    assert info.value.url == f"sqlite:///{tmp_path}/gone.db"
    assert not (tmp_path / "gone.db").exists()


def test_create_false_refuses_a_missing_table_beside_others(opened: Any, sql_url: str) -> None:
    opened().save(Task())  # the database, its counters table and one store table exist
    missing = f"missing_{secrets.token_hex(4)}"
    with pytest.raises(StoreError, match=f"no table '{missing}'"):
        make_store(f"{sql_url.partition('#')[0]}#table={missing}", create=False)
    assert not sa.inspect(opened().engine).has_table(missing)


@pytest.mark.parametrize("create", [False, True])
def test_opening_an_existing_store_reads_no_catalog_and_writes_nothing(opened: Any, create: bool) -> None:
    """Two SELECTs tell that both tables and the counter row are there: reflection costs several ms an
    open, and a write (the counter row's) would take a lock and, on a server, a synced commit."""
    oid = opened().save(Task(jobname="kept"))
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        store = opened(create=create)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert store.load(oid).jobname == "kept"
    catalog = ("sqlite_master", "pg_catalog", "information_schema", "PRAGMA main.table_info", "pg_class")
    assert not [s for s in statements if any(word in s for word in catalog)], statements
    assert sum("WHERE 1 = 0" in s for s in statements) == 1
    written = [s for s in statements if s.split(None, 1)[0].upper() in ("UPDATE", "INSERT", "DELETE", "CREATE")]
    assert not written and not [s for s in statements if "IMMEDIATE" in s.upper()], statements
    assert parse_id(store.save(Task()))[1] == parse_id(oid)[1] + 1  # the counter goes on from where it was


def test_opening_a_store_whose_counter_row_is_gone_makes_it_above_the_highest_id(opened: Any) -> None:
    store = opened()
    highest = max(parse_id(oid)[1] for oid in store.save_many([Task() for _ in range(3)]))
    with store.engine.begin() as conn:  # its own row only: the counters table serves every store table there
        conn.execute(sa.delete(store.counters).where(store.counters.c.name == store.table_name))
    again = opened()
    own_row = again.counters.c.name == again.table_name
    with again.engine.connect() as conn:
        assert conn.execute(sa.select(again.counters.c.next_id).where(own_row)).scalar_one() == highest + 1
    assert parse_id(again.save(Task()))[1] == highest + 1


def test_a_lost_counters_table_comes_back_above_the_highest_id(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    with make_store(url) as store:
        highest = max(parse_id(oid)[1] for oid in store.save_many([Task() for _ in range(3)]))
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE gc3session_counters")
    with make_store(url) as store:
        assert parse_id(store.save(Task()))[1] > highest


def test_sqlite_runs_in_wal_mode(tmp_path: Any) -> None:
    with make_store(f"sqlite:///{tmp_path}/a.db") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_relative_sqlite_path_in_session_is_made_absolute(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    session = Session(tmp_path / "s", store_or_url="sqlite:///rel.db")
    session.add(Task())
    assert session.store_url == f"sqlite:///{tmp_path}/rel.db"
    monkeypatch.chdir("/")
    assert len(Session(tmp_path / "s")) == 1


def test_password_never_shown(tmp_path: Any) -> None:
    url = "postgresql+psycopg://alice:s3cr3t@127.0.0.1:1/nodb"
    with pytest.raises(StoreError) as info:
        make_store(url)
    assert "s3cr3t" not in str(info.value) and "***" in str(info.value)
    assert "s3cr3t" not in repr(info.value.args)
    assert info.value.__cause__ is None or "s3cr3t" not in str(info.value.__cause__)


@pytest.mark.parametrize("option", ["sslpassword", "PASSWORD", "client_secret", "api_token", "pwd"])
def test_a_secret_url_option_is_never_shown(tmp_path: Any, option: str) -> None:
    url = f"postgresql+psycopg://alice@127.0.0.1:1/nodb?connect_timeout=1&{option}=t0ps3cr3t#table=t"
    with pytest.raises(StoreError) as info:
        make_store(url)
    assert "t0ps3cr3t" not in str(info.value) and f"{option}=***" in str(info.value)
    store = SqlStore(f"sqlite:///{tmp_path}/a.db")
    store.url = url
    assert "t0ps3cr3t" not in repr(store) + str(store) and f"{option}=***#table=t" in repr(store)
    store.close()


def test_repr_masks_password(tmp_path: Any) -> None:
    store = SqlStore(f"sqlite:///{tmp_path}/a.db")
    store.url = "postgresql://bob:hunter2@db/x"
    assert "hunter2" not in repr(store) and "***" in repr(store)
    store.close()


def test_missing_driver_names_the_extra() -> None:
    with pytest.raises(InvalidArgument, match=r"gc3session\[postgresql\]"):
        make_store("postgresql+pg8000://user@localhost/db")
    with pytest.raises(InvalidArgument, match=r"gc3session\[mysql\]"):
        make_store("mysql+mysqldb://user@localhost/db")


def test_unreachable_server_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1"):
        make_store("postgresql://nobody@127.0.0.1:1/nothing")


def read_paths(store: SqlStore, oid: str) -> dict[str, Callable[[], Any]]:
    """Each way a store reads records, for one id."""
    return {
        "load": lambda: store.load(oid),
        "metadata": lambda: store.metadata(oid),
        "summaries": lambda: list(store.iter_summaries([oid])),
        "occupants": lambda: store.occupants([oid]),
    }


def test_a_read_the_database_refuses_is_a_store_error(opened: Any) -> None:
    store = opened()
    oid = store.save(Task(jobname="gone"))
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {store.table_name}")
    for name, read in read_paths(store, oid).items():
        store.invalidate_cache()
        with pytest.raises(StoreError) as info:
            read()
        assert info.value.reason.startswith("cannot read: "), name
        assert store.table_name in info.value.reason, name  # the driver's own words: which table is missing
        assert info.value.url == mask_password(store.url)
    assert store.engine.pool.checkedout() == 0
    with store.engine.begin() as conn:  # the table back: the same pooled connections read it
        store.table.metadata.create_all(conn, tables=[store.table])
    store.save(Task(jobname="back"))
    assert [meta["jobname"] for _, meta in store.iter_summaries(store.list())] == ["back"]


BACKEND_ID = {"postgresql": lambda dbapi: dbapi.info.backend_pid, "mysql": lambda dbapi: dbapi.thread_id()}
KILL = {"postgresql": "SELECT pg_terminate_backend({})", "mysql": "KILL {}"}


@pytest.fixture
def server_store(request: Any, store_url_of: Callable[[str], str]) -> Iterator[tuple[SqlStore, Callable[[Any], None]]]:
    """A store on a database server, and a function that kills the server's end of a driver connection."""
    kind = request.param
    url = store_url_of(kind)
    store = make_store(url)
    assert isinstance(store, SqlStore)
    killer = sa.create_engine(url.partition("#")[0])

    def kill(dbapi_connection: Any) -> None:
        with killer.connect() as conn:
            conn.exec_driver_sql(KILL[kind].format(BACKEND_ID[kind](dbapi_connection)))

    yield store, kill
    store.close()
    killer.dispose()


@pytest.mark.parametrize("server_store", ["postgresql", "mysql"], indirect=True)
def test_a_connection_lost_in_the_middle_of_a_read_is_thrown_away(
    server_store: tuple[SqlStore, Callable[[Any], None]], monkeypatch: Any, caplog: Any
) -> None:
    store, kill = server_store
    oid = store.save(Task(jobname="kept"))
    fetch = store._fetch

    def cut_off(conn: Any, *args: Any) -> Any:  # the server goes away as the query is sent
        kill(conn.connection.dbapi_connection)
        return fetch(conn, *args)

    for name, read in read_paths(store, oid).items():
        store.invalidate_cache()
        monkeypatch.setattr(store, "_fetch", cut_off)
        with caplog.at_level(logging.ERROR), pytest.raises(StoreError, match="cannot read"):
            read()
        monkeypatch.undo()
        assert not caplog.records, name  # no pool reset failing on the dead connection: it was thrown away
        assert store.engine.pool.checkedout() == 0
        assert store.metadata(oid)["jobname"] == "kept", name


@pytest.mark.parametrize("server_store", ["postgresql", "mysql"], indirect=True)
def test_a_connection_lost_right_after_the_pools_ping_is_a_store_error(
    server_store: tuple[SqlStore, Callable[[Any], None]],
) -> None:
    store, kill = server_store
    oid = store.save(Task(jobname="kept"))

    def cut_off(dbapi_connection: Any, *_: Any) -> None:
        kill(dbapi_connection)

    for name, read in read_paths(store, oid).items():
        store.invalidate_cache()
        sa.event.listen(store.engine.pool, "checkout", cut_off)
        try:
            with pytest.raises(StoreError, match="cannot read"):
                read()
        finally:
            sa.event.remove(store.engine.pool, "checkout", cut_off)
        assert store.metadata(oid)["jobname"] == "kept", name


def test_threads_share_one_store(opened: Any) -> None:
    store = opened()
    ids: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                ids.append(store.save(Task()))
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 100
    assert sorted(store.list(), key=lambda x: int(x.split(".")[1])) == sorted(ids, key=lambda x: int(x.split(".")[1]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_usable_after_fork(opened: Any) -> None:
    store = opened()
    parent_id = store.save(Task(jobname="parent"))
    store.pre_fork()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: save and report the id, never return into pytest
        code = 1
        try:
            store.post_fork()
            os.write(write, store.save(Task(jobname="child")).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_id = os.read(read, 100).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert child_id and child_id != parent_id
    third = store.save(Task(jobname="parent again"))
    assert len({parent_id, child_id, third}) == 3
    assert store.load(child_id).jobname == "child"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("first_read", ["iter_summaries", "occupants"])
def test_a_listing_after_fork_leaves_the_parents_connections_alone(opened: Any, first_read: str) -> None:
    store = opened()
    oid = store.save(Task(jobname="parent"))
    assert store.metadata(oid)["jobname"] == "parent"  # a connection in the parent's pool
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no post_fork() of its own; the first read must see the fork
        code = 1
        try:
            found = dict(getattr(store, first_read)([oid]))
            os.write(write, b"ok" if found[oid]["jobname"] == "parent" and store._pid == os.getpid() else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    answer = os.read(read, 10)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and answer == b"ok"
    assert store.metadata(oid)["jobname"] == "parent"


WRITER = textwrap.dedent(
    """
    import sys
    from gc3session import Task
    from gc3session.persistence import make_store
    store = make_store(sys.argv[1])
    ids = [store.save(Task(jobname=f"w{sys.argv[2]}-{i}")) for i in range(int(sys.argv[3]) // 2)]
    ids += store.save_many([Task(jobname=f"w{sys.argv[2]}-b{i}") for i in range(int(sys.argv[3]) - len(ids))])
    print("\\n".join(ids))
    """
)


def test_four_processes_share_one_store(opened: Any, sql_url: str) -> None:
    opened()  # create the table first, as a session would
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, sql_url, str(n), "500"], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    ids = [oid for out in outputs for oid in out]
    assert len(ids) == 2000 and len(set(ids)) == 2000
    store = opened()
    assert sorted(store.list()) == sorted(ids)
    loaded = store.load_many(ids)
    assert {t.jobname for t in loaded.values()} == {f"w{n}-{i}" for n in range(4) for i in range(250)} | {
        f"w{n}-b{i}" for n in range(4) for i in range(250)
    }


def test_second_handle_sees_saves_after_invalidate_cache(opened: Any) -> None:
    first, second = opened(), opened()
    task = Task(jobname="v1")
    oid = first.save(task)
    seen = second.load(oid)
    assert seen.jobname == "v1"
    task.jobname = "v2"
    first.save(task)
    assert second.load(oid) is seen and seen.jobname == "v1"
    second.invalidate_cache()
    assert second.load(oid).jobname == "v2"


def test_two_sessions_share_one_store(tmp_path: Any, sql_url: str) -> None:
    one = Session(tmp_path / "one", store_or_url=sql_url)
    two = Session(tmp_path / "two", store_or_url=sql_url)
    mine = [one.add(Task(jobname=f"one{i}")) for i in range(3)]
    theirs = [two.add(Task(jobname=f"two{i}")) for i in range(3)]
    assert not set(mine) & set(theirs)
    assert Session(tmp_path / "one").list_ids() == mine
    one.destroy()
    assert not (tmp_path / "one").exists()
    reopened = Session(tmp_path / "two")
    assert reopened.list_ids() == theirs
    assert [t.jobname for t in reopened] == ["two0", "two1", "two2"]
    assert sorted(reopened.store.list()) == sorted(theirs)
    reopened.store.close()


def test_session_flush_false_batches_through_save_many(tmp_path: Any, sql_url: str) -> None:
    session = Session(tmp_path / "s", store_or_url=sql_url)
    statements: list[str] = []
    sa.event.listen(session.store.engine, "before_cursor_execute", lambda *a: statements.append(a[2].upper()))
    ids = [session.add(Task(jobname=f"t{i}"), flush=False) for i in range(300)]
    assert not any(s.lstrip().startswith("INSERT INTO " + session.store.table_name.upper()) for s in statements)
    session.flush()
    inserts = [s for s in statements if session.store.table_name.upper() in s and s.lstrip().startswith("INSERT")]
    assert 1 <= len(inserts) <= 3
    assert Session(tmp_path / "s").list_ids() == ids
    session.store.close()


def test_save_error_names_the_object(opened: Any) -> None:
    store = opened()
    task = Task()
    store.assign_id(task)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {store.table_name}")
    with pytest.raises(SaveError) as info:
        store.save(task)
    assert task.persistent_id in str(info.value)


def test_tables_of_one_database_do_not_share_what_their_handles_issued(
    sql_kind: str, store_url_of: Callable[[str], str]
) -> None:
    # the same URL, two tables named by keyword: an object of one is a stranger to the other
    urls = [store_url_of(sql_kind), store_url_of(sql_kind)]
    base = urls[0].partition("#")[0]
    tables = [table_of(url) if "#" in url else f"t{n}" for n, url in enumerate(urls)]
    with SqlStore(base, table_name=tables[0]) as here, SqlStore(base, table_name=tables[1]) as there:
        precious = there.save(Task(jobname="precious"))
        stranger = Task(jobname="stranger")
        assert here.save(stranger) == precious  # both tables number from 1
        with pytest.raises(SaveError, match=f"{precious}.*another object"):
            there.save(stranger)
        there.invalidate_cache()
        assert there.load(precious).jobname == "precious"


def test_in_memory_databases_do_not_share_what_their_handles_issued() -> None:
    with make_store("sqlite://") as here, make_store("sqlite://") as there:
        precious = there.save(Task(jobname="precious"))
        stranger = Task(jobname="stranger")
        assert here.save(stranger) == precious
        with pytest.raises(SaveError, match=f"{precious}.*another object"):
            there.save(stranger)
        there.invalidate_cache()
        assert there.load(precious).jobname == "precious"


@pytest.mark.parametrize("other", ["task.1", "TASK.1", "Tásk.1", "Task.1 "])
def test_ids_and_listing_fields_compare_exactly(opened: Any, other: str) -> None:
    # MariaDB's and MySQL's default collation ignores case, accents and trailing spaces
    store = opened()
    task = Task(jobname="Fit")
    task.state = State.RUNNING
    oid = store.save(task)
    assert oid == "Task.1"
    assert store.list(persistent_id=other) == []
    assert store.list(jobname="fit") == store.list(jobname="Fít") == store.list(state="running") == []
    assert store.list(persistent_id=oid) == store.list(jobname="Fit") == store.list(state="RUNNING") == [oid]
    if other.strip() == other:  # a valid id
        store.remove(other)
    assert store.list() == [oid]
    store.invalidate_cache()
    assert store.load(oid).jobname == "Fit"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("in_child", ["size", "close", "finalizer"])
def test_a_child_that_measures_or_closes_the_store_leaves_the_parents_connections_alone(
    opened: Any, in_child: str
) -> None:
    store = opened()
    oid = store.save(Task(jobname="parent"))
    assert store.metadata(oid)["jobname"] == "parent"  # a connection in the parent's pool
    connects: list[Any] = []
    sa.event.listen(store.engine, "connect", lambda *_: connects.append(1))
    pid = os.fork()
    if pid == 0:  # child: never uses the store otherwise, as a worker that only ends
        code = 1
        try:
            {"size": store.size, "close": store.close, "finalizer": store._closer}[in_child]()  # the finalizer: at exit
            code = 0 if in_child == "finalizer" or store._pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert store.metadata(oid)["jobname"] == "parent"
    assert not connects  # the pool's ping found the parent's connection alive: the child closed none


@pytest.mark.parametrize("server_store", ["mysql"], indirect=True)
def test_a_record_over_max_allowed_packet_is_a_save_error_that_says_so(
    server_store: tuple[SqlStore, Callable[[Any], None]],
) -> None:
    store, _ = server_store
    with store.engine.connect() as conn:
        limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
    big = Task(jobname="big")
    big.blob = os.urandom(limit)
    small = store.save(Task(jobname="small"))
    with pytest.raises(SaveError, match=r"Task\.\d+: its record is [\d,]+ bytes, more than the max_allowed_packet"):
        store.save(big)
    store.invalidate_cache()
    assert store.load(small).jobname == "small"
    assert store.list() == [small]


@pytest.mark.parametrize(
    ("children", "meta", "held"),
    [
        ('["Task.2"]', '{"id":"Task.1","references":[]}', ["Task.2"]),  # not parsed: refers to nothing else
        ('["Task.2"]', '{"id":"Task.1"}', ["Task.2"]),  # an older record, without the field
        ('["Task.2"]', '{"id":"Task.1","references":["Task.2","Task.3"]}', ["Task.2", "Task.3"]),
        ("[]", '{"kind":"references","references":["Task.3"]}', ["Task.3"]),  # the word twice: parsed
        ("[]", '{"x":{"references":[]},"references":["Task.3"]}', ["Task.3"]),
        ('["Task.2"]', '{"children":["Task.4"],"references":[]}', ["Task.4"]),  # what the JSON holds wins
        ("[]", '{"references":["Task.3"', LoadError),  # damaged
        ('["Task.2"]', '{"id":"Task.1","history":[[1.5,"NEW"]],', LoadError),  # cut short before its references
    ],
)
def test_what_a_row_holds_or_refers_to_is_read_without_parsing_what_refers_to_nothing(children, meta, held):
    found = sql_module._held(("Task.1", children, meta))
    if held is LoadError:
        assert isinstance(found, LoadError) and found.id == "Task.1"
    else:
        assert found == held


def test_a_unique_index_on_id_with_included_columns_is_key_enough(store_url_of: Callable[[str], str]) -> None:
    """PostgreSQL counts INCLUDE columns in indnatts: such an index, which ON CONFLICT (id) takes, was refused."""
    url = store_url_of("postgresql")
    store = make_store(url)
    oid = store.save(Task(jobname="v1"))
    table = table_of(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table}_copy AS SELECT * FROM {table}")
        conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql(f"ALTER TABLE {table}_copy RENAME TO {table}")
        conn.exec_driver_sql(f"CREATE UNIQUE INDEX {table}_id ON {table} (id) INCLUDE (created)")
    store.close()
    again = make_store(url)
    task = again.load(oid)
    task.jobname = "v2"
    again.save(task)
    assert again.load(oid).jobname == "v2" and again.list() == [oid]
    again.close()


def test_a_full_disk_while_allocating_ids_is_a_save_error_as_while_writing(tmp_path: Any, monkeypatch: Any) -> None:
    # code written to the docs (except SaveError: wait, retry) must catch it whichever step of add() meets it
    session = Session(tmp_path / "s", store_or_url=f"sqlite:///{tmp_path}/tasks.db")
    session.add(Task(jobname="kept"))

    def full(*args: Any, **kwargs: Any) -> Any:
        raise sa.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(session.store, "_transaction", full)
    session.store._numbers.clear()  # the next add must ask the database for ids
    with pytest.raises(SaveError, match="cannot allocate object ids: database or disk is full") as excinfo:
        session.add(Task())
    assert excinfo.value.target == f"sqlite:///{tmp_path}/tasks.db"
    assert "(store " not in str(excinfo.value)  # the store is the target: named once
    monkeypatch.undo()
    session.add(Task(jobname="after"))
    assert [t.jobname for t in Session(tmp_path / "s")] == ["kept", "after"]


def test_a_sqlite_store_on_read_only_media_is_read_without_its_wal_files(tmp_path: Any, monkeypatch: Any) -> None:
    # a WAL database needs a -shm file even to be read, which read-only media cannot hold: it is read immutable
    # (checked by hand on a tmpfs remounted read-only; here the mount's flag is what the test sets)
    url = f"sqlite:///{tmp_path}/tasks.db"
    with Session(tmp_path / "s", store_or_url=url) as session:
        oid = session.add(Task(jobname="archived"))
    assert not sql_module._on_read_only_filesystem(str(tmp_path / "tasks.db"))
    assert sorted(os.listdir(tmp_path)) == ["s", "tasks.db"]  # the last connection closed: no -wal, no -shm
    monkeypatch.setattr(sql_module, "_on_read_only_filesystem", lambda path: True)
    store = make_store(url, create=False)
    assert store.load(oid).jobname == "archived" and store.list() == [oid]
    assert sorted(os.listdir(tmp_path)) == ["s", "tasks.db"]  # nothing made beside it
    with pytest.raises(SaveError, match="readonly database"):
        store.save(Task())
    store.close()


def test_a_sqlite_store_on_read_only_media_with_a_write_ahead_log_reads_what_the_log_holds(
    tmp_path: Any, monkeypatch: Any
) -> None:
    # a snapshot taken while a writer had the store open: committed tasks still in the -wal file, which an
    # immutable open would ignore (they would seem lost)
    url = f"sqlite:///{tmp_path}/tasks.db"
    writer = make_store(url)
    with writer.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
        first = writer.save(Task(jobname="checkpointed"))
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        second = writer.save(Task(jobname="in the log"))
        assert os.path.getsize(tmp_path / "tasks.db-wal") > 0
        monkeypatch.setattr(sql_module, "_on_read_only_filesystem", lambda path: True)
        reader = make_store(url, create=False)
        assert reader.list() == [first, second] and reader.load(second).jobname == "in the log"
        reader.close()
    writer.close()
