"""SQL stores on SQLAlchemy 2.x Core: SQLite, PostgreSQL, MariaDB and MySQL.

One row per object.  Besides the pickle, each row carries the metadata record:
its main fields as columns of their own, so listing and filtering never
unpickle, and the other fields as JSON in the ``meta`` column.  Object
numbers come from a counter row in ``gc3session_counters``, advanced inside a
transaction, so any number of processes and machines can share one table.
Every write is one transaction using the database's own upsert.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import random
import re
import sqlite3
import time
import urllib.parse
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url

from ..exceptions import Error, InvalidArgument, LoadError, RepairWarning, SaveError, StoreError, TableNotFound
from .idfactory import IdFactory, id_list, number_of, parse_id
from .serialization import DEFAULT_PROTOCOL, decode_json, encode_json
from .store import (
    LAST_TAKEN,
    LOAD_BATCH,
    SECRET_OPTION,
    Record,
    Store,
    check_not_one_id,
    check_option_names,
    check_options,
    held_ids,
    id_chunks,
    known_objects,
    mask_password,
    missing,
    store_options,
    written_password,
)

log = logging.getLogger(__name__)

#: Rows written or read per statement.
BATCH = 500
#: The table that holds one id counter per store table.
COUNTERS_TABLE = "gc3session_counters"
#: Seconds a SQLite writer waits for another one before giving up.
SQLITE_BUSY_TIMEOUT = 60.0
#: Page size of new SQLite databases.
SQLITE_PAGE_SIZE = 16384

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_DEFAULT_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
_EXTRAS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}
#: The positional placeholder of each DB-API parameter style that has one (every driver of the three databases).
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
#: The widths of the text columns that have one: a longer value is NULL there and kept in ``meta``.
STATE_WIDTH, NAME_WIDTH = 32, 255
_BIG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_BIG_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
#: Columns every store table has; ``data`` and ``meta`` are not for filtering.
CORE_COLUMNS = (
    "id", "persistent_id", "data", "state", "jobname", "cls", "returncode", "children", "created", "modified", "meta",
)
#: The core columns that hold text (compared exactly: see ``SqlStore._compares_loosely``).
TEXT_COLUMNS = ("persistent_id", "state", "jobname", "cls", "children")
#: Metadata fields kept in columns of their own, and only there (rows written by 0.1 repeat them in ``meta``).
META_COLUMNS = ("state", "jobname", "cls", "returncode", "children", "created", "modified")


def _core_columns() -> list[sa.Column[Any]]:
    return [
        # on SQLite, INTEGER PRIMARY KEY is the rowid itself (64 bits): no second index to keep
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
        sa.Column("persistent_id", sa.String(NAME_WIDTH), nullable=False),
        sa.Column("data", _BIG_BLOB, nullable=False),
        sa.Column("state", sa.String(STATE_WIDTH), index=True),
        sa.Column("jobname", sa.Text),
        sa.Column("cls", sa.String(NAME_WIDTH)),
        sa.Column("returncode", sa.Integer),
        sa.Column("children", _BIG_TEXT),
        sa.Column("created", sa.Double),
        sa.Column("modified", sa.Double),
        sa.Column("meta", _BIG_TEXT, nullable=False),
    ]


class SqlStore(Store):
    """Objects as rows of one table in a SQL database.

    The table is ``table_name``, else the URL fragment ``#table=NAME``, else
    ``store``.  ``extra_fields`` maps :class:`sqlalchemy.Column` objects to
    functions of the object (see :data:`gc3session.persistence.accessors.GET`);
    each is a column filled on every save.  ``create=False`` refuses to
    create a missing table (TableNotFound) or SQLite file (StoreError);
    ``existing_table=True`` refuses only to create the table (its id counter
    is made if it is missing): a session whose index names tasks opens its
    store so.
    """

    def __init__(
        self,
        url: str,
        table_name: str | None = None,
        idfactory: IdFactory | None = None,
        extra_fields: Mapping[sa.Column[Any], Callable[[Any], Any]] | None = None,
        create: bool = True,
        *,
        protocol: int = DEFAULT_PROTOCOL,
        fsync: bool = False,
        existing_table: bool = False,
        **options: Any,
    ) -> None:
        check_option_names(options)  # before an engine is made
        check_options({"extra_fields": extra_fields}, names=False)
        super().__init__(url, idfactory=idfactory, protocol=protocol, **store_options(options))
        address, fragment_table = _split_fragment(url)
        self.table_name = next((t for t in (table_name, fragment_table) if t is not None), "store")
        if not isinstance(self.table_name, str) or not _TABLE_NAME.fullmatch(self.table_name):
            raise InvalidArgument(f"table name {self.table_name!r} is not a plain SQL identifier (letters, digits, _)")
        self._address = _with_default_driver(address)
        # the objects this table's handles issued, loaded or saved: another table, even in the same database,
        # holds other records, and an in-memory database is this handle's alone
        where = f"{self._address.render_as_string(hide_password=True)}#table={self.table_name}"
        self._known = known_objects(None if _in_memory(self._address) else where)
        query = self._address.normalized_query
        secret = [value for key, values in query.items() if SECRET_OPTION.search(key) for value in values]
        self._secrets = [*(str(p) for p in (self._address.password, *secret) if p), *_url_secrets(address)]
        self.fsync = fsync
        self._create = create
        self._existing_table = existing_table
        database = _sqlite_file(self._address)
        if not create and database is not None and not os.path.exists(database):  # connecting would create it
            raise StoreError(self._masked(), f"no database file {database} (and create=False)")
        self.engine = self._make_engine()
        self._extra = {_fresh(column): getter for column, getter in (extra_fields or {}).items()}
        for column in self._extra:
            if column.name in CORE_COLUMNS:
                raise InvalidArgument(f"extra field {column.name!r} clashes with a column of the store table")
        try:
            self.table, self.counters = self._open_tables(create)
        except BaseException as error:
            self.engine.dispose()
            if isinstance(error, Error) or not isinstance(error, Exception):
                raise
            # a driver that fails on an option of the URL in a way of its own
            reason = f"cannot open: {type(error).__name__}: {self._scrub(str(error))}"
            raise StoreError(self._masked(), reason) from error
        dialect = self.engine.dialect
        # PostgreSQL takes the ids as one array, not a placeholder each: a whole load batch in one SELECT
        self._read_batch = LOAD_BATCH if dialect.name == "postgresql" else BATCH
        # extra fields may have types that convert values (JSON, dates, enums): their bind processors, or None
        self._extra_processors = [column.type.dialect_impl(dialect).bind_processor(dialect) for column in self._extra]
        # a store dropped without close() still returns its connections
        self._closer = weakref.finalize(self, _dispose, self.engine, os.getpid())

    # -- engine and tables ------------------------------------------------------

    def _make_engine(self) -> Engine:
        backend = self._address.get_backend_name()
        kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
            if _in_memory(self._address):
                kwargs["poolclass"] = sa.pool.StaticPool
            database = _sqlite_file(self._address)
            if database is not None and _on_read_only_filesystem(database) and not _has_wal(database):
                # a WAL database needs its -shm file, which cannot be made there: nothing can change the file
                # on read-only media, so it is read as immutable (no locks, no -shm); writes fail, saying so.
                # Not with a -wal file beside it (a snapshot taken while a writer had it open): immutable
                # would ignore the transactions in it, which SQLite reads with the -shm there
                uri = f"file:{urllib.parse.quote(os.path.abspath(database))}?immutable=1"
                kwargs["creator"] = functools.partial(sqlite3.connect, uri, uri=True, **kwargs.pop("connect_args"))
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = sa.create_engine(self._address, **kwargs)
        except (ImportError, sa.exc.NoSuchModuleError) as error:
            extra = _EXTRAS.get(backend)
            hint = f": pip install 'gc3session[{extra}]'" if extra else ""
            raise InvalidArgument(
                f"no database driver for {self._masked()} ({self._scrub(str(error))}){hint}"
            ) from None
        except (sa.exc.ArgumentError, TypeError, ValueError) as error:  # an option of the URL, like ?timeout=abc
            raise InvalidArgument(f"{self._masked()}: {self._scrub(str(error))}") from None
        if backend == "sqlite":
            _tune_sqlite(engine, self.fsync, self._create)
        return engine

    def _open_tables(self, create: bool) -> tuple[sa.Table, sa.Table]:
        metadata = sa.MetaData()
        counters = sa.Table(
            COUNTERS_TABLE,
            metadata,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("next_id", sa.BigInteger, nullable=False),
        )
        wanted = sa.Table(self.table_name, metadata, *_core_columns(), *self._extra, **_table_options())
        with self._failures("cannot open the store table"):
            for attempt in retries():  # several processes may be creating the same database at once
                with attempt:
                    present, counted = self._existing_columns() or (None, False)
                    if present is None:  # a table is missing: reflection says which
                        inspector = sa.inspect(self.engine)
                        if not inspector.has_table(self.table_name):
                            if not create or self._existing_table:
                                raise TableNotFound(self._masked(), f"no table {self.table_name!r}")
                            self._create_tables(metadata)
                        elif create and not inspector.has_table(COUNTERS_TABLE):  # reading needs none
                            self._create_tables(metadata)
                    table = self._adopt(wanted, present)
        if create:
            self.table, self.counters = table, counters
            if not counted:  # a new table: its counter row is made now, before writers race for it
                self._reserve(0)  # a write transaction, which opening an existing store does without
        return table, counters

    def _create_tables(self, metadata: sa.MetaData) -> None:
        try:
            with self._transaction() as conn:  # BEGIN IMMEDIATE on SQLite: no lock upgrade to fail
                metadata.create_all(conn, checkfirst=True)
        except sa.exc.SQLAlchemyError as error:
            if is_transient(error):
                raise
            # another process created them at the same moment: fine if they exist now
            inspector = sa.inspect(self.engine)
            if not (inspector.has_table(self.table_name) and inspector.has_table(COUNTERS_TABLE)):
                raise

    def _existing_columns(self) -> tuple[set[str], bool] | None:
        """The store table's columns, and whether the table has its id counter row, when both tables
        exist; else None.

        Two SELECTs: one round trip each, where reflection (``has_table``) costs several
        milliseconds of SQLAlchemy's own work on every open.  A database that cannot be reached
        fails here, as before; any error from the SELECTs themselves sends the caller to reflection.
        """
        quoted = self.engine.dialect.identifier_preparer.quote(COUNTERS_TABLE)
        counter_row = sa.text(f"SELECT next_id FROM {quoted} WHERE name = :name")
        with self.engine.connect() as conn:
            try:
                counted = conn.execute(counter_row, {"name": self.table_name}).first() is not None
                return self._columns_of(conn, self.table_name), counted
            except sa.exc.DBAPIError:
                return None

    def _adopt(self, wanted: sa.Table, present: set[str] | None = None) -> sa.Table:
        """Use the existing table (with columns ``present``, if known) as it is, adding any missing extra column."""
        if present is None:
            present = self._column_names()
        missing_core = [name for name in CORE_COLUMNS if name not in present]
        if missing_core:
            raise StoreError(
                self._masked(),
                f"table {self.table_name!r} exists but is not a gc3session store (no column {', '.join(missing_core)})",
            )
        preparer = self.engine.dialect.identifier_preparer
        for column in self._extra:
            if column.name not in present:
                kind = column.type.compile(dialect=self.engine.dialect)
                ddl = f"ALTER TABLE {preparer.quote(self.table_name)} ADD COLUMN {preparer.quote(column.name)} {kind}"
                try:
                    with self._transaction() as conn:
                        conn.exec_driver_sql(ddl)
                except sa.exc.SQLAlchemyError as error:
                    if is_transient(error):
                        raise
                    if column.name not in self._column_names():
                        raise
        return wanted

    def _id_is_unique(self) -> bool:
        """Whether the table's primary key, or a unique index, is its id column alone (reflection would cost
        several milliseconds; these are catalog queries)."""
        quote = self.engine.dialect.identifier_preparer.quote
        table = quote(self.table_name)
        dialect = self.engine.dialect.name
        with self.engine.connect() as conn:
            if dialect == "sqlite":
                # table_info rows: (cid, name, type, notnull, default, place in the primary key or 0)
                key = sorted((row[5], row[1]) for row in conn.exec_driver_sql(f"PRAGMA table_info({table})") if row[5])
                # index_list rows: (seq, name, unique, origin, partial)
                listed = conn.exec_driver_sql(f"PRAGMA index_list({table})")
                unique = [row[1] for row in listed if row[2] and not row[4]]
                return [name for _, name in key] == ["id"] or any(
                    [row[2] for row in conn.exec_driver_sql(f"PRAGMA index_info({quote(index)})")] == ["id"]
                    for index in unique
                )
            if dialect == "postgresql":
                query = sa.text(
                    "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(:name) AND i.indisunique "
                    "AND i.indpred IS NULL AND i.indnkeyatts = 1 AND a.attname = 'id'"
                )
                return conn.execute(query, {"name": table}).first() is not None
            keys: dict[str, list[tuple[int, str]]] = {}
            for row in conn.exec_driver_sql(f"SHOW KEYS FROM {table} WHERE Non_unique = 0"):
                keys.setdefault(row.Key_name, []).append((row.Seq_in_index, row.Column_name))
            return any([name for _, name in sorted(columns)] == ["id"] for columns in keys.values())

    def _column_names(self) -> set[str]:
        """The table's columns, from an empty SELECT: reflection costs 25 ms on PostgreSQL, this one round trip."""
        with self.engine.connect() as conn:
            return self._columns_of(conn, self.table_name)

    def _columns_of(self, conn: Connection, table: str) -> set[str]:
        """The columns of ``table``, from an empty SELECT on ``conn`` (a DBAPIError if there is no such table)."""
        quoted = self.engine.dialect.identifier_preparer.quote(table)
        return set(conn.exec_driver_sql(f"SELECT * FROM {quoted} WHERE 1 = 0").keys())

    def _insert_ignore(self, table: sa.Table) -> Any:
        """An INSERT that does nothing when the row exists."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        return sa.insert(table).prefix_with("IGNORE")

    @cached_property
    def _upsert(self) -> tuple[str, list[str] | None]:
        """The dialect's upsert of one row as the driver's SQL, and its parameters' names (None if positional).

        Rows go to the driver's ``executemany`` as they are (see ``_row``): SQLAlchemy's processing of
        each row's parameters costs more than SQLite's own work on it.  Compiled at the first write
        (a few milliseconds that a store opened for reading does not pay).  The table's key is checked
        then too: a copy made with ``CREATE TABLE ... AS SELECT`` has none, and each save would add a row
        for an id held already (MariaDB and MySQL), or fail (the others).  Reading it works.
        """
        if not self._id_is_unique():
            self._column_names()  # a table dropped meanwhile has no key either: the driver says it is not there
            quote = self.engine.dialect.identifier_preparer.quote
            if self.engine.dialect.name == "sqlite":  # which cannot add a primary key to a table
                fix = f"CREATE UNIQUE INDEX {quote(self.table_name + '_id')} ON {quote(self.table_name)} (id)"
            else:
                fix = f"ALTER TABLE {quote(self.table_name)} ADD PRIMARY KEY (id)"
            raise StoreError(
                self._masked(),
                f"table {self.table_name!r} has no primary key (or unique index) on id alone: writing to it would add "
                f"a second row for an id (a copy made with CREATE TABLE ... AS SELECT?); restore the key: {fix}",
            )
        table = self.table
        names = [c.name for c in table.columns]
        dialect = self.engine.dialect.name
        upsert: sa.Insert
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
            upsert = insert.on_conflict_do_update(
                index_elements=[table.c.id], set_={name: insert.excluded[name] for name in names[1:]}
            )
        elif dialect in ("mysql", "mariadb"):
            mysql_insert = mysql.insert(table)
            upsert = mysql_insert.on_duplicate_key_update({name: mysql_insert.inserted[name] for name in names[1:]})
        else:  # pragma: no cover
            raise InvalidArgument(f"SQL store does not support the {dialect!r} database")
        compiled = upsert.compile(dialect=self.engine.dialect, column_keys=names)
        order = compiled.positiontup
        if order is None:  # named parameters, with the names SQLAlchemy gave them (a column name may not do)
            return compiled.string, [compiled.escaped_bind_names.get(name, name) for name in names]
        if list(order) != names:  # pragma: no cover - every dialect binds VALUES in column order
            raise StoreError(self._masked(), f"unexpected parameter order in {compiled.string}")
        return compiled.string, None

    # -- transactions and errors ----------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed on success."""
        with self.engine.connect().execution_options(gc3session_write=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def _failures(self, what: str, target: str | None = None) -> Iterator[None]:
        """Turn database errors into gc3session errors that name the store, without its password."""
        try:
            yield
        except (sa.exc.SQLAlchemyError, self.engine.dialect.loaded_dbapi.Error) as error:  # the driver's own too
            reason = f"{what}: {self._scrub(str(getattr(error, 'orig', None) or error)).splitlines()[0]}"
            if target is not None:
                where = "" if target == self._masked() else f" (store {self._masked()})"
                raise SaveError(target, f"{reason}{where}") from None
            raise StoreError(self._masked(), reason) from None

    def _masked(self) -> str:
        return mask_password(self.url)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- storage primitives ---------------------------------------------------

    def _reserve(self, n: int) -> range:
        counters = self.counters
        where = counters.c.name == self.table_name
        with self._failures("cannot allocate object ids", target=self._masked()):  # part of a save, as a write
            for attempt in retries():
                with attempt, self._transaction() as conn:
                    moved = conn.execute(sa.update(counters).where(where).values(next_id=counters.c.next_id + n))
                    if not moved.rowcount:  # no counter row yet: start above the highest id in the table
                        # (but one that leaves no room for new ids, put there by replace() or an earlier version)
                        below = sa.select(sa.func.max(self.table.c.id)).where(self.table.c.id <= LAST_TAKEN)
                        highest = conn.execute(below).scalar() or 0
                        conn.execute(self._insert_ignore(counters), {"name": self.table_name, "next_id": highest + 1})
                        conn.execute(sa.update(counters).where(where).values(next_id=counters.c.next_id + n))
                    after = conn.execute(sa.select(counters.c.next_id).where(where)).scalar_one()
                    taken = self.table.c.id.between(after - n, after - 1)
                    if n and conn.execute(sa.select(sa.func.count()).where(taken)).scalar():
                        # the counter is behind the rows (edited or restored by hand): move it past them
                        highest = conn.execute(sa.select(sa.func.max(self.table.c.id))).scalar_one()
                        warnings.warn(f"{self}: id counter was behind the table; moved past {highest}",
                                      RepairWarning, stacklevel=6)
                        conn.execute(sa.update(counters).where(where).values(next_id=highest + 1 + n))
                        after = highest + 1 + n
        return range(after - n, after)

    def _bump(self, number: int) -> None:
        counters = self.counters
        where = (counters.c.name == self.table_name) & (counters.c.next_id <= number)
        self._reserve(0)  # makes sure the counter row exists
        with self._failures("cannot advance the id counter", target=self._masked()), self._transaction() as conn:
            conn.execute(sa.update(counters).where(where).values(next_id=number + 1))

    def _write(self, records: list[Record]) -> None:
        """Upsert the records in one transaction, in batches."""
        with self._failures("cannot write", target=records[0].id if len(records) == 1 else f"{len(records)} objects"):
            try:
                upsert, names = self._upsert  # made (and the table's key checked) before a transaction takes a lock
                for attempt in retries():
                    with attempt, self._transaction() as conn:
                        for start in range(0, len(records), BATCH):
                            rows: list[Any] = [self._row(record) for record in records[start : start + BATCH]]
                            if names is not None:
                                rows = [dict(zip(names, row, strict=True)) for row in rows]
                            conn.exec_driver_sql(upsert, rows)
            except sa.exc.DBAPIError as error:
                self._check_packet_size(records, error)
                raise

    def _check_packet_size(self, records: list[Record], error: sa.exc.DBAPIError) -> None:
        """Raise SaveError naming a record larger than MariaDB's or MySQL's ``max_allowed_packet``, if ``error``
        may come from one.

        The server does not say why: it drops the connection ("MySQL server
        has gone away"), or on some versions reports error 1153.
        """
        code = next(iter(getattr(error.orig, "args", ())), None)
        if self.engine.dialect.name not in ("mysql", "mariadb") or code not in (1153, 2006, 2013):
            return  # 1153: packet too big; 2006, 2013: server gone away, connection lost
        biggest = max(records, key=lambda record: len(record.data))
        try:
            with self.engine.connect() as conn:
                limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
        except (sa.exc.SQLAlchemyError, TypeError, ValueError):  # the server is gone indeed: the error says so
            return
        if len(biggest.data) >= limit:
            raise SaveError(
                biggest.id,
                f"its record is {len(biggest.data):,} bytes, more than the max_allowed_packet of {self._masked()} "
                f"({limit:,} bytes): raise that setting on the server, or keep less in the object",
            ) from None

    def _row(self, record: Record) -> tuple[Any, ...]:
        """The values of the table's columns, in order, ready for the driver (bytes, str, int, float or None)."""
        meta = record.meta
        children = meta.get("children")
        state, jobname = _text(meta.get("state"), STATE_WIDTH), _text(meta.get("jobname"))
        cls = _text(meta.get("cls"), NAME_WIDTH)
        returncode = _int32(meta.get("returncode"))
        rest = meta.copy()  # the fields without a column of their own
        for name in META_COLUMNS:
            rest.pop(name, None)
        for name, held in (("state", state), ("jobname", jobname), ("cls", cls), ("returncode", returncode)):
            if held is not meta.get(name):  # the column cannot hold it exactly: the JSON keeps it
                rest[name] = meta[name]
        row = (
            record.number,
            record.id,
            record.data,
            state,
            jobname,
            cls,
            returncode,
            encode_json(children) if children else "[]",
            meta.get("created"),
            meta.get("modified"),
            encode_json(rest),
        )
        if not self._extra:
            return row
        extra = []
        for (column, getter), process in zip(self._extra.items(), self._extra_processors, strict=True):
            try:
                value = getter(record.obj)
            except Exception as error:  # an accessor may fail on any object: store NULL, as documented
                log.debug("extra field %s of %s: %s; storing NULL", column.name, record.id, error)
                value = None
            if process is not None:
                try:
                    value = process(value)
                except Exception as error:
                    raise SaveError(record.id, f"extra field {column.name}: cannot store {value!r}: {error}") from error
            extra.append(value)
        return row + tuple(extra)

    def _read(self, ids: list[str]) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        return self._read_rows(ids, META_COLUMNS)

    def _read_for_load(self, ids: list[str]) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        """The pickle and the ``meta`` JSON only: the other columns hold listing fields, which loading never checks."""
        return self._read_rows(ids, ())

    def _read_rows(
        self, ids: list[str], columns: Sequence[str]
    ) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        """The records of ``ids``, their metadata from ``meta`` and the META_COLUMNS among ``columns``.

        Rows are keyed by number: ids that share one (``Task.1``, ``Other.1``)
        all get its row, and the metadata says which object it holds.
        """
        wanted = {number_of(oid): oid for oid in ids}
        sharing = [oid for oid in ids if wanted[number_of(oid)] != oid] if len(wanted) < len(ids) else []
        shared: dict[int, tuple[Any, list[Any]]] = {}  # the rows that the ids in ``sharing`` need too
        numbers = list(wanted)
        found: dict[str, tuple[dict[str, Any], bytes] | LoadError] = {}
        # one transaction: on SQLite (and MariaDB) every batch of a load sees the same state of the store
        with self._failures("cannot read"), self.engine.connect() as conn, conn.begin():
            for start in range(0, len(numbers), self._read_batch):
                chunk = numbers[start : start + self._read_batch]
                sql, params = self._by_number(("id", "data", "meta", *columns), chunk)
                for number, data, *fields in self._fetch(conn, sql, params):
                    oid = wanted.get(number)
                    if oid is None:  # a row in the span of the chunk that no id asked for
                        continue
                    found[oid] = _record(oid, _metadata(oid, fields, columns), data)
                    if sharing:
                        shared[number] = data, fields
        for oid in sharing:
            row = shared.get(number_of(oid))
            if row is not None:
                found[oid] = _record(oid, _metadata(oid, row[1], columns), row[0])
        return found

    def _delete(self, ids: list[str]) -> None:
        table = self.table
        with self._failures("cannot remove", target=ids[0] if len(ids) == 1 else f"{len(ids)} objects"):
            for attempt in retries():
                with attempt, self._transaction() as conn:
                    for start in range(0, len(ids), BATCH):
                        chunk = ids[start : start + BATCH]
                        numbers = [number_of(oid) for oid in chunk]
                        where = self._one_of(table.c.id, numbers), self._one_of(table.c.persistent_id, chunk)
                        conn.execute(sa.delete(table).where(*where))

    def _one_of(self, column: sa.Column[Any], values: list[Any]) -> Any:
        """``column IN values``; on PostgreSQL ``column = ANY(array)``, one parameter rather than hundreds to parse."""
        if self.engine.dialect.name == "postgresql":
            return column == sa.any_(sa.literal(values, postgresql.ARRAY(column.type)))
        if self._compares_loosely(column):  # byte for byte: the column's bytes are UTF-8 (utf8mb4)
            return sa.cast(column, sa.LargeBinary).in_([str(value).encode() for value in values])
        return column.in_(values)

    def _compares_loosely(self, column: sa.Column[Any]) -> bool:
        """True for a text column of MariaDB or MySQL, which compare text by the table's collation.

        By default that ignores case, accents and trailing spaces:
        ``persistent_id = 'tásk.1'`` holds for ``Task.1``.  Such a column is
        compared as bytes, which needs nothing of the table, so tables made
        by earlier versions work as they are.
        """
        return column.name in TEXT_COLUMNS and self.engine.dialect.name in ("mysql", "mariadb")

    def _list(self, filters: dict[str, Any]) -> list[str]:
        table = self.table
        query = sa.select(table.c.persistent_id).order_by(table.c.id)
        for name, value in filters.items():
            if name not in table.c or name in ("data", "meta"):
                usable = ", ".join(c.name for c in table.columns if c.name not in ("data", "meta"))
                raise InvalidArgument(f"cannot filter {self} by {name!r} (columns: {usable})")
            if isinstance(value, enum.Enum):
                value = value.value
            column = table.c[name]
            if value is None:
                query = query.where(column.is_(None))
            else:
                query = query.where(column == value)
                if isinstance(value, str) and self._compares_loosely(column):  # the test above finds rows by index
                    query = query.where(self._one_of(column, [value]))
        with self._failures("cannot list"), self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def _read_metadata(self, ids: list[str] | None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        return self._rows_of(("persistent_id", "meta", *META_COLUMNS), ids, lambda row: _metadata(row[0], row[1:]))

    def occupants(self, ids: Iterable[str]) -> dict[str, dict[str, Any] | LoadError]:
        """What holds the row of each id: rows are keyed by the number, whatever the id's prefix."""
        check_not_one_id(ids)
        self._check_pid()
        by_number: dict[int, list[str]] = {}
        for oid in ids:
            by_number.setdefault(parse_id(oid)[1], []).append(oid)
        one_each = [oids[0] for oids in by_number.values()]  # one id per number picks the row
        chunks = id_chunks(one_each, self._read_batch)
        found: dict[str, dict[str, Any] | LoadError] = {}
        for _, rows in self._select_chunks(("id", "persistent_id", "meta", *META_COLUMNS), chunks):
            for number, holder, *fields in rows:
                for oid in by_number.get(number, ()):  # none for a row in the span that no id asked for
                    found[oid] = _metadata(holder, fields)
        return found

    def iter_summaries(self, ids: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """Listing fields straight from the columns: no JSON to parse but the children."""
        self._check_pid()
        columns = ("persistent_id", "jobname", "state", "cls", "returncode", "modified", "children")

        def summary(row: Any) -> dict[str, Any]:
            oid, jobname, state, cls, returncode, modified, children = row
            return {"id": oid, "jobname": jobname, "state": state, "cls": cls, "returncode": returncode,
                    "modified": modified, "children": _child_list(oid, children) if children != "[]" else []}

        yield from self._rows_of(columns, ids, summary)

    def iter_children(
        self, ids: Iterable[str], references: bool = False
    ) -> Iterator[tuple[str, list[str] | LoadError]]:
        """The ``children`` column alone: the one place a row keeps them; with ``references``, also those in the
        metadata column."""
        self._check_pid()
        if references:
            yield from self._rows_of(("persistent_id", "children", "meta"), ids, _held)
            return
        yield from self._rows_of(("persistent_id", "children"), ids, lambda row: id_list(_child_list(*row)))

    def _rows_of(
        self, columns: Sequence[str], ids: Iterable[str] | None, convert: Callable[[Any], Any]
    ) -> Iterator[tuple[str, Any]]:
        """``(id, convert(row))`` for ``ids``, or for every row by number when None; NoSuchObject for one missing.

        ``columns`` start with ``persistent_id``: rows are matched to ids by it.
        """
        if ids is None:
            table = self.table
            query = sa.select(*(table.c[name] for name in columns)).order_by(table.c.id)
            with self._failures("cannot list"), self.engine.connect() as conn:
                for row in conn.execution_options(yield_per=BATCH).execute(query):
                    yield row[0], convert(row)
            return
        for chunk, found in self._select_chunks(columns, id_chunks(ids, self._read_batch)):
            rows = {row[0]: row for row in found}
            for oid in chunk:
                hit = rows.get(oid)
                yield oid, convert(hit) if hit is not None else missing(oid, self)

    def _select_chunks(
        self, columns: Sequence[str], chunks: Iterable[list[str]]
    ) -> Iterator[tuple[list[str], Sequence[Any]]]:
        """``(chunk, rows)``: the ``columns`` of the rows of each chunk of ids, selected by number.

        One connection serves the whole stream, each SELECT on its own, in
        autocommit: a listing does not pay a pool checkout and its ping for
        every chunk, nor hold one snapshot from start to end.
        """
        with self._failures("cannot read"), self.engine.connect() as conn:
            if self.engine.dialect.name != "sqlite":  # SQLite's transactions are ours (see _tune_sqlite)
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for chunk in chunks:
                yield chunk, self._fetch(conn, *self._by_number(columns, [number_of(oid) for oid in chunk]))

    def _fetch(self, conn: Connection, sql: str, params: tuple[Any, ...]) -> Sequence[Any]:
        """The rows of the driver's ``sql``, through the driver's own cursor.

        SQLAlchemy's result layer costs more per row than the read itself
        (listing 10,000 tasks from SQLite: 23 ms this way, 27 ms through
        ``exec_driver_sql``).  Failures are handled as SQLAlchemy handles
        its own: a driver error becomes SQLAlchemy's (for
        :meth:`_failures`), and a connection lost, or cut off in the middle
        of the query by Ctrl-C, is thrown away rather than pooled again.
        """
        dialect = self.engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        dbapi_connection = cursor = None
        try:
            pooled = conn.connection
            dbapi_connection = pooled.dbapi_connection  # known before the cursor, which may fail
            cursor = pooled.cursor()
            cursor.execute(sql, params)
            return cursor.fetchall()
        except BaseException as error:
            lost = not isinstance(error, Exception) or (
                isinstance(error, dbapi_error)
                and not conn.invalidated
                and dialect.is_disconnect(error, dbapi_connection, cursor)
            )
            if lost and not conn.invalidated:
                cursor = None  # closing it would only fail again
                conn.invalidate(error)
            if isinstance(error, dbapi_error):
                raise sa.exc.DBAPIError.instance(
                    sql, params, error, dbapi_error, connection_invalidated=lost, dialect=dialect
                ) from error
            raise
        finally:
            if cursor is not None:
                try:
                    cursor.close()
                except dbapi_error:  # a broken connection: the error that matters is already on its way
                    pass

    def _by_number(self, columns: Sequence[str], numbers: list[int]) -> tuple[str, tuple[Any, ...]]:
        """Driver SQL selecting ``columns`` of the rows numbered ``numbers`` (perhaps a few more), and its parameters.

        Written out, not built by SQLAlchemy: building the statement and
        processing each row through it costs more than the database's own
        work (the pickle and metadata of 10,000 records from SQLite: 4.0 µs
        a record this way, 5.2 µs through a SQLAlchemy select).

        Numbers from one counter mostly come in runs: when ``numbers`` fill
        most of the span from the lowest to the highest, the rows of the
        whole span are read, and the caller skips the few it did not ask
        for.  A range scan saves the database planning and probing a list
        (listing 100,000 tasks from PostgreSQL: 0.21 s against 0.33 s).
        Otherwise PostgreSQL takes the numbers as one array, written as its
        text (``{1,2,3}``): the server parses that faster than hundreds of
        parameters, and the driver sends it as it is, where a list of ints
        would be converted number by number in Python (10,000 ids: 18 ms
        against 29 ms).
        """
        dialect = self.engine.dialect
        mark = _PLACEHOLDERS.get(dialect.paramstyle)
        if mark is None:
            reason = f"its driver takes {dialect.paramstyle!r} parameters, which are not supported"
            raise StoreError(self._masked(), reason)
        quote = dialect.identifier_preparer.quote
        head = f"SELECT {', '.join(map(quote, columns))} FROM {quote(self.table_name)} WHERE id"
        low, high = min(numbers, default=0), max(numbers, default=-1)  # none: the empty range
        if high - low < len(numbers) + len(numbers) // 4:  # a quarter more rows at most
            return f"{head} BETWEEN {mark} AND {mark}", (low, high)
        if dialect.name == "postgresql":
            return f"{head} = ANY({mark}::bigint[])", ("{" + ",".join(map(str, numbers)) + "}",)
        return f"{head} IN ({', '.join([mark] * len(numbers))})", tuple(numbers)

    def size(self) -> int | None:
        """Bytes the table takes in the database, where the database tells."""
        self._check_pid()
        dialect = self.engine.dialect.name
        with self._failures("cannot measure"), self.engine.connect() as conn:
            if dialect == "postgresql":
                quoted = self.engine.dialect.identifier_preparer.quote(self.table_name)  # as a regclass reads it
                return conn.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": quoted}).scalar()
            if dialect in ("mysql", "mariadb"):
                query = sa.text(
                    "SELECT data_length + index_length FROM information_schema.tables "
                    "WHERE table_schema = DATABASE() AND table_name = :t"
                )
                value = conn.execute(query, {"t": self.table_name}).scalar()
                return None if value is None else int(value)
        database = _sqlite_file(self._address)
        return os.path.getsize(database) if database is not None and os.path.exists(database) else None

    # -- life cycle -----------------------------------------------------------

    def pre_fork(self) -> None:
        """Close every pooled connection, so that no child inherits one."""
        self.engine.dispose()

    def post_fork(self) -> None:
        """In a child process: drop the inherited pool without closing the parent's connections."""
        super().post_fork()
        self.engine.dispose(close=False)
        self._closer.detach()  # the parent's would only drop this process's connections: ours closes them
        self._closer = weakref.finalize(self, _dispose, self.engine, os.getpid())

    def close(self) -> None:
        """Close the pooled connections (the store reconnects if used again); in a forked child, only its own."""
        self._check_pid()
        self.engine.dispose()


def _dispose(engine: Engine, pid: int) -> None:
    """Close the connections pooled by ``engine`` in process ``pid``; in a forked child, drop them untouched.

    A child's copy of a connection is the parent's too: closing it (at the
    child's exit, say) would close the parent's, on MariaDB at once.
    """
    engine.dispose(close=os.getpid() == pid)


class _Attempt:
    """One try of a transaction; swallows a transient conflict unless it is the last try."""

    def __init__(self, last: bool) -> None:
        self.last = last
        self.failed = False

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is None or self.last or not is_transient(error):
            return False
        log.debug("transient database conflict, trying again: %s", error)
        self.failed = True
        time.sleep(random.uniform(0.01, 0.05))
        return True


def retries(tries: int = 8) -> Iterator[_Attempt]:
    """Attempts at a transaction that deadlocks or meets a serialization failure, until one succeeds."""
    for number in range(tries):
        attempt = _Attempt(last=number == tries - 1)
        yield attempt
        if not attempt.failed:
            return


def is_transient(error: BaseException) -> bool:
    """True for a deadlock, a serialization failure or a lock timeout: the transaction may simply be retried."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if code in ("40001", "40P01"):
        return True
    args = getattr(orig, "args", ())
    if args and args[0] in (1205, 1213):  # MySQL/MariaDB: lock wait timeout, deadlock
        return True
    return "database is locked" in str(orig)


def _tune_sqlite(engine: Engine, fsync: bool, create: bool) -> None:
    """WAL (unless only reading), a busy timeout, and explicit transactions (BEGIN IMMEDIATE for writers)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        if create:  # a store opened only to read (create=False) leaves the file as it is
            # 16 KiB pages for a new database (an existing one keeps its own): records are about 1 KiB of
            # pickle, and bigger pages cut the work of writing them through the WAL by a fifth
            cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        writing = conn.get_execution_options().get("gc3session_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")


def _table_options() -> dict[str, Any]:
    options = {"charset": "utf8mb4", "engine": "InnoDB"}
    return {f"{dialect}_{name}": value for dialect in ("mysql", "mariadb") for name, value in options.items()}


def _split_fragment(url: str) -> tuple[str, str | None]:
    address, sep, fragment = url.partition("#")
    if not sep:
        return url, None
    key, eq, value = fragment.partition("=")
    if key != "table" or not eq or not value:
        raise InvalidArgument(f"store URL {mask_password(url)}: the fragment must be '#table=NAME'")
    return address, value


def _url_secrets(address: str) -> list[str]:
    """The password as written in ``address``, whole and in the pieces between its "@" and ":", longest first.

    SQLAlchemy takes a password only up to its first "@", so the rest of one
    that holds "@" lands in the host and port, and from there in error
    messages; every piece is masked there, even if that masks other words.
    """
    written = written_password(address)
    if not written:
        return []
    return sorted({written, *(part for part in re.split("[@:]", written) if part)}, key=len, reverse=True)


def sqlite_file(url: str) -> str | None:
    """The database file of a ``sqlite://`` store URL; None for an in-memory database or a ``file:`` URI."""
    return _sqlite_file(_with_default_driver(_split_fragment(url)[0]))


def _in_memory(address: sa.URL) -> bool:
    """True for an in-memory SQLite database, which only the engine that opens it sees."""
    return address.get_backend_name() == "sqlite" and address.database in (None, "", ":memory:")


def _has_wal(database: str) -> bool:
    """True when the write-ahead log beside ``database`` holds something (it may hold committed transactions)."""
    try:
        return os.path.getsize(f"{database}-wal") > 0
    except OSError:
        return False


def _on_read_only_filesystem(path: str) -> bool:
    """True when ``path`` (a file, or where it would be) is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no such directory (the open says so), or no statvfs (Windows)
        return False


def _sqlite_file(address: sa.URL) -> str | None:
    database = address.database
    if address.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else database


def _with_default_driver(address: str) -> sa.URL:
    try:
        url = make_url(address)
    except (sa.exc.ArgumentError, ValueError) as error:  # ValueError: a port that is no number
        reason = str(error)
        for secret in _url_secrets(address):
            reason = reason.replace(secret, "***")
        raise InvalidArgument(f"{mask_password(address)} is not a valid database URL: {reason}") from None
    if url.drivername != url.drivername.lower():  # a scheme ignores case; SQLAlchemy's names are lower case
        url = url.set(drivername=url.drivername.lower())
    if "+" not in url.drivername and url.drivername in _DEFAULT_DRIVERS:
        url = url.set(drivername=_DEFAULT_DRIVERS[url.drivername])
    return url


def _fresh(column: sa.Column[Any]) -> sa.Column[Any]:
    """``column`` itself, or a copy when it already belongs to another table."""
    if not isinstance(column, sa.Column):
        raise InvalidArgument(f"extra_fields keys must be sqlalchemy.Column objects, not {column!r}")
    if getattr(column, "table", None) is None:
        return column
    return sa.Column(column.name, column.type, nullable=column.nullable, index=column.index)


def _text(value: Any, size: int | None = None) -> str | None:
    """``value`` fit for a text column of ``size`` characters (NULL if it is no string, longer, or holds NUL).

    PostgreSQL's text cannot hold NUL; the other databases could, but a
    column holds the same everywhere.  Lone surrogates (which UTF-8 cannot
    hold) become "?".  The pickle and the ``meta`` JSON keep the exact
    value; only the column differs.
    """
    if not isinstance(value, str) or (size is not None and len(value) > size) or "\0" in value:
        return None
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _int32(value: Any) -> int | None:
    """``value`` if an INTEGER column holds it (32 bits on PostgreSQL and MariaDB), else NULL."""
    return value if type(value) is int and -(2**31) <= value < 2**31 else None


def _metadata(oid: str, row: Sequence[Any], columns: Sequence[str] = META_COLUMNS) -> dict[str, Any] | LoadError:
    """The metadata record of a row: its ``meta`` column, then the values of ``columns`` that follow it in ``row``.

    What the JSON holds wins: a value a column could not hold exactly, and
    every field of rows that repeat the columns in ``meta``.
    """
    text, *values = row
    try:
        meta = decode_json(text.decode() if isinstance(text, bytes) else text)
    except (TypeError, ValueError):
        return LoadError(oid, "metadata is not valid JSON")
    if not isinstance(meta, dict):
        return LoadError(oid, "metadata is not a JSON object")
    for name, value in zip(columns, values, strict=True):
        if name not in meta:
            meta[name] = _child_list(oid, value) if name == "children" else value
    return meta


def _record(oid: str, meta: dict[str, Any] | LoadError, data: Any) -> tuple[dict[str, Any], bytes] | LoadError:
    """A row's metadata and pickle, or what is wrong with them."""
    if isinstance(meta, LoadError):
        return meta
    if type(data) is bytes:
        return meta, data
    if isinstance(data, (bytearray, memoryview)):  # what some drivers give for a BLOB
        return meta, bytes(data)
    return LoadError(oid, f"the data column holds {type(data).__name__}, not a pickle")


def _held(row: Sequence[Any]) -> list[str] | LoadError:
    """The children and references of a row ``(id, children, meta)``.

    Most rows refer to nothing but their children: a metadata text that
    is a whole object, in which ``"references"`` comes once, as a key with
    an empty list (in JSON a quote inside a string is escaped, and a key is
    followed by a colon), and no ``"children"`` that would win over the
    column, is not parsed.  Any other text is: a damaged one is a LoadError.
    """
    oid, children, text = row
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if isinstance(text, str) and text[:1] == "{" and text[-1:] == "}" and '"children"' not in text:  # not cut
        mentions = text.count('"references"')
        if mentions == 0 or (mentions == 1 and '"references":[]' in text):
            return id_list(_child_list(oid, children))
    meta = _metadata(oid, (text, children), ("children",))
    return meta if isinstance(meta, LoadError) else held_ids(meta)


def _child_list(oid: str, text: Any) -> list[Any]:
    """The ids in a ``children`` column; a damaged one is logged and counts as none."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text or text == "[]":
        return []
    try:
        children = decode_json(text)
    except ValueError:
        children = None
    if not isinstance(children, list):
        log.warning("%s: the children column does not hold a JSON list: %.80r", oid, text)
        return []
    return children


__all__ = ["BATCH", "COUNTERS_TABLE", "CORE_COLUMNS", "META_COLUMNS", "SqlStore"]
