"""Import a gc3pie session directory into gc3session, without unpickling anything.

A gc3pie session directory holds ``session_ids.txt`` (the ids of its tasks,
separated by white space), ``store.url`` (where the records are), and the
``created`` and ``finished`` timestamp files.  gc3pie's filesystem store
keeps each object as a bare pickle in a file named by its id; any other
``Persistable`` the object refers to is written as a pickle *persistent id*
(a ``PERSID`` or ``BINPERSID`` opcode) holding that object's id.

:func:`import_gc3pie` reads those pickles opcode by opcode, on a symbolic
stack (:func:`gc3session.persistence.opcodes.trace`), never calling
:mod:`pickle`, so gc3libs need not be installed and no code in the records
runs.  From each pickle it learns the class, the ids it refers to, and where
it can, the job name, state, return code and state times; then it writes the
pickle unchanged, with gc3session metadata beside it, through
:meth:`Store.import_records <gc3session.persistence.store.Store.import_records>`.
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .exceptions import Error, InvalidArgument, LoadError, SaveError, SessionError, StoreError
from .persistence.idfactory import is_id, parse_id
from .persistence.opcodes import Built, CorruptPickle, Global, attributes, class_path, trace
from .persistence.serialization import FORMAT_VERSION
from .persistence.store import mask_password, same_records, url_scheme
from .session import Session, is_session, resolve_store_url
from .task import State
from .unfinished import Refused, Unfinished, store_identity

log = logging.getLogger(__name__)

#: The files of a gc3pie session directory.
GC3PIE_INDEX = "session_ids.txt"
GC3PIE_STORE_URL = "store.url"
GC3PIE_TIMESTAMPS = {"start": "created", "end": "finished"}
#: gc3pie's id class and the stand-in that lets gc3session load imported records without gc3libs.
GC3PIE_CLASS_MAP = {"gc3libs.persistence.idfactory.Id": "gc3session.migrate.GC3PieId"}
#: Records written per batch.
BATCH = 500

_STATES = frozenset(s.value for s in State)
#: The URL schemes of gc3pie's SQL store (any SQLAlchemy dialect it lists).
_SQL_SCHEMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb", "firebird", "mssql", "oracle",
                          "sybase"})


class GC3PieId(str):
    """Loads gc3pie's ``Id`` (a string such as ``Application.12``) as a string; pickled again, it is a plain ``str``.

    Use it through ``class_map=GC3PIE_CLASS_MAP`` when opening an imported session.
    """

    __slots__ = ()

    def __new__(cls, prefix: Any = None, seqno: Any = None) -> GC3PieId:
        return super().__new__(cls, f"{prefix}.{seqno}")

    def __setstate__(self, state: Any) -> None:
        """gc3pie pickles the prefix and number once more: the text already holds both."""

    def __reduce__(self) -> tuple[Any, ...]:
        return str, (str.__str__(self),)


@dataclass
class ImportReport:
    """What :func:`import_gc3pie` did, or with ``dry_run``, would do.

    ``tasks`` are the ids put in the new index, ``records`` counts every record
    written (children included), ``damaged`` maps each record that could not be
    read to the reason, ``from_backup`` lists records read from gc3pie's
    ``<id>.OLD`` backups, and ``classes`` names every global the pickles use:
    what loading them needs, as classes or through ``class_map``.
    """

    source: str
    destination: str
    records_dir: str
    store_url: str | None = None
    tasks: list[str] = field(default_factory=list)
    records: int = 0
    damaged: dict[str, str] = field(default_factory=dict)
    from_backup: list[str] = field(default_factory=list)
    classes: set[str] = field(default_factory=set)
    dry_run: bool = False


def import_gc3pie(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    store_url: str | None = None,
    jobs_dir: str | os.PathLike[str] | None = None,
    skip_damaged: bool = False,
    dry_run: bool = False,
    **store_args: Any,
) -> ImportReport:
    """Make a new gc3session session at ``destination`` from the gc3pie session directory ``source``.

    Every task listed in ``session_ids.txt`` is imported with every record it
    refers to, keeping their ids.  ``store_url`` chooses the new session's
    store (default: files in ``destination/jobs``); ``store_args`` go to the
    store as in :class:`~gc3session.Session`.  ``jobs_dir`` reads the
    records from that directory instead of the one ``store.url`` names.

    Everything is read and checked before anything is written: bad input
    raises a :class:`~gc3session.exceptions.Error` and leaves ``destination``
    untouched.  A record that cannot be read stops the import, unless
    ``skip_damaged``: then the others are imported and the failures are listed
    in the report's ``damaged``.  ``dry_run`` checks and reports, writes nothing.
    """
    source = os.path.abspath(os.fspath(source))
    destination = os.path.abspath(os.fspath(destination))
    _check_destination(destination)
    _check_source(source)
    records_dir = _records_dir(source, jobs_dir)  # before the index: a SQL store's ids are numbers, refused there
    ids = _read_index(source)
    if store_url is not None and url_scheme(store_url) in (None, "file"):
        target_dir = store_url[len("file://"):] if store_url.startswith("file://") else store_url
        if os.path.realpath(target_dir) == os.path.realpath(records_dir):
            raise InvalidArgument(f"the new store {store_url} is the gc3pie store {records_dir}: choose another place")
    report = ImportReport(source, destination, records_dir, store_url, dry_run=dry_run)
    found = _scan(ids, records_dir, report)
    _check_numbers(found, records_dir)
    if report.damaged and not skip_damaged:
        first, reason = next(iter(report.damaged.items()))
        more = len(report.damaged) - 1
        also = f"; {more} more cannot be read: {', '.join(list(report.damaged)[1:6])}" if more else ""
        rest = "skip_damaged=True (--skip-damaged) imports the rest"
        raise LoadError(first, f"{reason}{also}; nothing was written; {rest}")
    report.tasks = [oid for oid in ids if oid in found]
    report.records = len(found)
    if not dry_run:
        _write(report, found, store_args)
    return report


# -- reading the gc3pie session ---------------------------------------------------


def _check_destination(destination: str) -> None:
    if os.path.lexists(destination) and not os.path.isdir(destination):
        raise SessionError(destination, "exists and is not a directory")
    if os.path.isdir(destination) and os.listdir(destination):
        if os.path.exists(os.path.join(destination, GC3PIE_INDEX)):
            raise SessionError(destination, "is a gc3pie session: the new session needs a new directory")
        if is_session(destination):
            raise SessionError(destination, "is already a session: choose a new directory")
        raise SessionError(destination, "exists and is not empty: choose a new directory")


def _check_source(source: str) -> None:
    if not os.path.isdir(source):
        raise SessionError(source, "no such directory" if not os.path.lexists(source) else "is not a directory")
    path = os.path.join(source, GC3PIE_INDEX)
    if not os.path.isfile(path):
        if os.path.exists(os.path.join(source, Session.INDEX_FILENAME)):
            reason = "missing: this is a gc3session session already (use session-tool copy to move it)"
        else:
            reason = "missing: this is not a gc3pie session directory"
        raise SessionError(path, reason)


def _read_index(source: str) -> list[str]:
    path = os.path.join(source, GC3PIE_INDEX)
    try:
        with open(path, "rb") as f:
            words = f.read().decode("utf-8").split()
    except (OSError, UnicodeDecodeError) as error:
        raise SessionError(path, f"cannot read the task ids: {error}") from error
    for word in words:
        if not is_id(word):
            raise SessionError(path, f"{word[:60]!r} is not an id of a gc3pie filesystem store (like 'Application.12')")
    return list(dict.fromkeys(words))


def _records_dir(source: str, jobs_dir: str | os.PathLike[str] | None) -> str:
    if jobs_dir is not None:
        path = os.path.abspath(os.fspath(jobs_dir))
        if not os.path.isdir(path):
            raise SessionError(path, "no such directory of gc3pie records")
        return path
    url_file = os.path.join(source, GC3PIE_STORE_URL)
    try:
        with open(url_file, encoding="utf-8") as f:
            url = f.read().strip()
    except FileNotFoundError:
        raise SessionError(url_file, "missing: the gc3pie session does not say where its records are") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SessionError(url_file, f"cannot read the store URL: {error}") from error
    if not url:
        raise SessionError(url_file, "is empty: the gc3pie session does not say where its records are")
    scheme = url_scheme(url)
    if scheme in _SQL_SCHEMES:
        raise StoreError(mask_password(url), (
            "gc3pie SQL stores cannot be imported: their ids are bare numbers, pickled into every record, while "
            "gc3session ids are Prefix.N. Move the tasks into a gc3pie session with the default filesystem store "
            "first (with gc3pie), then import that"))
    if scheme not in (None, "file"):
        raise StoreError(mask_password(url), f"not a gc3pie filesystem store (scheme {scheme!r}): cannot be imported")
    path = url[len("file://"):].split("#")[0] if scheme == "file" else url
    path = path[len("localhost"):] if path.startswith("localhost/") else path
    path = os.path.join(source, path)  # an absolute path stays as it is
    if os.path.isdir(path):
        return path
    moved = os.path.join(source, "jobs")
    if os.path.isdir(moved):
        log.debug("%s names %s, which is missing; reading %s", url_file, path, moved)
        return moved
    raise SessionError(url_file, f"names {path}, which does not exist (say where the records are with --jobs-dir)")


def _scan(ids: list[str], records_dir: str, report: ImportReport) -> dict[str, dict[str, Any]]:
    """Metadata of every record reachable from ``ids``; failures go to ``report.damaged``."""
    found: dict[str, dict[str, Any]] = {}
    queue = deque(ids)
    seen = set(ids)
    while queue:
        oid = queue.popleft()
        try:
            path, data, mtime, fields, names = _read_record(records_dir, oid)
        except LoadError as error:
            report.damaged[oid] = error.reason
            continue
        if path.endswith(".OLD"):
            report.from_backup.append(oid)
        report.classes.update(names)
        meta = {"format": FORMAT_VERSION, "version": __version__, "id": oid, **fields, "created": None,
                "modified": mtime, "size": len(data), "crc32": zlib.crc32(data), "origin": "gc3pie"}
        found[oid] = {"path": path, "meta": meta}
        for ref in meta["references"]:
            if ref not in seen:
                seen.add(ref)
                queue.append(ref)
    return found


def _read_record(records_dir: str, oid: str) -> tuple[str, bytes, float, dict[str, Any], set[str]]:
    """Path, pickle, time, metadata and globals of ``oid``; from ``<id>.OLD`` when gc3pie's last write was cut short."""
    path = os.path.join(records_dir, oid)
    problem = None
    for candidate in (path, path + ".OLD"):
        try:
            with open(candidate, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
            return candidate, data, mtime, *_describe(oid, data)
        except FileNotFoundError:
            problem = problem or f"no such record: {path}"
        except OSError as error:
            problem = problem or f"cannot read {candidate}: {error.strerror or error}"
        except LoadError as error:
            problem = problem or f"{candidate}: {error.reason}"
    raise LoadError(oid, str(problem))


def _check_numbers(found: dict[str, Any], records_dir: str) -> None:
    numbers: dict[int, str] = {}
    for oid in found:
        other = numbers.setdefault(parse_id(oid)[1], oid)
        if other != oid:
            raise SessionError(records_dir, f"records {other} and {oid} share the number {parse_id(oid)[1]}: "
                                            "gc3session ids must differ in their number")


# -- reading one pickle without unpickling it -------------------------------------


@dataclass(frozen=True)
class _Ref:
    id: str


def describe_gc3pie_record(oid: str, data: bytes) -> dict[str, Any]:
    """The metadata fields of a gc3pie pickle, read from its opcodes: nothing is unpickled.

    ``cls``, ``references`` and ``children`` come from the pickle's structure;
    ``jobname``, ``state``, ``returncode`` and ``history`` are filled when the
    object keeps them as gc3libs' tasks do, and are None (or empty) otherwise.
    """
    return _describe(oid, data)[0]


def _describe(oid: str, data: bytes) -> tuple[dict[str, Any], set[str]]:
    """The metadata fields of a gc3pie pickle, and the globals (classes, functions) it names."""
    refs: list[str] = []

    def reference(pid: Any) -> _Ref:
        text = _pid_text(pid)
        if text is None or not is_id(text):
            raise LoadError(oid, f"refers to another record as {_shown(pid)}, not by an id like 'Application.12'")
        refs.append(text)
        return _Ref(text)

    try:
        found = trace(data, reference)
        return _fields(oid, found.root, refs), found.globals
    except LoadError:
        raise
    except CorruptPickle as error:
        raise LoadError(oid, f"corrupt pickle: {error}") from None
    except Exception as error:  # genops raises ValueError on a cut pickle; a malformed one may raise anything
        raise LoadError(oid, f"not a readable pickle ({type(error).__name__}: {error})") from None


def _fields(oid: str, root: Any, refs: list[str]) -> dict[str, Any]:
    if not isinstance(root, Built):
        raise LoadError(oid, "the pickle holds no object")
    attrs = attributes(root) or {}
    holds = _pid_text(attrs.get("persistent_id"))
    if attrs and holds != oid:
        raise LoadError(oid, f"the record holds object {holds!r}" if holds else "the object has no persistent_id")
    execution = attributes(attrs.get("execution")) or {}
    children = attrs.get("tasks")
    return {
        "cls": class_path(root),
        "jobname": attrs["jobname"] if isinstance(attrs.get("jobname"), str) else None,
        "state": _state(execution),
        "returncode": _returncode(execution),
        "children": [c.id for c in children if isinstance(c, _Ref)] if isinstance(children, (list, tuple)) else [],
        "references": sorted(set(refs)),
        "history": _history(execution),
    }


def _pid_text(value: Any) -> str | None:
    """The id a persistent id stands for: a string, or gc3pie's ``Id(prefix, number)`` object."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, Built) and isinstance(value.args, tuple):
        args = value.args
        if len(args) == 2 and isinstance(args[1], int) and not isinstance(args[1], bool):
            prefix = _pid_text(args[0])
            return f"{prefix}.{args[1]}" if prefix else None
        return next((text for text in map(_pid_text, args) if text and is_id(text)), None)
    return None


def _shown(pid: Any) -> str:
    if isinstance(pid, Built) and isinstance(pid.cls, Global) and isinstance(pid.args, tuple):
        return f"a {pid.cls}{tuple(a for a in pid.args if not isinstance(a, Built))!r}"[:120]
    return repr(pid)[:80]


def _state(execution: dict[str, Any]) -> str | None:
    state = execution.get("_state", execution.get("state"))
    state = _pid_text(state) if isinstance(state, Built) else state  # gc3session's own State pickles as State('NEW')
    return state if isinstance(state, str) and state in _STATES else None


def _returncode(execution: dict[str, Any]) -> int | None:
    def number(name: str) -> int | None:
        value = execution.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**24 else None

    if number("returncode") is not None:
        return number("returncode")
    exitcode, signal = number("_exitcode"), number("_signal")
    if exitcode is None and signal is None:
        return None
    return ((-1 if exitcode is None else exitcode) << 8) | (signal or 0)  # gc3libs' Run.returncode


def _history(execution: dict[str, Any]) -> list[list[Any]]:
    """``[[time, state], ...]`` from gc3libs' ``Run.timestamp`` (the last time each state was reached)."""
    stamps = execution.get("timestamp")
    pairs: Iterable[Any] = ()
    if isinstance(stamps, dict):
        pairs = stamps.items()
    elif isinstance(stamps, Built):
        pairs = stamps.items.items()
        args = stamps.args if isinstance(stamps.args, tuple) else ()
        if not stamps.items and len(args) == 1 and isinstance(args[0], list):  # Python 2: OrderedDict(items)
            pairs = [tuple(p) for p in args[0] if isinstance(p, (list, tuple)) and len(p) == 2]
    return sorted([float(when), state] for state, when in pairs
                  if isinstance(state, str) and state in _STATES and isinstance(when, (int, float))
                  and not isinstance(when, bool) and 0 <= when < 2**40)


# -- writing the gc3session session -------------------------------------------------


def _write(report: ImportReport, found: dict[str, dict[str, Any]], store_args: dict[str, Any]) -> None:
    params = {"imported_from": report.source, "gc3pie_records": report.records_dir, "gc3pie_command": None}
    try:  # gc3pie writes the command line that made the session into ``created``
        with open(os.path.join(report.source, GC3PIE_TIMESTAMPS["start"]), encoding="utf-8", errors="replace") as f:
            params["gc3pie_command"] = f.readline(2000).strip() or None
    except OSError:
        pass
    written: list[str] = []  # deleted again if the import fails, so that a shared store keeps no orphans
    mark: Unfinished | None = None
    target: Session | None = None
    try:
        # in here: a session that fails half made (a full disk) is removed, and the import can run again
        target = Session(report.destination, store_or_url=report.store_url, params=params, **store_args)
        # until the session is whole; it names no records: a run again may take those a killed import wrote
        mark = Unfinished(target.path, "import-gc3pie", report.source,
                          store_identity(resolve_store_url(target.path, target.store_url)))
        there = _refuse_clashes(target, found)
        ids = list(found)
        for start in range(0, len(ids), BATCH):
            batch = []
            for oid in ids[start : start + BATCH]:
                entry = found[oid]
                with open(entry["path"], "rb") as f:
                    data = f.read()
                if zlib.crc32(data) != entry["meta"]["crc32"]:
                    raise SaveError(oid, f"{entry['path']} changed during the import: run it again when gc3pie is done")
                batch.append((oid, entry["meta"], data))
            target.store.import_records(batch)
            written.extend(oid for oid, _, _ in batch if oid not in there)
        for oid in report.tasks:
            target._register(oid)
        target.flush()
        for key, name in GC3PIE_TIMESTAMPS.items():
            stamp = os.path.join(report.source, name)
            if os.path.exists(stamp):
                setter = target.set_start_timestamp if key == "start" else target.set_end_timestamp
                setter(os.stat(stamp).st_mtime)
        mark.done()
    except Refused:  # another command's mark, made meanwhile: what is in the directory is that command's
        if target is not None:
            target.store.close()
        raise
    except BaseException:
        if target is not None:
            try:
                target.store.remove_many(written)
            except Error as error:  # they stay; the new session goes in any case
                log.warning("the %d record(s) the import wrote stay in the store: %s", len(written), error)
            target.store.close()
        shutil.rmtree(report.destination, ignore_errors=True)  # absolute: see import_gc3pie
        if mark is not None:  # the lock last: until the clean-up is done, no one takes this import for killed
            mark.release()
        raise
    target.close()
    report.store_url = target.store_url


def _refuse_clashes(target: Session, found: dict[str, dict[str, Any]]) -> set[str]:
    """Refuse to overwrite other objects that a shared destination store holds where these would go: under the
    same ids, or the same numbers (a SQL row is keyed by the number alone).  The very same records (an import
    that was killed, run again) are taken as they are: their ids are returned."""
    occupied = target.store.occupants(list(found))
    same = same_records(occupied, {oid: found[oid]["meta"]["crc32"] for oid in occupied})
    clashes = [oid for oid in occupied if oid not in same]
    if clashes:
        shown = ", ".join(clashes[:5]) + (" ..." if len(clashes) > 5 else "")
        raise SaveError(shown, f"the store {mask_password(target.store_url)} holds other objects with these ids")
    return same


__all__ = ["GC3PIE_CLASS_MAP", "GC3PieId", "ImportReport", "describe_gc3pie_record", "import_gc3pie"]
