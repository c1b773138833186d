"""``session-tool``: list, inspect, verify, copy, remove and destroy sessions from a shell.

``ls``, ``show``, ``log``, ``stats``, ``rm`` and ``destroy`` read the metadata
that every record carries and never unpickle anything, so they work on
sessions whose task classes cannot be imported and are safe on sessions that
someone else wrote.  Read-only commands write nothing at all.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fnmatch
import functools
import json
import os
import shutil
import sys
import unicodedata
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any

import click

from ._version import __version__
from .exceptions import (
    Error,
    InvalidArgument,
    LoadError,
    OrphanWarning,
    SaveError,
    SessionError,
    StoreNotFound,
    TableNotFound,
)
from .migrate import import_gc3pie
from .persistence import local_store_path
from .persistence.atomic import TEMP_PREFIX
from .persistence.filesystem import FilesystemStore
from .persistence.idfactory import id_list, is_id
from .persistence.store import SECRET_OPTION, Store, make_store, mask_password, same_records
from .progress import ProgressReporter
from .runs import read_runs
from .session import (
    Session,
    is_inside,
    is_session,
    iter_index,
    read_index,
    read_store_url,
    remove_tree,
    resolve_store_url,
    table_not_found,
)
from .task import State
from .unfinished import Refused, Unfinished, check_finished, read_unfinished, running, store_identity

FORMATS = ("table", "json", "csv")
COLUMNS = ("id", "jobname", "state", "class", "returncode", "modified")
#: How many children of one collection ``ls --recursive`` reads at a time.
CHILD_BATCH = 500
#: How many rows of a piped table are written at once.
TABLE_BLOCK = 1000


class SessionView:
    """A session directory opened for reading: its index and its store, nothing written."""

    def __init__(self, path: str, *, unfinished: bool = False) -> None:
        if not path.strip():  # an unset shell variable: not the current directory
            raise InvalidArgument("the session path is empty")
        self.path = os.path.abspath(path)
        if not is_session(self.path):
            raise SessionError(self.path, "is not a session directory (it has no store.url)")
        if not unfinished:  # a copy or an import killed half way: only destroy takes it
            check_finished(self.path)
        self.store_url = read_store_url(self.path)
        self.index_path = os.path.join(self.path, Session.INDEX_FILENAME)

    @cached_property
    def ids(self) -> list[str]:
        return read_index(self.index_path)

    @cached_property
    def id_set(self) -> set[str]:
        return set(self.ids)

    def in_index(self, oid: str) -> bool:
        """Whether the index names ``oid``, read as a stream: in bounded memory, for one look-up."""
        return any(found == oid for found in iter_index(self.index_path))

    @cached_property
    def store(self) -> Store:
        return self.open_store()

    def open_store(self, **options: Any) -> Store:
        """The session's store as it is: nothing is created, and a missing SQL table is a StoreNotFound."""
        url = resolve_store_url(self.path, self.store_url)
        try:
            return make_store(url, create=False, **options)
        except TableNotFound as error:
            where = os.path.join(self.path, Session.STORE_URL_FILENAME)
            raise table_not_found(where, url, error, len(self.ids)) from None

    def metadata(self, ids: Iterable[str]) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        return self.store.iter_metadata(ids)

    def walk(self, recursive: bool) -> Iterator[tuple[int, str | None, str, dict[str, Any] | LoadError]]:
        """``(depth, parent, id, summary)`` of the tasks, children right under their parent when recursive.

        The store is opened by this call, so that a store that cannot be
        opened fails before any of the listing is written.
        """
        return self._walk(self.store.iter_summaries(iter_index(self.index_path)), recursive)

    def _walk(self, summaries: Iterator[tuple[str, dict[str, Any] | LoadError]], recursive: bool) -> Iterator[Any]:
        expanded: set[str] = set()  # the tasks whose children are listed: a shared one shows them once
        for oid, meta in summaries:  # streamed, for huge sessions
            yield 0, None, oid, meta
            # only collections are kept in ``expanded``: a listing of plain tasks holds no set of them all
            if recursive and isinstance(meta, dict) and meta.get("children") and oid not in expanded:
                expanded.add(oid)
                yield from self._children(oid, meta, 1, {oid}, expanded)

    def _children(
        self, parent: str, meta: dict[str, Any], depth: int, seen: set[str], expanded: set[str]
    ) -> Iterator[Any]:
        """The descendants of ``parent``, depth first, each right under its parent.

        A stack of generators, not recursion: a chain of collections
        thousands deep lists as well as a flat one.  A collection met again
        (two others share it) is listed without its children the second
        time, so that shared collections cannot multiply the listing.
        """
        levels = [self._child_rows(parent, meta, depth, seen)]
        while levels:
            row = next(levels[-1], None)
            if row is None:
                levels.pop()
                continue
            depth, parent, oid, child, path = row
            yield depth, parent, oid, child
            if isinstance(child, dict) and child.get("children") and oid not in expanded:
                expanded.add(oid)
                levels.append(self._child_rows(oid, child, depth + 1, path | {oid}))

    def _child_rows(self, parent: str, meta: dict[str, Any], depth: int, path: set[str]) -> Iterator[Any]:
        children = [c for c in id_list(meta.get("children")) if c not in path]  # ``path``: the ancestors
        for start in range(0, len(children), CHILD_BATCH):
            # each batch read to its end before going deeper: a stream open at every level of a deep
            # tree would hold one database connection per level
            for oid, child in list(self.store.iter_summaries(children[start : start + CHILD_BATCH])):
                yield depth, parent, oid, child, path

    def all_metadata(self, follow: tuple[str, ...] = ("children",)) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """Metadata of every task of the session, children (or the ``follow`` fields) included, breadth first."""
        seen: set[str] = set()
        queue = deque(self.ids)
        while queue:
            batch = [queue.popleft() for _ in range(min(len(queue), 500))]
            batch = list(dict.fromkeys(oid for oid in batch if oid not in seen))  # a child two collections share
            seen.update(batch)
            for oid, meta in self.metadata(batch):
                if isinstance(meta, dict):
                    queue.extend(c for f in follow for c in id_list(meta.get(f)))
                yield oid, meta


def history_of(meta: dict[str, Any]) -> list[tuple[float, str]]:
    """The well-formed ``[time, state]`` entries of a metadata record's history."""
    history = meta.get("history")
    if not isinstance(history, list):
        return []
    return [
        (float(entry[0]), str(entry[1]))
        for entry in history
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], (int, float))
    ]


class Tool(click.Group):
    """Turns gc3session errors into one line on stderr and exit status 1 (a traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():  # a warning is one line on stderr, not Python's file:line form
                warnings.simplefilter("default")  # each shown once, whatever filters the process was given
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except Error as error:
            if ctx.meta.get("gc3session.debug"):
                raise
            # a store not found: its hint is Python's (load=False), which means nothing in a shell
            shown = f"{error.path}: {error.reason}" if isinstance(error, StoreNotFound) else str(error)
            raise click.ClickException(shown) from None


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    click.echo(f"warning: {message}", err=True)


session_argument = click.argument("session", type=click.Path(file_okay=False, path_type=str))


@click.group(cls=Tool, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="session-tool")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Look after gc3session sessions: list, inspect, verify, copy, remove, destroy.

    \b
    Example:
      session-tool ls runs/sweep1 --state TERMINATED
    """
    ctx.meta["gc3session.debug"] = debug
    for stream in (sys.stdout, sys.stderr):  # a name holding bytes that are no UTF-8 must not stop the output
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


# -- ls -------------------------------------------------------------------------


@main.command("ls")
@session_argument
@click.option("-r", "--recursive", is_flag=True, help="Show the children of collections under them.")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in State], case_sensitive=False),
              help="Only tasks in this state (repeatable; a name not a state's is refused, not matched by nothing).")
@click.option("--name", "pattern", help="Only tasks whose job name matches this glob.")
@click.option("--failed", is_flag=True, help="Only tasks that ended with a non-zero return code.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def ls(session: str, recursive: bool, states: tuple[str, ...], pattern: str | None, failed: bool, fmt: str) -> None:
    """List the tasks of SESSION: id, job name, state, class, last change.

    \b
    Example:
      session-tool ls runs/sweep1 --recursive --format json
    """
    view = SessionView(session)
    wanted = {s.upper() for s in states}
    listed = view.walk(recursive)
    if wanted or pattern or failed:
        listed = (entry for entry in listed if selected(entry[3], wanted, pattern, failed))
    if fmt == "table":  # the common case, and the one for big sessions: cells straight from the metadata
        write_table((table_cells(oid, meta, depth) for depth, _, oid, meta in listed), sys.stdout.isatty())
        return
    rows = (row_of(oid, meta, depth, parent) for depth, parent, oid, meta in listed)
    if fmt == "json":
        write_json(rows)
    else:
        write_csv(rows)


def selected(meta: dict[str, Any] | LoadError, states: set[str], pattern: str | None, failed: bool) -> bool:
    if not isinstance(meta, dict):
        return not (states or pattern or failed)
    if states and str(meta.get("state")) not in states:
        return False
    if pattern and not fnmatch.fnmatchcase(str(meta.get("jobname") or ""), pattern):
        return False
    return not failed or meta.get("returncode") not in (None, 0)


def row_of(oid: str, meta: dict[str, Any] | LoadError, depth: int = 0, parent: str | None = None) -> dict[str, Any]:
    if isinstance(meta, LoadError):
        return {"id": oid, "jobname": None, "state": "UNREADABLE", "class": None, "returncode": None,
                "modified": None, "depth": depth, "parent": parent, "error": meta.reason}
    return {
        "id": oid,
        "jobname": meta.get("jobname"),
        "state": meta.get("state"),
        "class": meta.get("cls"),
        "returncode": meta.get("returncode"),
        "modified": iso_time(meta.get("modified")),
        "depth": depth,
        "parent": parent,
    }


def write_json(rows: Iterable[dict[str, Any]]) -> None:
    out = sys.stdout
    first = True
    out.write("[")
    for row in rows:
        out.write(("\n  " if first else ",\n  ") + json.dumps(row))
        first = False
    out.write("\n]\n" if not first else "]\n")


def write_csv(rows: Iterable[dict[str, Any]]) -> None:
    fields = [*COLUMNS, "depth", "parent", "error"]
    writer = csv.writer(sys.stdout)
    writer.writerow(fields)
    for row in rows:
        writer.writerow([row.get(name) for name in fields])  # "error" only for a task that cannot be read


def write_table(rows: Iterable[tuple[str, ...]], terminal: bool) -> None:
    """Aligned columns cut to the terminal's width on a terminal; tab-separated, uncut, when piped."""
    headers = ("ID", "JOBNAME", "STATE", "CLASS", "LAST CHANGE")
    if not terminal:
        out = sys.stdout
        out.write("\t".join(headers) + "\n")
        lines: list[str] = []
        try:
            for row in rows:
                lines.append("\t".join(row))
                if len(lines) == TABLE_BLOCK:
                    block, lines = lines, []  # taken first: if writing fails, the clean-up below writes nothing
                    out.write("\n".join(block) + "\n")
        except BaseException:  # the rows listed before a failure of the store still show
            if lines:
                with contextlib.suppress(OSError):  # the store's error is the one to report
                    out.write("\n".join(lines) + "\n")
            raise
        if lines:
            out.write("\n".join(lines) + "\n")
        return
    width = shutil.get_terminal_size((100, 24)).columns
    fixed = {"id": 20, "state": 11, "class": 18, "modified": 19}
    name_width = max(10, width - sum(fixed.values()) - 8)
    widths = (fixed["id"], name_width, fixed["state"], fixed["class"], fixed["modified"])
    click.echo("  ".join(fit(h, w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for oid, *cells in rows:  # an id cut keeps its number: ParallelTaskCollection.10 and .11 must differ
        click.echo("  ".join([fit_id(oid, widths[0]), *(fit(c, w) for c, w in zip(cells, widths[1:], strict=True))])
                   .rstrip())


def table_cells(oid: str, meta: dict[str, Any] | LoadError, depth: int = 0) -> tuple[str, ...]:
    """The table's cells for one task: id (indented by depth), job name, state, class, last change."""
    if isinstance(meta, LoadError):
        return ("  " * depth + oid, f"<{meta.reason}>", "UNREADABLE", "", "")
    get = meta.get
    jobname, state, cls = get("jobname"), get("state"), get("cls")
    # the type tests spare str() for what is text already: the common case, once a task
    jobname = jobname if type(jobname) is str else str(jobname or "")
    state = state if type(state) is str else str(state or "")
    cls = (cls if type(cls) is str else str(cls or "")).rpartition(".")[2]
    if not (jobname.isprintable() and state.isprintable() and cls.isprintable()):
        jobname, state, cls = cell(jobname), cell(state), cell(cls)
    return "  " * depth + oid if depth else oid, jobname, state, cls, table_time(get("modified"))


def cell(text: str) -> str:
    """``text`` with tabs, line ends and other control characters escaped, as they would break the rows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fit(text: str, width: int) -> str:
    """``text`` cut (ending in "…") or padded with spaces to take ``width`` columns of a terminal."""
    if text.isascii():
        return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"
    columns = [_columns(c) for c in text]
    if sum(columns) <= width:
        return text + " " * (width - sum(columns))
    used = end = 0
    while used + columns[end] <= width - 1:  # room for the "…", which takes one column
        used += columns[end]
        end += 1
    return text[:end] + "…" + " " * (width - 1 - used)


def fit_id(text: str, width: int) -> str:
    """An id (indented by its depth) fitted to ``width`` columns, cut in its class name rather than its number."""
    head, dot, number = text.rpartition(".")
    if len(text) <= width or not dot or len(number) + 2 > width:
        return fit(text, width)
    return f"{head[: width - len(number) - 2]}….{number}"


def _columns(char: str) -> int:
    """How many columns of a terminal ``char`` takes: two for wide East Asian ones, none for combining marks."""
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):  # marks drawn over the letter before, invisible ones
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def whole_second(value: Any) -> int | None:
    """``value`` (Unix time) as a whole second that a date can show, or None (no number, NaN, year 10000)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        second = int(value)
        _iso_second(second)
    except (OverflowError, OSError, ValueError):
        return None
    return second


def iso_time(value: Any) -> str | None:
    """``value`` (Unix time) as local ISO 8601 with its offset, to the second."""
    second = whole_second(value)
    return None if second is None else _iso_second(second)


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    # tasks saved in one batch share their second: the cache spares most of the formatting
    return datetime.datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")


def table_time(value: Any) -> str:
    """``value`` (Unix time) as the table shows it, to the second; empty if no date can show it.

    :func:`whole_second`'s checks, with the date's own check left to the
    cached :func:`_table_second`: one look-up a task, on a listing's hot path.
    """
    if type(value) is not float and type(value) is not int:  # the common case first: a number read from JSON
        second = whole_second(value)
        return "" if second is None else _table_second(second)
    try:
        return _table_second(int(value))
    except (OverflowError, ValueError):  # infinite, NaN
        return ""


@functools.lru_cache(maxsize=4096)
def _table_second(second: int) -> str:
    """The table's text for ``second``; empty if no date can show it (year 10000)."""
    try:
        return _iso_second(second)[:19].replace("T", " ")
    except (OverflowError, OSError, ValueError):
        return ""


def local_time(value: Any) -> str:
    second = whole_second(value)
    if second is None or second < 0:
        return "-"
    return datetime.datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")


# -- show, log, stats -----------------------------------------------------------


@main.command()
@session_argument
@click.argument("task_id")
def show(session: str, task_id: str) -> None:
    """Show every metadata field of one task, its children and its state history.

    \b
    Example:
      session-tool show runs/sweep1 Task.17
    """
    view = SessionView(session)
    meta = view.store.metadata(task_id)
    fields = [
        ("id", task_id),
        ("jobname", meta.get("jobname")),
        ("class", meta.get("cls")),
        ("state", meta.get("state")),
        ("returncode", meta.get("returncode")),
        ("created", local_time(meta.get("created"))),
        ("modified", local_time(meta.get("modified"))),
        ("children", " ".join(id_list(meta.get("children"))) or "-"),
        ("references", " ".join(id_list(meta.get("references"))) or "-"),
        ("in index", "yes" if view.in_index(task_id) else "no (a child, or not in this session)"),
        ("size", f"{meta.get('size')} bytes"),
        ("format", f"{meta.get('format')} (written by gc3session {meta.get('version')})"),
    ]
    for name, value in fields:  # cell(): a line end or an escape sequence in a job name shows as such
        click.echo(f"{name + ':':<12}{'-' if value is None else cell(str(value))}")
    try:
        runs = read_runs(view.path)["runs"]
        last = f"; last {run_line(runs[-1])}" if runs else ""
        click.echo(f"session runs: {len(runs)}{last}")
    except SessionError as error:  # the task is shown all the same
        click.echo(f"session runs: unreadable ({error})")
    click.echo("history:")
    for when, state in history_of(meta):
        click.echo(f"  {local_time(when)}  {cell(state)}")


@main.command()
@session_argument
def log(session: str) -> None:
    """Every state change of every task, oldest first: time, id, job name, new state.

    \b
    Example:
      session-tool log runs/sweep1 | tail
    """
    view = SessionView(session)
    events: list[tuple[float, str, str, str]] = []
    for oid, meta in view.all_metadata():
        if isinstance(meta, dict):
            events.extend((when, oid, str(meta.get("jobname") or ""), state) for when, state in history_of(meta))
        else:
            click.echo(f"warning: {meta}", err=True)
    events.sort(key=lambda e: (e[0], e[1]))
    for when, oid, jobname, state in events:
        click.echo(f"{local_time(when)}  {oid}  {cell(jobname)}  {cell(state)}")


@main.command()
@session_argument
def stats(session: str) -> None:
    """Counts by state, number of tasks, times, store URL and size.

    \b
    Example:
      session-tool stats runs/sweep1
    """
    view = SessionView(session)
    top: Counter[str] = Counter()
    every: Counter[str] = Counter()
    top_ids = set(view.ids)
    for oid, meta in view.all_metadata():
        state = meta.get("state") if isinstance(meta, dict) else "UNREADABLE"
        every[str(state)] += 1
        if oid in top_ids:
            top[str(state)] += 1
    size = view.store.size()
    created = os.path.join(view.path, Session.TIMESTAMP_FILES["start"])
    finished = os.path.join(view.path, Session.TIMESTAMP_FILES["end"])
    click.echo(f"session:   {view.path}")
    click.echo(f"store:     {mask_password(view.store_url)}")
    click.echo(f"tasks:     {len(view.ids)} top-level, {sum(every.values())} with children")
    click.echo(f"created:   {local_time(mtime(created))}")
    click.echo(f"finished:  {local_time(mtime(finished))}")
    click.echo(f"size:      {'unknown' if size is None else human_size(size)}")
    click.echo("states (top-level / all):")
    for state in sorted(every):  # cell(): a state from a record edited by hand may hold a line end or an escape
        click.echo(f"  {cell(state):<12}{top[state]:>8} {every[state]:>8}")
    try:
        runs = read_runs(view.path)["runs"]
    except SessionError as error:  # the counts above stand all the same
        click.echo(f"runs:      unreadable ({error})")
        return
    click.echo(f"runs:      {len(runs)}")
    for run in runs:
        click.echo(f"  {run_line(run)}")


def run_line(run: Any) -> str:
    """One run record on one line: start, end, outcome, who, where, what."""
    if not isinstance(run, dict):
        return f"<unreadable run record {run!r}>"
    error = run.get("error")
    failure = error.get("type") if isinstance(error, dict) else error  # a record edited by hand may hold text
    outcome = "open" if run.get("end") is None else ("ok" if not error else f"failed: {failure}")
    who = f"{run.get('user')}@{run.get('host')} pid {run.get('pid')}"
    # records edited by hand, or written by older versions (argv unmasked), may hold anything
    git = run.get("git") if isinstance(run.get("git"), dict) else {}
    commit = f" git {str(git.get('commit'))[:10]}{'+dirty' if git.get('dirty') else ''}" if git else ""
    params = f" params {json.dumps(hide_secrets(run.get('params')))}" if run.get("params") else ""
    argv = run.get("argv") or []
    command = " ".join(mask_password(str(a)) for a in (argv if isinstance(argv, list) else [argv]))
    # cell(): an argument, a user or host name may hold a line end or an escape sequence
    return cell(f"{local_time(run.get('start'))} - {local_time(run.get('end'))}  {outcome}  {who}  "
                f"{command}{commit}{params}")


def hide_secrets(value: Any) -> Any:
    """``value`` (JSON) with what a key named like a password holds, and any password in a URL, as ``***``."""
    if isinstance(value, dict):
        return {key: "***" if SECRET_OPTION.search(str(key)) else hide_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_secrets(item) for item in value]
    return mask_password(value) if isinstance(value, str) else value


def mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


# -- rm, destroy ----------------------------------------------------------------


@main.command()
@session_argument
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--keep-in-store", is_flag=True, help="Only drop them from the session; keep the records.")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
def rm(session: str, task_ids: tuple[str, ...], keep_in_store: bool, dry_run: bool) -> None:
    """Remove tasks (and their children) from SESSION and from its store.

    \b
    Example:
      session-tool rm runs/sweep1 Task.17 Task.18 --dry-run
    """
    view = SessionView(session)
    task_ids = tuple(dict.fromkeys(task_ids))  # an id named twice is removed once
    unknown = [oid for oid in task_ids if oid not in view.id_set]
    if unknown:
        raise click.ClickException(f"not in session {view.path}: {', '.join(unknown)}")
    opened = open_to_change(view)
    verb = "would remove" if dry_run else "removed"
    where = "from the session" if keep_in_store else "from the session and the store"
    for oid in task_ids:  # nothing is written before the flush, which a dry run leaves out
        (opened.forget if keep_in_store else opened.remove)(oid, flush=False)
    removed = list(task_ids) if keep_in_store else opened.pending_deletions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OrphanWarning)
        opened.close(save=not dry_run)  # flushes (unless a dry run), and ends this run's record
    orphans = [w for w in caught if issubclass(w.category, OrphanWarning)]
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    gone = set(removed)
    kept = [oid for oid in task_ids if oid not in gone]  # only their index lines go
    click.echo(f"{verb} {len(removed)} task(s) {where}: {' '.join(removed)}"
               + (f"; only from the session, as other tasks hold or refer to them: {' '.join(kept)}" if kept else ""))
    if orphans:  # shown as it was raised; the tasks are out of the session, but not all records are gone
        raise click.ClickException(f"{len(orphans)} deletion(s) failed: the records named above stay in the store")


@main.command()
@session_argument
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be destroyed, destroy nothing.")
def destroy(session: str, yes: bool, dry_run: bool) -> None:
    """Remove every task of SESSION from its store, then the session directory.

    \b
    Example:
      session-tool destroy runs/old-sweep --yes
    """
    view = SessionView(session, unfinished=True)
    mark = read_unfinished(view.path)
    if mark is not None:
        destroy_unfinished(view, mark, yes, dry_run)
        return
    count = len(view.ids)
    # opened first: a store that cannot be (gone, not mounted, a scheme or variable unknown) is refused by the dry
    # run, and before the question, as the destroy itself refuses it
    opened = open_to_change(view, f"; to drop the session and leave its store as it is, remove {view.path}")
    try:
        going = not dry_run and (yes or click.confirm(f"Destroy session {view.path} and its {count} task(s)?",
                                                      err=True))  # the question on stderr: stdout may be piped
    except BaseException:  # Ctrl-C, or no answer: the run record ends all the same
        opened.close(save=False)
        raise
    if not going:
        opened.close(save=False)
        if not dry_run:
            raise click.Abort()
        click.echo(f"would destroy session {view.path} and its {count} task(s) in {mask_password(view.store_url)}")
        return
    opened.destroy()
    click.echo(f"destroyed session {view.path} ({count} task(s))")


def destroy_unfinished(view: SessionView, mark: tuple[dict[str, Any], list[str]], yes: bool, dry_run: bool) -> None:
    """Destroy what a copy or an import killed half way left (``mark``: its header and the ids it lists): the
    records it wrote, then the directory."""
    header, written = mark
    command = header["command"]
    if running(view.path):
        raise SessionError(view.path, f"is being made by session-tool {command} right now: wait for it to end")
    url = resolve_store_url(view.path, view.store_url)
    store = store_identity(url)
    local = local_store_path(url)
    inside = local is not None and is_inside(local, view.path)  # then the records go with the directory
    if written and not inside and header.get("store") != store:  # store.url edited, or a variable in it set otherwise
        raise SessionError(os.path.join(view.path, Session.STORE_URL_FILENAME),
                           f"names {store}, but the {command} wrote to {header.get('store')}: correct store.url "
                           "(or set its variables) as they were, or remove the directory by hand")
    records = (f"and the {len(written)} record(s) it wrote" if command == "copy"
               else "(its records stay in the store: importing again takes them)")
    what = f"the unfinished {command} {view.path} {records}"
    if dry_run:
        click.echo(f"would destroy {what} in {store}")
        return
    if not yes:
        click.confirm(f"Destroy {what}?", abort=True, err=True)
    if written and not inside:
        with contextlib.closing(view.open_store()) as opened:
            opened.remove_many(written)
    remove_tree(view.path)  # through a symbolic link, its target goes, and the link with it
    click.echo(f"destroyed {what}")


def open_to_change(view: SessionView, advice: str = "") -> Session:
    """The session of ``view``, opened with none of its tasks loaded; a store that is not found is an error that
    gives a shell user's ``advice``, not Python's."""
    try:
        return Session(view.path, create=False, task_ids=[])
    except StoreNotFound as error:
        raise click.ClickException(f"{error.path}: {error.reason}{advice}") from None


# -- verify, copy ---------------------------------------------------------------


@main.command()
@session_argument
@click.option("--allow", "allowed", multiple=True, help="Unpickle only classes of this module (repeatable).")
def verify(session: str, allowed: tuple[str, ...]) -> None:
    """Load every indexed task and report each one missing or unreadable (exit status 1 if any).

    Loading runs the pickles: for a session someone else wrote, name the
    modules you trust with --allow.

    \b
    Example:
      session-tool verify runs/sweep1 --allow mypackage
    """
    view = SessionView(session)
    problems = 0
    lines = read_index(view.index_path, strict=False)
    ids = [line for line in lines if is_id(line)]
    for line in lines:
        if not is_id(line):
            problems += 1
            click.echo(f"{view.index_path}: {line[:60]!r} is not a task id")
    store = view.open_store(**({"allowed_classes": list(allowed)} if allowed else {}))
    errors: dict[str, LoadError] = {}
    for start in range(0, len(ids), 1000):
        store.load_many(ids[start : start + 1000], errors=errors)
        store.invalidate_cache()
    for error in errors.values():
        click.echo(str(error))
    problems += len(errors)
    folders = [view.path] + ([str(store.directory)] if isinstance(store, FilesystemStore) else [])
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError as error:  # the records could not be read either: each said so above
            click.echo(f"note: cannot list {folder}: {error.strerror or error}")
            continue
        for name in names:
            if name.startswith(TEMP_PREFIX):
                click.echo(f"note: {os.path.join(folder, name)} is a temporary file left by an interrupted write "
                           "(never taken for a task; safe to delete when no process uses the session)")
    store.close()
    summary = f"{len(ids) - len(errors)} of {len(ids)} task(s) load"
    click.echo(summary + (f"; {problems} problem(s)" if problems else ""))
    if problems:
        sys.exit(1)


@main.command()
@session_argument
@click.argument("dest", type=click.Path(file_okay=False, path_type=str))
@click.option("--store", "store_url", help="URL of the store for the copy (default: files inside DEST).")
@click.option("--renumber", is_flag=True, help="Give the copies new ids (loads the tasks: needs their classes).")
def copy(session: str, dest: str, store_url: str | None, renumber: bool) -> None:
    """Copy SESSION to a new session DEST, its tasks into a store of any kind.

    Records are copied as they are, with their ids, without unpickling;
    if the destination store already holds other objects under those ids,
    use --renumber.

    \b
    Example:
      session-tool copy runs/sweep1 runs/sweep1-pg --store postgresql://me@db/tasks
    """
    view = SessionView(session)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise click.ClickException(f"{dest} exists and is not an empty directory")
    existed = os.path.isdir(dest)
    written: list[str] = []  # the records the copy wrote: deleted again if it fails, so that a shared store keeps
    copies: list[Any] = []  # no orphans; with --renumber, the objects given new ids
    mark: Unfinished | None = None
    target: Session | None = None
    try:
        target = Session(dest, store_or_url=store_url)  # in here: one that fails half made (a full disk) is cleared
        for plugin in target.hooks.plugins:  # the copy draws its own bar: two would write over each other
            if isinstance(plugin, ProgressReporter):
                target.hooks.unregister(plugin)
        # until the copy is whole; a kill leaves it there
        mark = Unfinished(target.path, "copy", view.path, store_identity(resolve_store_url(target.path,
                                                                                          target.store_url)))
        if renumber:
            missing = renumber_into(view, target, copies, mark)
        else:
            missing = copy_records(view, target, written, mark)
        mark.done()
    except Refused:  # another command's mark, made meanwhile: what is in DEST is that command's
        if target is not None:
            target.store.close()
        raise
    except BaseException:
        if target is not None:
            if renumber:  # each a new record, under a number the store handed out to this copy
                written = [obj.persistent_id for obj in copies if obj.persistent_id is not None]
            try:
                target.store.remove_many(written)
            except Error as failure:  # they stay; DEST is cleared in any case
                click.echo(f"warning: the {len(written)} record(s) the copy wrote stay in the store: {failure}",
                           err=True)
            target.store.close()
        clear_directory(dest, remove=not existed)  # DEST was empty or new: all in it is the copy's
        if mark is not None:  # the lock last: until the clean-up is done, no one takes this copy for killed
            mark.release()
        raise
    copied = len(read_index(os.path.join(target.path, Session.INDEX_FILENAME)))  # what the copy's index names
    target.close()
    click.echo(f"copied {copied} task(s) to {target.path} ({mask_password(target.store_url)})")
    if missing:
        for error in missing:
            click.echo(str(error), err=True)
        sys.exit(1)


def clear_directory(path: str, *, remove: bool) -> None:
    """Delete what is in directory ``path`` (and, with ``remove``, the directory), as far as it can."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(path):
            entry_path = os.path.join(path, entry)
            if os.path.isdir(entry_path) and not os.path.islink(entry_path):
                shutil.rmtree(entry_path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry_path)
        if remove:
            os.rmdir(path)


def copy_records(view: SessionView, target: Session, written: list[str], mark: Unfinished) -> list[LoadError]:
    """Copy raw records, with everything they refer to, keeping ids (put in ``written`` and the session's mark
    once written); return the ones that failed."""
    failed: list[LoadError] = []
    seen: set[str] = set()
    queue = deque(view.ids)
    with progress(len(view.ids), "copying") as bar:
        while queue:
            batch: list[str] = []
            while queue and len(batch) < 1000:
                oid = queue.popleft()
                if oid not in seen:
                    seen.add(oid)
                    batch.append(oid)
            records = []
            for oid, entry in view.store.export(batch):
                if isinstance(entry, LoadError):
                    failed.append(entry)
                    continue
                meta, data = entry
                records.append((oid, meta, data))
                queue.extend({*id_list(meta.get("references")), *id_list(meta.get("children"))})
            copied = {oid: meta for oid, meta, _ in records}
            occupied = target.store.occupants(list(copied))
            if occupied:  # the copies would overwrite other objects, or share these very records
                same = same_records(occupied, {oid: meta.get("crc32") for oid, meta in copied.items()})
                shown = ", ".join(list(occupied)[:5]) + (" ..." if len(occupied) > 5 else "")
                if len(same) == len(occupied):
                    raise click.ClickException(
                        f"the destination store already holds these very records ({shown}): it is the session's "
                        "own store, or holds an earlier copy, and two sessions sharing records lose them when one "
                        "is destroyed; use --renumber"
                    )
                raise click.ClickException(
                    f"the destination store already holds other objects with these ids: {shown}; use --renumber"
                )
            try:
                target.store.import_records(records)
            except SaveError as error:
                if "handed out" not in error.reason and "too high" not in error.reason:  # a write that failed
                    raise
                # a number the destination handed out already, or one it cannot take (see import_records)
                raise click.ClickException(f"{error}; use --renumber") from None
            written.extend(copied)  # once written: a number refused may be another process's, not yet saved
            mark.wrote(list(copied))
            bar.update(sum(1 for oid in copied if oid in view.id_set))
    failed_ids = {e.id for e in failed}
    for oid in view.ids:
        if oid not in failed_ids:
            target._register(oid)
    target.flush()
    return failed


def renumber_into(view: SessionView, target: Session, copies: list[Any], mark: Unfinished) -> list[LoadError]:
    """Load the tasks, and all they hold or refer to (put in ``copies``), and save them into the target with
    fresh ids (put in the session's mark once written); return the ones that failed."""
    errors: dict[str, LoadError] = {}
    tasks = view.store.load_many(view.ids, errors=errors)
    closure = [oid for oid, meta in view.all_metadata(("children", "references")) if isinstance(meta, dict)]
    objects = view.store.load_many([oid for oid in closure if oid not in errors], errors=errors)
    for obj in objects.values():
        obj.persistent_id = None
        obj.changed = True
    copies.extend(objects.values())
    ours = {id(obj) for obj in copies}
    marked: set[str] = set()
    batch: list[Any] = []

    def flush() -> None:  # the batch's tasks, and what they hold or refer to, written: into the mark
        target.flush()
        written = [obj for obj in [*batch, *target.store.referenced(batch)] if id(obj) in ours]
        fresh = [oid for obj in written if (oid := obj.persistent_id) is not None and oid not in marked]
        mark.wrote(fresh)
        marked.update(fresh)
        batch.clear()

    with progress(len(tasks), "copying") as bar:
        for n, task in enumerate(tasks.values(), 1):
            target.add(task, flush=False)
            batch.append(task)
            if n % 1000 == 0:  # written a batch at a time
                flush()
            bar.update(1)
        flush()
    return list(errors.values())


@main.command("import-gc3pie")
@click.argument("source", type=click.Path(file_okay=False, path_type=str))
@click.argument("dest", type=click.Path(file_okay=False, path_type=str))
@click.option("--store-url", "--store", "store_url",
              help="URL of the new session's store (default: files inside DEST).")
@click.option("--jobs-dir", help="Read the gc3pie records from this directory, not the one in SOURCE/store.url.")
@click.option("--skip-damaged", is_flag=True, help="Import the readable records, list the others (exit status 1).")
@click.option("-n", "--dry-run", is_flag=True, help="Check SOURCE and say what would be imported, write nothing.")
def import_gc3pie_command(
    source: str, dest: str, store_url: str | None, jobs_dir: str | None, skip_damaged: bool, dry_run: bool
) -> None:
    """Make a new session DEST from the gc3pie session directory SOURCE.

    Records are copied as they are, with their ids, without unpickling:
    gc3pie need not be installed.  Open DEST with
    class_map=gc3session.migrate.GC3PIE_CLASS_MAP (see docs/gc3pie.md).

    \b
    Example:
      session-tool import-gc3pie ~/gc3pie/sweep1 runs/sweep1 --dry-run
    """
    report = import_gc3pie(source, dest, store_url=store_url, jobs_dir=jobs_dir, skip_damaged=skip_damaged,
                           dry_run=dry_run)
    verb = "would import" if dry_run else "imported"
    where = "" if dry_run else f" ({mask_password(report.store_url or '')})"
    click.echo(f"{verb} {len(report.tasks)} task(s), {report.records} record(s) in all, "
               f"from {report.records_dir} to {report.destination}{where}")
    click.echo(f"classes the records name (loading needs them, or a class_map): {', '.join(sorted(report.classes))}")
    for oid in report.from_backup:
        click.echo(f"note: {oid} was read from its backup {oid}.OLD (gc3pie's last write of it was cut short)")
    for oid, reason in report.damaged.items():
        click.echo(f"not imported: {oid}: {reason}", err=True)
    if report.damaged:
        sys.exit(1)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def progress(length: int, label: str) -> Any:
    """A progress bar on a terminal, nothing otherwise."""
    if sys.stderr.isatty():
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return _NoBar()


if __name__ == "__main__":  # pragma: no cover
    main()
