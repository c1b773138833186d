"""Fixtures shared by the test suite: the same tests run over every kind of store.

Server stores need PostgreSQL and MariaDB/MySQL.  ``GC3SESSION_TEST_POSTGRES_URL``
and ``GC3SESSION_TEST_MYSQL_URL`` name them; when a variable is set and its
server cannot be reached the tests fail, when it is unset the defaults below
are tried and the tests skip, saying why, if nothing answers.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gc3session.persistence import Store, make_store

SERVERS = {
    "postgresql": ("GC3SESSION_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": ("GC3SESSION_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
STORE_KINDS = ["file", "sqlite", "postgresql", "mysql"]
_reachable: dict[str, str | None] = {}


def server_url(kind: str) -> str:
    """The URL of the test server for ``kind``; skip or fail as the module docstring says."""
    variable, default = SERVERS[kind]
    url = os.environ.get(variable) or default
    if kind not in _reachable:
        _reachable[kind] = _probe(url)
    problem = _reachable[kind]
    if problem is not None:
        if os.environ.get(variable):
            pytest.fail(f"{variable} is set but {kind} cannot be reached: {problem}")
        pytest.skip(f"no {kind} server at {default} ({problem}); set {variable} to test against one")
    return url


def _probe(url: str) -> str | None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # any failure means: not usable for tests
        return f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return None


def drop_table(url: str, table: str) -> None:
    """Remove a test table and its counter row from a server."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"DROP TABLE IF EXISTS {engine.dialect.identifier_preparer.quote(table)}"))
        inspector = sqlalchemy.inspect(conn)
        if inspector.has_table("gc3session_counters"):
            conn.execute(sqlalchemy.text("DELETE FROM gc3session_counters WHERE name = :n"), {"n": table})
    engine.dispose()


@pytest.fixture(autouse=True)
def close_every_store(monkeypatch: Any) -> Iterator[None]:
    """Close the stores that sessions open, so no database connection outlives its test."""
    from gc3session import session as session_module

    opened: list[Store] = []

    def recording_make_store(url: Any, **kwargs: Any) -> Store:
        store = make_store(url, **kwargs)
        opened.append(store)
        return store

    monkeypatch.setattr(session_module, "make_store", recording_make_store)
    yield
    for store in opened:
        store.close()


@pytest.fixture
def store_url_of(tmp_path: Any) -> Iterator[Callable[[str], str]]:
    """A function giving a fresh store URL of a kind (and table, if given); server tables are dropped afterwards."""
    tables: list[tuple[str, str]] = []

    def url_of(kind: str, table: str | None = None) -> str:
        if kind == "file":
            return str(tmp_path / f"store-{secrets.token_hex(3)}")
        if kind == "sqlite":
            fragment = "" if table is None else f"#table={table}"
            return f"sqlite:///{tmp_path}/store-{secrets.token_hex(3)}.db{fragment}"
        base = server_url(kind)
        table = table or f"t_{secrets.token_hex(6)}"
        tables.append((base, table))
        return f"{base}#table={table}"

    yield url_of
    for base, table in tables:
        drop_table(base, table)


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: Any) -> str:
    """Each kind of store in turn."""
    return request.param


@pytest.fixture
def store_url(store_url_of: Callable[[str], str], store_kind: str) -> str:
    """A URL for a fresh, empty store of each kind in turn."""
    return store_url_of(store_kind)


@pytest.fixture
def open_store(store_url: str) -> Iterator[Callable[..., Store]]:
    """Open (another handle on) the fresh store; every handle is closed afterwards."""
    stores: list[Store] = []

    def opener(**kwargs: Any) -> Store:
        store = make_store(store_url, **kwargs)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., Store]) -> Store:
    """A fresh, empty store of each kind in turn."""
    return open_store()
