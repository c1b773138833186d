"""A session: a directory that owns a set of tasks kept in a store.

The directory holds ``index.txt`` (the ids of the session's top-level tasks,
one a line), ``store.url`` (where the tasks live) and the ``created`` and
``finished`` timestamp files.  Adding a task appends one line to the index
under a file lock, so the cost of ``add`` does not grow with the session and
several processes can add to one session at once; removals rewrite the index
atomically, merging with whatever other processes appended meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import shutil
import stat
import tempfile
import threading
import time as _time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Container, ItemsView, Iterable, Iterator, Mapping, ValuesView
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock

from .exceptions import (
    InvalidArgument,
    LoadError,
    LoadWarning,
    OrphanWarning,
    RepairWarning,
    RunRecordWarning,
    SaveError,
    SessionError,
    StoreNotFound,
    TableNotFound,
)
from .persistence import SQL_SCHEMES, local_store_path
from .persistence.atomic import write_atomically
from .persistence.filesystem import FilesystemStore
from .persistence.idfactory import PLAIN_ID_LINES, is_id, number_of, parse_id
from .persistence.store import (
    LAST_TAKEN,
    Store,
    check_not_mistyped,
    check_not_one_id,
    check_option_names,
    check_options,
    expand_variables,
    make_store,
    mask_password,
    url_scheme,
)
from .plugins import Hooks
from .runs import check_params, error_record, new_run, read_runs, update_runs
from .unfinished import check_finished

log = logging.getLogger(__name__)


class Session:
    """A persistent collection of tasks in directory ``path``.

    A missing directory is created (unless ``create=False``); an existing
    session is loaded (unless ``load=False``, which starts a new one there).
    ``store_or_url`` (a :class:`~gc3session.persistence.Store` or a URL) and
    ``extra_args`` choose the store of a new session; an existing one uses
    the URL in its ``store.url``.  ``extra_args`` always reach
    :func:`~gc3session.persistence.make_store`, so ``class_map`` and
    ``allowed_classes`` work when reopening too.  ``task_ids`` loads only
    those tasks.  ``lazy=True`` reads only the index: each task is loaded
    when first touched (``session.tasks[id]``, iteration).  ``params`` are
    kept in this open's run record (:attr:`runs`).  ``plugins`` are added to
    those of the ``gc3session.plugins`` entry points, which
    ``autoload_plugins=False`` leaves out (see :mod:`gc3session.plugins`).
    """

    INDEX_FILENAME = "index.txt"
    STORE_URL_FILENAME = "store.url"
    TIMESTAMP_FILES = {"start": "created", "end": "finished"}  # noqa: RUF012 - gc3libs' public constant
    DEFAULT_STORE_DIR = "jobs"
    LOCK_FILENAME = ".lock"
    _opening_later = False  # a subclass that loads its tasks after __init__ calls session_opened itself
    _owns_its_store = True  # refuses a store inside another session's directory (a temporary session only looks)

    def __init__(
        self,
        path: str | os.PathLike[str],
        create: bool = True,
        store_or_url: Store | str | os.PathLike[str] | None = None,
        load: bool = True,
        task_ids: Iterable[str] | None = None,
        *,
        lazy: bool = False,
        params: dict[str, Any] | None = None,
        plugins: Iterable[object] = (),
        autoload_plugins: bool | None = None,
        **extra_args: Any,
    ) -> None:
        for name, value in (("session path", path), ("store URL", store_or_url)):
            if (value is None and name == "store URL") or isinstance(value, Store):
                continue
            text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
            if not isinstance(text, str) or "\0" in text:
                raise InvalidArgument(f"the {name} must be a string or path without NUL bytes, not {value!r}")
        # an empty string (an unset shell variable, often) would mean the current directory
        if isinstance(path, str) and not path.strip():
            raise InvalidArgument("the session path is empty")
        if isinstance(store_or_url, (str, os.PathLike)) and not str(os.fspath(store_or_url)).strip():
            raise InvalidArgument(f"the store URL for session {os.path.abspath(path)} is empty")
        self.path = os.path.abspath(os.fspath(path))
        check_params(params)  # before anything is made
        check_task_ids(task_ids)
        check_options(extra_args, names=False)  # names when the store is known: a plugin's store takes its own
        #: The session's plugins (see :mod:`gc3session.plugins`).
        self.hooks = Hooks(plugins, autoload=autoload_plugins)
        self.name = os.path.basename(self.path)
        self.tasks = TaskMap(self._load_lazily)
        self.load_errors: dict[str, LoadError] = {}
        self._index: dict[str, None] = {}
        self._added: dict[str, None] = {}
        self._removed: set[str] = set()
        self._unsaved: dict[str, Any] = {}
        self._doomed: dict[str, bool] = {}  # id -> named by remove() (else: doomed as a descendant)
        self._pending: tuple[Any, list[str]] | None = None  # pending_deletions(), and what it was worked out from
        self._mutex = threading.RLock()
        self._file_lock = FileLock(self._file(self.LOCK_FILENAME))
        self._lock_pid = os.getpid()
        self._past_index = False  # whether the store was told to number new tasks above every id of the index
        self._finished = False  # closed (by close() or the end of a with block)
        self._destroyed = False  # by destroy(): nothing may be written any more, which would make the directory again
        self._forgotten: set[str] = set()  # forgotten since the last flush: their records still hold children
        self._retry: dict[str, str] = {}  # id -> "remove" or "forget": a call whose flush failed, to call again
        # objects loaded with load(add=False) that are no task of the session (a child, in a lazy session): saved
        # by save_all like the tasks loaded (held here: a change made through a reference dropped since is saved)
        self._apart: dict[str, Any] = {}

        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise SessionError(self.path, "exists and is not a directory")
        if os.path.isdir(self.path):  # also when starting it over (load=False): its mark names records to delete
            check_finished(self.path)
        if not os.path.isdir(self.path) and not create:
            raise InvalidArgument(f"session directory {self.path} does not exist (and create=False)")
        if load and self._has_session_files():
            self._open(extra_args, task_ids, lazy)
        elif not self._create(store_or_url, extra_args, only_new=load):  # another process made it meanwhile
            self._open(extra_args, task_ids, lazy)
        self._run = new_run(params)
        self.session_id = self._record_run()
        if not self._opening_later:
            self.hooks.call("session_opened", session=self)

    # -- opening and creating ---------------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _has_session_files(self) -> bool:
        return any(os.path.lexists(self._file(n)) for n in (self.INDEX_FILENAME, self.STORE_URL_FILENAME))

    def _create(
        self, store_or_url: Store | str | os.PathLike[str] | None, extra_args: dict[str, Any], *, only_new: bool
    ) -> bool:
        """Make the session files (over those there, unless ``only_new``); False if, ``only_new``, another
        process made them first."""
        made = not os.path.isdir(self.path)
        holder = enclosing_session(self.path) if self._owns_its_store else None
        if holder is not None:
            raise InvalidArgument(f"{self.path} is inside session {holder}, whose destroy() would delete it, and the "
                                  "tasks of this session with it: put it elsewhere")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise SaveError(self.path, f"cannot create session directory: {error.strerror}") from error
        try:
            return self._create_files(store_or_url, extra_args, only_new=only_new)
        except BaseException:
            if made:  # a store that cannot be opened (a server down, say) leaves no empty session behind,
                with contextlib.suppress(OSError):  # but what another process put there meanwhile stays
                    os.rmdir(self.path)
            raise

    def _create_files(
        self, store_or_url: Store | str | os.PathLike[str] | None, extra_args: dict[str, Any], *, only_new: bool
    ) -> bool:
        if store_or_url is None:
            url = self.DEFAULT_STORE_DIR
        elif isinstance(store_or_url, Store):
            url = store_or_url.url
        else:
            url = absolute_url(os.fspath(store_or_url))
        holder = _session_around(local_store_path(resolve_store_url(self.path, url)), self.path)
        if holder is not None and self._owns_its_store:  # checked before the store is made: nothing is created
            raise InvalidArgument(f"the store {mask_password(url)} is inside session {holder}, whose destroy() "
                                  "would delete it, and the tasks of this session with it: put it elsewhere")
        if store_or_url is None:
            self.store: Store = FilesystemStore(self._file(url), **extra_args)
        elif isinstance(store_or_url, Store):
            self.store = make_store(store_or_url, **extra_args)  # refuses options it would ignore
        else:
            self.store = make_store(url, **extra_args)
        self.store.hooks = self.hooks
        self.store_url = url
        with self._locked(check=False):
            if only_new and self._has_session_files():  # written, and maybe added to, while we got here
                if self.store is not store_or_url:
                    self.store.close()
                return False
            target = self._file(self.STORE_URL_FILENAME)
            try:
                write_atomically(target, f"{url}\n".encode(), mode=0o600)
                target = self._file(self.INDEX_FILENAME)
                write_atomically(target, b"")
                for name in self.TIMESTAMP_FILES.values():
                    target = self._file(name)
                    if os.path.lexists(target):
                        os.unlink(target)
            except OSError as error:
                raise SaveError(target, f"cannot create the session file: {error.strerror or error}") from error
        self.set_start_timestamp()
        return True

    def _open(self, extra_args: dict[str, Any], task_ids: Iterable[str] | None, lazy: bool) -> None:
        self.store_url = read_store_url(self.path)
        index = self._file(self.INDEX_FILENAME)
        if not os.path.lexists(index):
            with self._locked():
                try:
                    if not os.path.lexists(index):  # asked again under the lock: another process may be making it
                        write_atomically(index, b"")
                except OSError as error:
                    raise SaveError(index, f"cannot create the index: {error.strerror or error}") from error
        self._index = dict.fromkeys(read_index(index))
        where = self._file(self.STORE_URL_FILENAME)
        url = self.store_url
        try:
            scheme = url_scheme(expand_variables(url).strip())
        except InvalidArgument:  # an unset variable: said below, naming store.url
            scheme = "?"
        if scheme in (None, "file", *SQL_SCHEMES):
            check_option_names(extra_args)  # here, not below: a typo is no fault of store.url
        try:
            url = resolve_store_url(self.path, self.store_url)
            # a missing table is a typo, or a table dropped: the index names tasks that a new one would not hold
            if self._index and scheme in SQL_SCHEMES:
                extra_args = {**extra_args, "existing_table": True}
            self._check_store_is_there(local_store_path(url), where)
            self.store = make_store(url, **extra_args)
        except TableNotFound as error:
            raise table_not_found(where, url, error, len(self._index)) from None
        except (ValueError, OSError) as error:  # InvalidArgument is a ValueError
            kind = InvalidArgument if isinstance(error, InvalidArgument) else SessionError
            reason = f"names a store that cannot be used: {shorten(str(error))}"
            raise (kind(f"{where}: {reason}") if kind is InvalidArgument else SessionError(where, reason)) from error
        self.store.hooks = self.hooks
        ids = list(self._index) if task_ids is None else list(dict.fromkeys(task_ids))
        unknown = [str(oid) for oid in ids if oid not in self._index]  # another session's task would become ours
        if unknown:
            self.store.close()
            named = shorten(" ".join(unknown))
            raise InvalidArgument(f"task_ids names tasks that are not in session {self.path}: {named}")
        if lazy:
            self.tasks.expect(ids)
        else:
            self._load_into_session(ids)

    def _check_store_is_there(self, records: str | None, where: str) -> None:
        """SessionError if the local store at ``records`` is gone, or is an empty directory while the index names
        tasks (a disk not mounted there).  A new, empty store would number tasks from 1 again, under ids
        that the index, and the old store once back, give to other tasks."""
        if records is None:  # a server, or an in-memory database
            return
        hint = "(moved, deleted, or on a disk that is not mounted?): mount it or correct store.url"
        try:
            found = os.stat(records)
        except FileNotFoundError:
            raise StoreNotFound(where, f"names {shorten(records)}, which does not exist {hint}", records) from None
        except (OSError, ValueError):  # no permission, a NUL byte...: the store's own open says so
            return
        if self._index and stat.S_ISDIR(found.st_mode) and not _has_entries(records):
            raise StoreNotFound(where, f"names {shorten(records)}, an empty directory, while the index names "
                                       f"{len(self._index)} task(s) {hint}", records)

    def _load_into_session(self, ids: list[str]) -> dict[str, Any]:
        errors: dict[str, LoadError] = {}
        loaded = self.store.load_many(ids, errors=errors)
        self.tasks._put_many(loaded)
        for oid in errors:
            self.tasks._drop(oid)
        if errors:
            self.load_errors.update(errors)
            shown = "; ".join(str(e) for e in list(errors.values())[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            warnings.warn(
                f"session {self.path}: {len(errors)} task(s) could not be loaded and are kept in the index "
                f"(see Session.load_errors): {shown}{more}",
                LoadWarning,
                stacklevel=4,
            )
        return loaded

    def _load_lazily(self, ids: list[str]) -> dict[str, LoadError]:
        """Load the tasks of ``ids`` still to be loaded; return the errors of those that failed."""
        with self._mutex:  # asked for outside it: another thread may have removed or loaded some meanwhile
            wanted = [oid for oid in ids if oid in self.tasks and self.tasks.peek(oid) is None]
            self._load_into_session(wanted)
            return {oid: self.load_errors[oid] for oid in wanted if oid in self.load_errors}

    # -- the index ------------------------------------------------------------

    @contextmanager
    def _locked(self, *, check: bool = True) -> Iterator[None]:
        """Hold the session's file lock; failing to take it is a SaveError naming the lock file.

        With ``check`` (not while creating the session, or destroying it),
        the session must still be there, before and once the lock is held:
        taking the lock makes a missing directory again, and a session that
        another process destroyed would come back without its store URL,
        holding what this one wrote after.
        """
        if check:
            self._check_still_there()
        if self._lock_pid != os.getpid():  # a forked child needs a lock of its own
            self._file_lock = FileLock(self._file(self.LOCK_FILENAME))
            self._lock_pid = os.getpid()
        try:
            self._file_lock.acquire()
        except OSError as error:
            reason = f"cannot take the session lock: {error.strerror or error}"
            raise SaveError(self._file(self.LOCK_FILENAME), reason) from error
        try:
            if check:
                self._check_still_there()  # destroyed while the lock was being taken
            yield
        finally:
            self._file_lock.release()

    def _check_still_there(self) -> None:
        if not os.path.lexists(self._file(self.STORE_URL_FILENAME)):
            raise SessionError(self.path, "is gone (its store.url is missing): destroyed by another process? "
                               "Nothing more is written to it")

    def _append_to_index(self, ids: list[str]) -> None:
        path = self._file(self.INDEX_FILENAME)
        data = "".join(f"{oid}\n" for oid in ids).encode()
        try:
            with self._locked():
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                try:
                    _mend_last_line(fd)
                    size = os.fstat(fd).st_size
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                    except OSError:
                        os.ftruncate(fd, size)  # no torn line: the ids were not acknowledged
                        raise
                finally:
                    os.close(fd)
        except OSError as error:
            raise SaveError(path, f"cannot append to the index: {error.strerror or error}") from error

    def _rewrite_index(self, leaving: Container[str] = ()) -> list[str]:
        """Write the index without the tasks removed, merged with what other processes appended (and with the
        tasks added, but those ``leaving`` for later); return the ids they appended that this session does not
        know."""
        path = self._file(self.INDEX_FILENAME)
        try:
            with self._locked():
                removed = {oid.encode() for oid in self._removed}
                kept = [line for line in read_index_lines(path) if line.strip() not in removed]
                present = {line.strip() for line in kept}
                kept += [oid.encode() for oid in self._added if oid.encode() not in present and oid not in leaving]
                write_atomically(path, b"".join(line + b"\n" for line in kept))
        except OSError as error:
            raise SaveError(path, f"cannot rewrite the index: {error.strerror or error}") from error
        return self._unknown(present)

    def _appended(self) -> list[str]:
        """The ids that other processes appended to the index since this session read it (not those this one
        removed or forgot, which stay there until the next flush)."""
        index = self._file(self.INDEX_FILENAME)
        try:
            return [oid for oid in self._unknown(read_index_lines(index)) if oid not in self._removed]
        except OSError as error:
            raise SaveError(index, f"cannot read the index: {error.strerror or error}") from error

    def _unknown(self, lines: Iterable[bytes]) -> list[str]:
        """The ids among index ``lines`` that this session does not know: tasks other processes added."""
        index = self._index
        return [oid for line in lines if (oid := line.strip().decode(errors="replace")) not in index and is_id(oid)]

    # -- adding, saving, loading ------------------------------------------------

    def add(self, task: Any, flush: bool = True) -> str:
        """Add ``task`` to the session and return its id.

        With ``flush`` (the default) the task is saved and the index updated
        before returning; otherwise both wait for :meth:`flush`.  Adding the
        same object twice gives the same id and one entry; another object
        with the id of a task in the session is refused with SaveError.
        """
        with self._mutex:
            oid, new = self._add(task, flush)
            if new:
                self.hooks.call("task_added", session=self, task=task)
            return oid

    def _add(self, task: Any, flush: bool) -> tuple[str, bool]:
        """Add without telling plugins; return the id and whether the task is new to the session."""
        self._check_not_destroyed()
        self._pending = None  # the task may hold what a removal pending would delete
        oid = getattr(task, "persistent_id", None)
        if oid is not None and oid in self.tasks:
            try:
                held = self.tasks[oid]
            except LoadError:
                held = None
            if held is not task:
                raise SaveError(oid, f"session {self.path} already holds another task under this id")
            if flush:
                if task.changed and oid not in self._unsaved:
                    self._check_still_there()
                    self.store.save(task)
                self.flush()
            return oid, False
        self._skip_past_index()
        if flush:
            self._check_still_there()
            oid = self.store.save(task)
        else:
            oid = self.store.assign_id(task)
            self._unsaved[oid] = task
            self.hooks.watch((task,))
        self.tasks._put(oid, task)
        self.load_errors.pop(oid, None)
        self._register(oid, task)
        if flush:
            self.flush()
        return oid, True

    def _check_not_destroyed(self) -> None:
        """Before a write: refuse one to a session destroyed, or closed (nothing would write it after)."""
        if self._destroyed:
            raise SessionError(self.path, "was destroyed: nothing more is written to it "
                               "(open a new session to start again)")
        if self._finished:
            raise SessionError(self.path, "is closed: nothing more is written through this Session object "
                               "(open the session again to go on)")

    def _skip_past_index(self) -> None:
        """Before the first new id of this open: make the store's counter pass every id of the index.

        It has, unless it went back (a backup of the store restored, a
        database lost or emptied): new tasks would then take the ids of the
        tasks that the index keeps for repair.
        """
        if self._past_index:
            return
        highest = max((n for n in map(number_of, self._index) if n <= LAST_TAKEN), default=0)  # see LAST_TAKEN
        if highest:
            self.store.skip_past(highest)
        self._past_index = True

    def _register(self, oid: str, task: Any = None) -> None:
        self._pending = None  # the task may hold what a removal pending would delete
        self._forgotten.discard(oid)  # the session's again
        self._retry.pop(oid, None)
        if oid in self._removed:
            self._removed.discard(oid)
        elif oid not in self._index:
            self._added[oid] = None
        self._index[oid] = None
        if self._doomed:  # added back before the flush that would have deleted it (and its children)
            self._doomed.pop(oid, None)
            for child in self._walk([task] if task is not None else []):
                self._doomed.pop(getattr(child, "persistent_id", ""), None)

    def save(self, obj: Any) -> str:
        """Save ``obj`` to the store without adding it to the session; return its id."""
        with self._mutex:
            self._check_not_destroyed()
            self._check_still_there()
            self._skip_past_index()
            self._pending = None  # the record may now hold what a removal pending would delete
            return self.store.save(obj)

    def save_all(self, flush: bool = True) -> None:
        """Save every task (and child) whose ``changed`` flag is set, in one batch."""
        with self._mutex:
            self._check_not_destroyed()
            self._pending = None  # the records may now hold what a removal pending would delete
            walked = list(self._walk([*self.tasks.loaded(), *self._apart.values()]))
            # and persistables they hold in other attributes (t.prepare = Task()): saved as records of their own
            walked += self.store.referenced(walked)
            changed = [t for t in walked if getattr(t, "changed", True)]
            if changed or self._unsaved:  # not to a store whose records another process's destroy() deleted
                self._check_still_there()
            self._save_unsaved(changed)
            if flush:
                self.flush()

    def flush(self) -> None:
        """Write what ``add``, ``remove`` and ``forget`` left pending: new tasks, index, deletions."""
        with self._mutex:
            self._check_not_destroyed()
            if self._unsaved or self._added or self._removed or self._doomed:
                self._check_still_there()
            if self._unsaved:
                self._save_unsaved()
                self._pending = None  # their records may now refer to what a removal pending would delete
            # tasks a plugin added while they were saved (task_saved) are not saved yet: indexed by the next flush
            late = {oid: None for oid in self._added if oid in self._unsaved}
            others: list[str] | None = None
            if self._removed:
                others = self._rewrite_index(leaving=late)
            elif len(self._added) > len(late):
                self._append_to_index([oid for oid in self._added if oid not in late])
            self._added = late  # only now: if writing the index failed, the next flush writes all
            self._removed.clear()
            self._retry.clear()  # the removals asked are out of the index: no call to repeat (deletions follow)
            if self._doomed:
                doomed = self.pending_deletions()
                if others is None:  # a deletion tried again (see below): the index as it is now
                    others = self._appended()
                if others:  # tasks other processes added since this session read the index: what they hold stays
                    unreadable: list[str] = []
                    held = set(self._descendants(others, unreadable=unreadable, references=True))
                    doomed = [oid for oid in doomed if oid not in held and (not unreadable or self._doomed[oid])]
                for oid in doomed:  # going: save_all must not write them again
                    self._apart.pop(oid, None)
                try:
                    self.store.remove_many(doomed)
                except SaveError as error:  # what was asked of this flush is done: the tasks are out of the session
                    warnings.warn(f"session {self.path}: cannot delete the record {error.target} of a task removed "
                                  f"({error.reason}): the tasks removed are out of the session, and the records not "
                                  "deleted stay in the store; a later flush of this Session object tries again",
                                  OrphanWarning, stacklevel=2)
                    return  # what was forgotten still counts, for the next try, as holding what its records name
                self._doomed.clear()
                self._pending = None
            self._forgotten.clear()

    def _save_unsaved(self, more: Iterable[Any] = ()) -> None:
        """Save the tasks added without a flush (and ``more``) in one batch.  Only those are then taken off
        the list: a plugin told of the save (``task_saved``) may add others, for the next flush."""
        saving = dict(self._unsaved)
        self.store.save_many([*saving.values(), *more])
        for oid in saving:
            self._unsaved.pop(oid, None)

    def pending_deletions(self) -> list[str]:
        """The records the next :meth:`flush` deletes.

        They are the tasks removed, and their descendants, but for those
        that another task of the session still holds or refers to (a
        collection that shares a child, or holds a task removed from the top
        level; a task with the removed one in an attribute), and what those
        hold in turn.
        """
        with self._mutex:
            if not self._doomed:
                return []
            # worked out again when anything it depends on may have changed since (session-tool rm asks, then
            # flushes): what was removed, the session's tasks, what the tasks in memory hold, and the records
            # this session's store handle wrote or forgot since
            holding = [(task, *task.tasks) for task in self._walk(self.tasks.loaded())  # tasks compare by id
                       if isinstance(getattr(task, "tasks", None), (list, tuple))]
            key = (tuple(self._doomed.items()), len(self._index), len(self.tasks), holding, self.store.generation)
            if self._pending is None or self._pending[0] != key:
                # what the session's other tasks hold or refer to stays, and so does what that holds in turn
                unreadable: list[str] = []
                held = set(self._descendants(self._holders(), unreadable=unreadable, references=True))
                held.update(oid for oid in self._doomed if oid in self._index or oid in self.tasks)  # top-level
                if unreadable:  # what they hold is not known: only what the user named goes, if nothing known holds it
                    doomed = [oid for oid, by_name in self._doomed.items() if by_name and oid not in held]
                    kept = len(self._doomed) - len(doomed)
                    if kept:
                        warnings.warn(f"session {self.path}: {', '.join(unreadable[:3])} cannot be read, and may hold "
                                      f"children of the tasks removed: {kept} record(s) of those are kept",
                                      LoadWarning, stacklevel=3)
                else:
                    doomed = [oid for oid in self._doomed if oid not in held]
                self._pending = key, doomed
            return list(self._pending[1])

    def _holders(self) -> list[str]:
        """The session's tasks that may hold or refer to others: those not loaded, loaded ones with children,
        and loaded ones whose records refer to other objects (or that this store handle has not seen)."""
        peek, refers = self.tasks.peek, self.store.known_references
        return [oid for oid in dict.fromkeys(itertools.chain(self._index, self.tasks, self._forgotten))
                if (task := peek(oid)) is None or getattr(task, "tasks", None) or refers(task) != ()]

    def load(self, id: str, add: bool = True, flush: bool = True) -> Any:  # noqa: A002
        """Load task ``id`` from the store; with ``add`` it becomes part of the session."""
        check_id_type(id)
        return self.load_many([id], add=add, flush=flush)[id]

    def load_many(self, ids: Iterable[str], add: bool = True, flush: bool = True) -> dict[str, Any]:
        """Load several tasks in one batch; return ``{id: task}``.  Raises LoadError on a failure."""
        with self._mutex:
            if add:
                self._check_not_destroyed()
            loaded = self.store.load_many(ids)
            if not add:
                for oid, task in loaded.items():  # a task of the session not loaded yet (lazy) is now: save_all sees it
                    if oid not in self.tasks:
                        self._apart[oid] = task
                    elif self.tasks.peek(oid) is None:
                        self.tasks._put(oid, task)
                return loaded
            new = [task for oid, task in loaded.items() if oid not in self._index]
            for oid, task in loaded.items():
                self.tasks._put(oid, task)
                self.load_errors.pop(oid, None)
                self._register(oid, task)
            if flush:
                self.flush()
            for task in new:
                self.hooks.call("task_added", session=self, task=task)
            return loaded

    def withdraw(self, ids: Iterable[str | None]) -> None:
        """Take back adds not flushed yet: the tasks leave the session and are never written.

        A task added back after a removal stays in the session but is not
        written again; other ids are ignored.  Use it when a
        :meth:`flush` fails because of one task added with ``flush=False``.
        """
        check_not_one_id(ids)
        with self._mutex:
            for oid in ids:
                if oid is None:
                    continue
                self._unsaved.pop(oid, None)
                if oid in self._added:
                    del self._added[oid]
                    self._index.pop(oid, None)
                    self.tasks._drop(oid)

    # -- removing -------------------------------------------------------------

    def forget(self, id: str, flush: bool = True) -> None:  # noqa: A002
        """Drop task ``id`` from the session; it stays in the store."""
        check_id_type(id)
        with self._mutex:
            self._check_not_destroyed()
            if self._retry.get(id) != "forget":  # else this call's flush failed before: it is flushed again
                task = self._unsaved.get(id)
                if task is not None:  # saved first: if that fails (a full disk), the task is still the session's
                    self._check_still_there()
                    self.store.save(task)
                    del self._unsaved[id]
                self._drop(id)
                self._forgotten.add(id)  # its record stays, holding its children: a removal pending must keep them
            if flush:
                self._flush_removal(id, "forget")
            self.hooks.call("task_removed", session=self, task_id=id)

    def remove(self, id: str, flush: bool = True) -> None:  # noqa: A002
        """Remove task ``id`` and its children from the session and from the store.

        A record that another task of the session still holds or refers to
        (a collection that shares a child, the session itself when the child
        is also a top-level task, a task with it in an attribute) is kept;
        telling reads the metadata of the session's tasks that are not
        loaded.  Without ``flush`` the records
        are deleted at the next :meth:`flush`, after the index no longer
        names them.
        """
        check_id_type(id)
        with self._mutex:
            self._check_not_destroyed()
            if self._retry.get(id) != "remove":  # else this call's flush failed before: it is flushed again
                doomed = self._descendants([id])
                self._drop(id)
                self._forgotten.discard(id)
                for oid in doomed:
                    self._unsaved.pop(oid, None)
                    self._doomed[oid] = oid == id or self._doomed.get(oid, False)
            if flush:
                self._flush_removal(id, "remove")
            self.hooks.call("task_removed", session=self, task_id=id)

    def _flush_removal(self, oid: str, how: str) -> None:
        """Flush after ``remove`` or ``forget`` (``how``) of ``oid``.  If that fails (a full disk), the task is
        out of the session object but not yet out of the index: the same call again flushes again."""
        try:
            self.flush()
        except BaseException:
            self._retry[oid] = how
            raise

    def _drop(self, oid: str) -> None:
        parse_id(oid)
        if oid not in self._index and oid not in self.tasks:
            raise InvalidArgument(f"task {oid} is not in session {self.path}")
        self.tasks._drop(oid)
        self.load_errors.pop(oid, None)
        self._index.pop(oid, None)
        if oid in self._added:
            del self._added[oid]
        else:
            self._removed.add(oid)

    def _descendants(
        self, ids: Iterable[str], unreadable: list[str] | None = None, references: bool = False
    ) -> list[str]:
        """``ids`` and the ids of all their children, a generation at a time, from memory or else metadata.

        The ids whose children could not be read are put in ``unreadable``.
        With ``references``, also every object their records refer to in
        other attributes, since deleting one would leave a record that
        cannot load: for an object in memory, as this store handle last
        saved or loaded its record, and the record itself where the handle
        has not seen it.
        """
        store, tasks = self.store, self.tasks

        def in_memory(oid: str) -> Any:
            task = tasks.peek(oid)
            return task if task is not None else store.in_memory(oid)

        found: dict[str, None] = {}
        generation: dict[str, Any] = {oid: in_memory(oid) for oid in ids}
        while generation:
            found.update(dict.fromkeys(generation))
            children: dict[str, Any] = {}
            unloaded = []
            for oid, task in generation.items():
                if task is None:
                    unloaded.append(oid)
                    continue
                held = getattr(task, "tasks", None)
                if isinstance(held, (list, tuple)):
                    children.update((c.persistent_id, c) for c in held if getattr(c, "persistent_id", None))
                if references:
                    refs = store.known_references(task)
                    if refs is None:  # its record, as it is now, says
                        unloaded.append(oid)
                    else:
                        for ref in refs:
                            children.setdefault(ref, in_memory(ref))
            for oid, held in store.iter_children(unloaded, references) if unloaded else ():  # in batches
                if isinstance(held, LoadError):
                    if unreadable is not None:
                        unreadable.append(oid)
                    continue
                for child in held:
                    children.setdefault(child, in_memory(child))  # an object in memory wins
            generation = {oid: task for oid, task in children.items() if oid not in found}
        return list(found)

    def destroy(self) -> None:
        """Remove every task of the session from the store, then the session directory.

        The session is then destroyed: adding, saving, removing or flushing
        raises SessionError (it would make the directory again, without its
        store URL); ``close()`` does nothing more.  A destroy that failed
        can be tried again: it goes on from where it stopped.
        """
        with self._mutex:
            # under the session's lock (unless gone already: a destroy tried again), so that no other process
            # appends to the index meanwhile; one that tries after finds the session gone (see _locked)
            with self._locked(check=False) if os.path.isdir(self.path) else contextlib.nullcontext():
                records = self.store.directory if isinstance(self.store, FilesystemStore) else None
                store_inside = records is not None and is_inside(records, self.path)
                if not store_inside:  # with the tasks other processes added since this one read the index
                    ids = [*self._index, *self._appended(), *self.tasks, *self._doomed]
                    self.store.remove_many(self._descendants(ids))
                # from here on the session is going: nothing may write it again (an add waiting for the mutex, a
                # close that would save); until here, a failure (a database down) left it whole, and writable
                self._destroyed = True
                self.store.close()
                inside = os.path.realpath(records) if records is not None and store_inside else None
                if inside is not None and inside != os.path.realpath(self.path):
                    remove_tree(inside)  # the records first: if that fails, the index names all
                remove_tree(self.path)  # a session reached through a symbolic link: its target goes
            self.tasks._drop_all()
            self._apart.clear()
            for pending in (self._index, self._added, self._removed, self._unsaved, self._doomed, self._forgotten,
                            self._retry):
                pending.clear()
            self._pending = None

    # -- reading --------------------------------------------------------------

    def list_ids(self) -> list[str]:
        """Ids of the session's top-level tasks."""
        return list(self.tasks)

    def list_names(self) -> list[str | None]:
        """Job names of the session's top-level tasks."""
        return [getattr(task, "jobname", None) for task in list(self.tasks.values())]  # a copy: threads add

    def iter_workflow(self) -> Iterator[Any]:
        """Every task, breadth first through collections' ``tasks``."""
        return self._walk(self.tasks.values())

    @staticmethod
    def _walk(tasks: Iterable[Any]) -> Iterator[Any]:
        seen: set[int] = set()
        queue = deque(tasks)
        while queue:
            task = queue.popleft()
            if id(task) in seen:
                continue
            seen.add(id(task))
            yield task
            children = getattr(task, "tasks", None)
            if isinstance(children, (list, tuple)):
                queue.extend(children)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.tasks.values()))

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, id: object) -> bool:  # noqa: A002
        return id in self.tasks

    # -- timestamps -----------------------------------------------------------

    def _timestamp(self, key: str) -> float:
        try:
            return os.stat(self._file(self.TIMESTAMP_FILES[key])).st_mtime
        except OSError:
            return -1

    @property
    def created(self) -> float:
        """When the session started (mtime of ``created``), or -1."""
        return self._timestamp("start")

    @property
    def finished(self) -> float:
        """When the session finished (mtime of ``finished``), or -1."""
        return self._timestamp("end")

    def _set_timestamp(self, key: str, time: float | None) -> None:
        self._check_not_destroyed()
        path = self._file(self.TIMESTAMP_FILES[key])
        when = _time.time() if time is None else float(time)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            os.utime(path, (when, when), follow_symlinks=False)
        except OSError as error:
            raise SaveError(path, f"cannot set timestamp: {error.strerror}") from error

    def set_start_timestamp(self, time: float | None = None) -> None:
        """Mark the session as started at ``time`` (now by default)."""
        self._set_timestamp("start", time)

    def set_end_timestamp(self, time: float | None = None) -> None:
        """Mark the session as finished at ``time`` (now by default)."""
        self._set_timestamp("end", time)

    # -- life cycle -----------------------------------------------------------

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The run records in ``session.json``: one per open in a writing process, oldest first."""
        return read_runs(self.path)["runs"]

    def close(self, *, save: bool = True) -> None:
        """Save changed tasks, flush, record the end of this run, and release the store.

        With ``save=False``, nothing is saved or flushed: what was not saved
        yet (changed tasks, tasks added or removed with ``flush=False``) stays
        unsaved, and only the end of the run is recorded.
        """
        self._finish(None, save=save)

    def _finish(self, error: BaseException | None, *, save: bool = True) -> None:
        if self._finished:  # closed already: the end of a with block after close(save=False) saves nothing
            return
        failure = error
        try:
            if save and not self._destroyed:
                self.save_all()
        except BaseException as saving:  # the run record says the run did not end well
            failure = failure or saving
            raise
        finally:
            with ExitStack() as closing:  # each step runs even if an earlier one raised; the last one first
                closing.callback(self.store.close)
                closing.callback(self._closed, failure)
                closing.callback(self._record_end, failure)
        self._finished = True  # not when a step failed: closing again tries again
        self._apart.clear()

    def _record_end(self, error: BaseException | None) -> None:
        if os.path.lexists(self._file(self.STORE_URL_FILENAME)):  # not after destroy(), here or by another process
            self._run["end"] = _time.time()
            self._run["error"] = None if error is None else error_record(error)  # a close tried again: its own
            self._record_run()

    def _record_run(self) -> str | None:
        """Write this run's record to ``session.json``; return the session id (None if it cannot be read).

        Failing to (a full disk, a session this user may only read) is a
        RunRecordWarning: run records are history, not tasks, and must not
        stop anyone reading a session, or freeing its space.
        """
        try:
            with self._locked():
                return update_runs(self.path, self._run)
        except (SaveError, SessionError) as error:
            if not os.path.lexists(self._file(self.STORE_URL_FILENAME)):  # gone: that is no run record's problem
                raise
            warnings.warn(f"{error}; this run is not recorded", RunRecordWarning, stacklevel=3)
        try:
            return read_runs(self.path).get("session_id")
        except SessionError:
            return None

    def _closed(self, error: BaseException | None) -> None:
        try:
            self.hooks.call("session_closed", session=self, error=error)
        finally:
            self.hooks.active = False  # a closed session reports nothing more

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        """Close: save, flush, record the end (and the exception, which goes on)."""
        self._finish(error)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}: {len(self.tasks)} tasks in {mask_password(self.store_url)}>"


class TemporarySession(Session):
    """A session over an existing store, in a temporary directory removed at exit.

    Without ``task_ids`` it holds every object that the store lists.
    """

    _opening_later = True
    _owns_its_store = False

    def __init__(
        self,
        store_or_url: Store | str | os.PathLike[str],
        task_ids: Iterable[str] | None = None,
        delete: bool = True,
        *,
        plugins: Iterable[object] = (),
        autoload_plugins: bool | None = None,
        **extra_args: Any,
    ) -> None:
        check_task_ids(task_ids)
        if not isinstance(store_or_url, Store):
            store_or_url = absolute_url(os.fspath(store_or_url))
        store = make_store(store_or_url, **extra_args)
        path = tempfile.mkdtemp(prefix="gc3session-")
        super().__init__(path, store_or_url=store, plugins=plugins, autoload_plugins=autoload_plugins)
        self.delete = delete
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, True) if delete else None
        ids = store.list() if task_ids is None else list(task_ids)
        self._load_into_session(ids)
        for oid in list(self.tasks) + list(self.load_errors):
            self._register(oid)
        self.flush()
        self.hooks.call("session_opened", session=self)

    def _finish(self, error: BaseException | None, *, save: bool = True) -> None:
        """Close as a session does, then remove the temporary directory (when ``delete``)."""
        try:
            super()._finish(error, save=save)
        finally:
            if self._finalizer is not None:
                self._finalizer()

    def destroy(self) -> None:
        super().destroy()
        if self._finalizer is not None:
            self._finalizer.detach()


class TaskMap(Mapping[str, Any]):
    """A session's top-level tasks by id, in index order: read-only (add, remove and forget go through the
    session, which keeps its index and store in step).

    In a lazy session, ids are known before their tasks are loaded: a task is
    loaded when first looked up, and ``values()``/``items()`` load what is
    missing in batches.  ``peek`` and ``loaded`` never load anything.  A task
    that fails to load leaves the map (as it is left out of an eager
    session's), with its reason in ``Session.load_errors``.
    """

    def __init__(self, load: Callable[[list[str]], Any]) -> None:
        self._tasks: dict[str, Any] = {}
        self._load = load

    def expect(self, ids: Iterable[str]) -> None:
        """Know these ids; load their tasks only when they are touched."""
        for oid in ids:
            self._tasks.setdefault(oid, _UNLOADED)

    def peek(self, oid: str) -> Any:
        """The task if it is loaded, else None."""
        task = self._tasks.get(oid)
        return None if task is _UNLOADED else task

    def loaded(self) -> list[Any]:
        """The tasks loaded so far."""
        return [task for task in list(self._tasks.values()) if task is not _UNLOADED]  # a copy: threads add

    def get_many(self, ids: Iterable[str]) -> list[Any]:
        """The tasks of ``ids`` that are in the map, loading the missing ones in one batch.

        Ids not in the map, and tasks that fail to load, are left out.
        """
        check_not_one_id(ids)
        ids = [oid for oid in ids if oid in self._tasks]
        missing = [oid for oid in ids if self._tasks[oid] is _UNLOADED]
        if missing:
            self._load(missing)
        found = (self._tasks.get(oid, _UNLOADED) for oid in ids)
        return [task for task in found if task is not _UNLOADED]

    def _load_missing(self) -> None:
        missing = [oid for oid, task in list(self._tasks.items()) if task is _UNLOADED]  # a copy: threads add
        if missing:
            self._load(missing)

    def __getitem__(self, oid: str) -> Any:
        task = self._tasks[oid]
        if task is _UNLOADED:
            errors = self._load([oid]) or {}
            if oid in errors:  # the reason, not just that it failed
                raise errors[oid]
            if oid not in self._tasks:  # removed by another thread while this one waited to load it
                raise KeyError(oid)
            task = self._tasks[oid]
            if task is _UNLOADED:
                raise LoadError(oid, "it could not be loaded (see Session.load_errors)")
        return task

    def get(self, oid: str, default: Any = None) -> Any:
        """The task of ``oid``, or ``default`` if it is not in the map or fails to load (as in an eager session,
        which leaves such a task out)."""
        try:
            return self[oid]
        except LookupError:  # LoadError included
            return default

    def __setitem__(self, oid: str, task: Any) -> None:
        raise TypeError("session.tasks is read-only: add a task with session.add(task)")

    def __delitem__(self, oid: str) -> None:
        raise TypeError("session.tasks is read-only: take a task out with session.remove(id) or session.forget(id)")

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, oid: object) -> bool:
        return oid in self._tasks

    # the session's own changes

    def _put(self, oid: str, task: Any) -> None:
        self._tasks[oid] = task

    def _put_many(self, tasks: Mapping[str, Any]) -> None:
        self._tasks.update(tasks)

    def _drop(self, oid: str) -> Any:
        """Take ``oid`` out; return its task if it was loaded (never loads it)."""
        task = self._tasks.pop(oid, None)
        return None if task is _UNLOADED else task

    def _drop_all(self) -> None:
        self._tasks.clear()

    def values(self) -> ValuesView[Any]:
        self._load_missing()
        return self._tasks.values()

    def items(self) -> ItemsView[str, Any]:
        self._load_missing()
        return self._tasks.items()

    def __repr__(self) -> str:
        loaded = sum(1 for task in self._tasks.values() if task is not _UNLOADED)
        return f"<TaskMap of {len(self._tasks)} tasks, {loaded} loaded>"


_UNLOADED = object()


def _session_around(records: str | None, own: str) -> str | None:
    """The session directory, other than ``own``, that holds the store at ``records`` (a directory or file)."""
    if records is None or is_inside(records, own):
        return None
    return enclosing_session(records, itself=True)  # a store that is a session directory goes with it too


def enclosing_session(path: str, itself: bool = False) -> str | None:
    """The session directory that ``path`` (which need not exist) is below, or, with ``itself``, is; symbolic
    links followed; or None."""
    here = os.path.realpath(path) if itself else os.path.dirname(os.path.realpath(path))
    while True:
        if is_session(here):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def table_not_found(where: str, url: str, error: TableNotFound, tasks: int) -> StoreNotFound:
    """The error for a session's SQL store whose table is missing, ``where`` its ``store.url``."""
    return StoreNotFound(where, f"names {mask_password(url)}: {error.reason}, while the index names {tasks} task(s) "
                         "(a typo in store.url, or a table dropped?): correct store.url, or, if the records are lost, "
                         "make an empty table with gc3session.persistence.make_store(URL)", mask_password(url))


def is_session(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory with a session's ``store.url``."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, Session.STORE_URL_FILENAME))


def read_store_url(session_path: str | os.PathLike[str]) -> str:
    """The store URL written in a session directory (``${NAME}`` variables not expanded)."""
    path = os.path.join(session_path, Session.STORE_URL_FILENAME)
    if not os.path.lexists(path):
        raise SessionError(path, "missing: the session does not say where its tasks are stored")
    if os.path.isdir(path):
        raise SessionError(path, "is a directory, expected a file holding the store URL")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SessionError(path, f"cannot read the store URL: {error}") from error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SessionError(path, "is empty: the session does not say where its tasks are stored")
    return lines[0]


def _has_entries(directory: str) -> bool:
    """True if ``directory`` holds anything (or cannot be listed: then it is not for this check to say)."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError:
        return True


def resolve_store_url(session_path: str | os.PathLike[str], url: str) -> str:
    """``url`` with a relative path taken as relative to the session directory."""
    expanded = expand_variables(url).strip()  # ${DB_URL} may hold a whole URL
    if url_scheme(expanded) is None and not os.path.isabs(expanded):
        return os.path.join(os.path.abspath(session_path), url)
    return url


def read_index(path: str, strict: bool = True) -> list[str]:
    """The ids in an index file, in order, without blanks or repeats.

    A last line without its newline is a write cut short and is skipped
    unless it is a valid id.  Any other line that is not a valid id raises
    SessionError when ``strict``, and is kept as it is otherwise (so a
    rewrite never drops what a person may want to fix by hand).
    """
    unique: dict[str, None] = {}
    with _index_file(path) as f:
        for ids in _index_ids(f, path, strict):
            unique.update(dict.fromkeys(ids))
    return list(unique)


def check_task_ids(task_ids: Any) -> None:
    """Refuse a ``task_ids`` argument that is not a collection of ids (a string is not: it iterates letters)."""
    if isinstance(task_ids, (str, bytes)) or not (task_ids is None or isinstance(task_ids, Iterable)):
        what = "the string " if isinstance(task_ids, str) else ""
        raise InvalidArgument(f"task_ids must be a list of ids, not {what}{shorten(repr(task_ids), 80)}")


def iter_index(path: str) -> Iterator[str]:
    """The ids of :func:`read_index`, streamed: for listing sessions of any size.

    Memory grows by a bit per id number (for each class of task), not by
    the ids: a million ids take about 125 KiB.  A line that is not an id
    raises SessionError when the stream reaches it.
    """
    seen = IdSet()
    with _index_file(path) as f:
        for ids in _index_ids(f, path, strict=True):
            yield from seen.new(ids)


#: How much of an index file is read at a time.
INDEX_BLOCK = 1 << 14


@contextmanager
def _index_file(path: str) -> Iterator[BinaryIO]:
    """An index file open for reading (empty if it does not exist); SessionError if it cannot be read."""
    if os.path.isdir(path):
        raise SessionError(path, "is a directory, expected the session index file")
    try:
        f: BinaryIO = open(path, "rb")  # closed below, once the caller is done with it
    except FileNotFoundError:
        f = io.BytesIO()
    except OSError as error:
        raise SessionError(path, f"cannot read the index: {error.strerror}") from error
    with f:
        yield f


def _index_ids(f: BinaryIO, path: str, strict: bool) -> Iterator[list[str]]:
    """The ids in index file ``path``, open as ``f``, a list at a time, repeats included (see :func:`read_index`).

    The file is read a block at a time.  A block of plain ids (no blanks,
    spaces or other line ends) is checked by one regular expression and
    split; any other block goes line by line.
    """
    lines_before = 0
    cut: list[bytes] = []  # the start of a line that the blocks before cut, in pieces (a long line costs no copies)
    try:
        while data := f.read(INDEX_BLOCK):
            end = data.rfind(b"\n") + 1
            if not end:
                cut.append(data)
                continue
            block = b"".join([*cut, data[:end]]) if cut else data[:end]
            cut = [data[end:]] if end < len(data) else []
            if PLAIN_ID_LINES.fullmatch(block):
                ids = block.decode("ascii").split("\n")
                ids.pop()  # what follows the last newline: nothing
                yield ids
            else:
                for oid in _line_ids(io.BytesIO(block), path, strict, lines_before):
                    yield [oid]
            lines_before += block.count(b"\n")
        for oid in _line_ids([b"".join(cut)] if cut else [], path, strict, lines_before):
            yield [oid]
    except OSError as error:
        raise SessionError(path, f"cannot read the index: {error.strerror}") from error


def _line_ids(lines: Iterable[bytes], path: str, strict: bool, lines_before: int) -> Iterator[str]:
    """The ids on ``lines``, which follow ``lines_before`` lines of index file ``path``, one at a time."""
    for number, raw in enumerate(lines, lines_before + 1):
        line = raw.strip()
        if not line:
            continue
        text = line.decode("utf-8", "replace")
        if not raw.endswith(b"\n"):  # only the last line can lack it: a write cut short, maybe where an id ends
            if is_id(text):  # "Task.12" cut to "Task.1" names another task, which destroy() would delete
                warnings.warn(f"{path}: its last line, {text!r}, has no newline: ignored, as a write cut short "
                              "(if you wrote it by hand, end it with a newline)", RepairWarning, stacklevel=2)
            else:
                log.debug("%s: ignoring incomplete last line %r", path, text[:60])
        elif is_id(text):
            yield text
        elif strict:
            raise SessionError(path, f"line {number}: {shorten(text, 60)!r} is not a task id")
        else:
            yield text


class IdSet:
    """A set of valid ids, kept as a bit per number for each prefix: ids are numbers from a counter, so dense.

    Each prefix's bitmap starts at the first number added under it, so it
    takes a bit per number between that one and the highest; numbers
    below it or too far above it go to a plain set.
    """

    #: The widest span of numbers a bitmap covers (16 MiB of bits).
    SPAN = 1 << 27

    def __init__(self) -> None:
        self._bits: dict[str, tuple[int, bytearray]] = {}  # prefix -> (its first number, its bits from there)
        self._others: set[str] = set()

    def add(self, oid: str) -> bool:
        """Add ``oid``, a valid id; True if it was not in the set yet."""
        return bool(self.new([oid]))

    def new(self, ids: Iterable[str]) -> list[str]:
        """Add ``ids``, valid ids; those that were not in the set yet, in order, once each."""
        ids = ids if type(ids) is list else list(ids)
        if len(ids) > 1 and self._new_run(ids):
            return ids
        fresh = []
        bitmaps = self._bits
        span = self.SPAN
        for oid in ids:
            prefix, _, digits = oid.rpartition(".")
            number = int(digits)
            bitmap = bitmaps.get(prefix)
            if bitmap is None:
                bitmap = bitmaps[prefix] = (number, bytearray())
            base, bits = bitmap
            offset = number - base
            if not 0 <= offset < span:
                if oid not in self._others:
                    self._others.add(oid)
                    fresh.append(oid)
                continue
            byte = offset >> 3
            if byte >= len(bits):
                self._grow(bits, byte)
            mask = 1 << (offset & 7)
            if not bits[byte] & mask:
                bits[byte] |= mask
                fresh.append(oid)
        return fresh

    def _new_run(self, ids: list[str]) -> bool:
        """Add ``ids`` in one step if they are one prefix's consecutive numbers, none of them in the set yet
        (the common case: a block of an index that one session wrote); False, adding nothing, if not."""
        prefix, _, digits = ids[0].rpartition(".")
        low = int(digits)
        if ids != [f"{prefix}.{number}" for number in range(low, low + len(ids))]:
            return False
        base, bits = self._bits.get(prefix) or (low, bytearray())
        start, stop = low - base, low - base + len(ids)  # offsets of the run in the bitmap
        if start < 0 or stop > self.SPAN:
            return False
        first, last = start >> 3, (stop - 1) >> 3  # the bytes that hold the run's bits
        if last >= len(bits):
            self._grow(bits, last)
        held = int.from_bytes(bits[first : last + 1], "little")
        run = ((1 << len(ids)) - 1) << (start - 8 * first)
        if held & run:  # some are in the set already: the general path keeps the first of each
            return False
        bits[first : last + 1] = (held | run).to_bytes(last - first + 1, "little")
        self._bits[prefix] = base, bits
        return True

    def _grow(self, bits: bytearray, byte: int) -> None:
        """Make ``bits`` hold ``byte``: at least doubled, up to the span."""
        bits.extend(bytes(min(max(byte + 1, 2 * len(bits)), self.SPAN >> 3) - len(bits)))


def shorten(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, for messages that quote what a file holds."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_index_lines(path: str) -> list[bytes]:
    """The complete, non-blank lines of an index file as they are (for rewriting it without loss)."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        return []
    lines = content.split(b"\n")
    lines.pop()  # what follows the last newline: nothing, or a line cut short, which is no id of this session
    seen: set[bytes] = set()
    kept = []
    for line in lines:
        key = line.strip()
        if key and key not in seen:
            seen.add(key)
            kept.append(line)
    return kept


def _mend_last_line(fd: int) -> None:
    """Before appending: cut off a torn last line (one without its newline), which reading ignores too."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    line_start = size
    while line_start > 0:  # back to the newline before the torn line, however long it is
        start = max(0, line_start - 4096)
        cut = os.pread(fd, line_start - start, start).rfind(b"\n")
        if cut >= 0:
            line_start = start + cut + 1
            break
        line_start = start
    os.ftruncate(fd, line_start)


def absolute_url(url: str) -> str:
    """``url`` with a relative path made absolute (plain paths and ``sqlite:///relative``).

    ``${NAME}`` variables are kept; a path is relative, and a URL a URL, when it is once they are
    expanded (``${DB_URL}`` holding a whole URL is no path).
    """
    url = url.strip()
    expanded = expand_variables(url).strip()
    check_not_mistyped(expanded)
    scheme = url_scheme(expanded)
    if scheme is None:
        return url if "${" in url and os.path.isabs(expanded) else os.path.abspath(url)
    if scheme == "sqlite":
        head, sep, rest = url.partition(":///")
        absolute = expand_variables(rest).startswith("/")
        if sep and rest and not absolute and not rest.startswith(":memory:") and "://" not in head:
            return f"{head}:///{os.path.abspath(rest)}"
    return url


def check_id_type(oid: Any) -> None:
    """Raise InvalidArgument unless ``oid`` is a string (a list of ids given for one, say)."""
    if not isinstance(oid, str):
        raise InvalidArgument(f"a task id is a string, like 'Task.1', not {oid!r}")


def remove_tree(path: str) -> None:
    """Remove the directory ``path`` and all in it (through a symbolic link: its target, then the link); nothing
    if it is gone already (a destroy tried again).  SaveError names what could not be removed."""
    real = os.path.realpath(path)
    try:
        if os.path.lexists(real):
            shutil.rmtree(real)
        if real != path and os.path.islink(path):
            os.unlink(path)
    except OSError as error:
        raise SaveError(str(error.filename or real), f"cannot remove: {error.strerror or error}") from error


def is_inside(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``directory`` or below it."""
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
    except ValueError:
        return False
    return True


__all__ = [
    "IdSet", "Session", "TemporarySession", "is_session", "iter_index", "read_index", "read_store_url",
    "resolve_store_url",
]
