"""The abstract :class:`Store` and the URL factory :func:`make_store`.

Everything stores have in common is written here once: id assignment,
pickling through the serializer (children become references), the metadata
record, the identity cache, integrity checks on load, fork safety.  A backend
implements seven storage primitives: ``_reserve``, ``_bump``, ``_write``, ``_read``,
``_delete``, ``_list`` and ``_read_metadata``.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import gc
import itertools
import logging
import os
import re
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..exceptions import Error, InvalidArgument, LoadError, NoSuchObject, SaveError, StoreError
from .idfactory import ID_LINES, IdFactory, id_list, is_id, parse_id
from .serialization import (
    DEFAULT_PROTOCOL,
    FORMAT_VERSION,
    Serializer,
    check_allowed_classes,
    check_class_map,
    check_protocol,
    encode_json,
)

if TYPE_CHECKING:
    from ..plugins import Hooks
    from ..task import Persistable

log = logging.getLogger(__name__)

#: Largest block of ids a store reserves at once from its counter.
MAX_ID_BLOCK = 1024
#: How many records ``load_many`` reads at a time (bounds the raw bytes held in memory).
LOAD_BATCH = 1000
#: The largest number an id holds (18 digits: see ``ID_PATTERN``).
LAST_NUMBER = 10**18 - 1
#: The largest number a store takes from elsewhere (a foreign save, an import), or counts from when its counter
#: is lost: the counter moves past it, and a billion numbers stay free after it for new ids.
LAST_TAKEN = LAST_NUMBER - 10**9


@dataclass(slots=True)  # a batch holds thousands: no __dict__ each
class Record:
    """One object as a backend writes it."""

    id: str
    number: int
    meta: dict[str, Any]
    data: bytes
    obj: Any
    refs: tuple[str, ...] = ()


def held_ids(meta: dict[str, Any]) -> list[str]:
    """The ids a record's metadata names as its children or its references, each once, children first."""
    return list(dict.fromkeys([*id_list(meta.get("children")), *id_list(meta.get("references"))]))


def children_first(records: list[Record]) -> list[Record]:
    """``records`` ordered so that each comes after every record of the batch it refers to: written one by one,
    a batch cut short (a crash, a full disk) never leaves a record that names one not written yet."""
    if not any(record.refs for record in records):
        return records
    by_id = {record.id: record for record in records}
    ordered: list[Record] = []
    placed: set[str] = set()
    for record in records:  # depth first, each record placed once what it refers to is
        if record.id in placed:
            continue
        path = {record.id}  # a cycle (refused before writing) cannot loop
        stack = [(record, iter(record.refs))]
        while stack:
            node, refs = stack[-1]
            for ref in refs:
                child = by_id.get(ref)
                if child is not None and ref not in placed and ref not in path:
                    path.add(ref)
                    stack.append((child, iter(child.refs)))
                    break
            else:
                stack.pop()
                path.discard(node.id)
                placed.add(node.id)
                ordered.append(node)
    return ordered


class Store(abc.ABC):
    """Saves, loads and removes objects by id.  Subclasses provide the storage."""

    def __init__(
        self,
        url: str,
        *,
        idfactory: IdFactory | None = None,
        protocol: int = DEFAULT_PROTOCOL,
        class_map: Mapping[str, str] | None = None,
        allowed_classes: Iterable[str | type] | None = None,
        serializer: Serializer | None = None,
    ) -> None:
        self.url = url
        check_options({"idfactory": idfactory, "serializer": serializer}, names=False)
        self.idfactory = idfactory or IdFactory()
        if serializer is None:
            serializer = Serializer(protocol=protocol, class_map=class_map, allowed_classes=allowed_classes)
        elif class_map is not None or allowed_classes is not None:  # they would be ignored: an allow-list, silently
            raise InvalidArgument("give class_map and allowed_classes to the Serializer, not beside it")
        self.serializer = serializer
        self._cache: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        # every object in memory that got its id from this store, through any handle: saving it needs no check
        # (a backend whose records are not named by the URL alone keys this by what names them)
        self._known = known_objects(url)
        # what each record seen by this handle refers to (only those that refer to something)
        self._refs: dict[str, tuple[str, ...]] = {}
        self._generation = 0
        self._lock = threading.RLock()
        self._numbers: list[int] = []
        # the numbers this handle reserved for imports: later batches of one copy may use them
        self._imported: list[range] = []
        self._block = 1
        self._pid = os.getpid()
        #: The plugins told of saves (``task_saved``), set by the session that uses this store.
        self.hooks: Hooks | None = None

    # -- saving ---------------------------------------------------------------

    def save(self, obj: Any) -> str:
        """Save ``obj`` (and any new or changed persistable inside it); return its id."""
        return self.save_many([obj])[0]

    def save_many(self, objs: Iterable[Any]) -> list[str]:
        """Save every object in one batch; return their ids in order."""
        objs = list(objs)
        with self._lock, gc_paused():  # a batch makes containers, not cyclic garbage (see gc_paused)
            self._check_pid()
            cleared: list[Any] = []  # each object's changed flag is cleared before it is pickled (see _encode)
            try:
                records = self._encode(list({id(obj): obj for obj in objs}.values()), cleared)
                if records:
                    self._check_foreign(records)
                    self._generation += 1  # before: a batch that fails half way wrote something
                    self._write(records)
            except BaseException:
                for obj in cleared:  # nothing was written: every change is still to save
                    obj.changed = True
                raise
            cache, known, refs = self._cache, self._known, self._refs
            for record in records:  # per-object bookkeeping: kept lean, it runs for every object written
                obj, oid = record.obj, record.id
                if cache.get(oid) is not obj:  # a look-up costs a fifth of a weak insert
                    cache[oid] = obj
                if known.get(oid) is not obj:
                    known[oid] = obj
                if record.refs:
                    refs[oid] = record.refs
                elif oid in refs:
                    del refs[oid]
        if self.hooks is not None and records:
            self.hooks.saved(self, [record.obj for record in records])
        return [obj.persistent_id for obj in objs]

    def replace(self, id: str, obj: Any) -> None:  # noqa: A002
        """Save ``obj`` under ``id``, overwriting what is stored there.

        The counter moves past the id's number, so that no new object gets it.
        """
        number = parse_id(id)[1]
        self._check_room([(id, number)])
        self._set_id(obj, id)
        with self._lock:
            self._check_pid()
            self._known[id] = obj  # on purpose: no check that the id is its own
            self.skip_past(number)
            self.save_many([obj])

    def referenced(self, objs: Iterable[Any]) -> builtins.list[Any]:
        """The objects in memory that the records of ``objs`` refer to, and those refer to, and so on (children,
        and persistables held in any other attribute), as this handle last saved or loaded them."""
        with self._lock:
            refs, cache = self._refs, self._cache
            seen = {id(obj) for obj in objs}
            found: builtins.list[Any] = []
            stack = [oid for obj in objs if (oid := getattr(obj, "persistent_id", None)) in refs]
            while stack:
                for ref in refs.get(stack.pop(), ()):
                    obj = cache.get(ref)
                    if obj is not None and id(obj) not in seen:
                        seen.add(id(obj))
                        found.append(obj)
                        stack.append(ref)
            return found

    def skip_past(self, number: int) -> None:
        """Never hand out ``number``, or a number below it, from now on (through any handle of the store)."""
        with self._lock:
            self._check_pid()
            self._bump(number)
            self._numbers = [n for n in self._numbers if n > number]

    def assign_id(self, obj: Any) -> str:
        """Give ``obj`` an id now, without writing anything; return it."""
        with self._lock:
            self._check_pid()
            oid = getattr(obj, "persistent_id", None)
            if oid is None:
                oid = self.idfactory.format(obj, self._next_number())
                self._set_id(obj, oid)
                self._known[oid] = obj
            return oid

    def _encode(self, objs: list[Any], cleared: list[Any]) -> list[Record]:
        """The records of ``objs`` and of the new or changed persistables they hold; each object's changed flag
        is cleared just before it is pickled (and the object put in ``cleared``), so that a change another
        thread makes meanwhile leaves it set, to be saved next time."""
        queued = {id(obj) for obj in objs}
        pending = deque(objs)
        records: list[Record] = []
        edges: dict[str, list[str]] = {}

        def reference(child: Persistable) -> str:
            if id(child) not in queued and (
                child.persistent_id is None or child.changed or not self._knows(child, child.persistent_id)
            ):  # a child from another store must come along, or this store would hold a dangling reference
                queued.add(id(child))
                pending.append(child)
            child_id = child.persistent_id or self.assign_id(child)
            edges.setdefault(oid, []).append(child_id)
            return child_id

        dumps, describe = self.serializer.dumps, self.serializer.describe
        custom = getattr(describe, "__func__", None) is not Serializer.describe  # its fields need checking
        now = time.time()  # the batch is written at once: one modification time for all
        while pending:
            obj = pending.popleft()
            oid = getattr(obj, "persistent_id", None) or self.assign_id(obj)
            created = getattr(obj, "_persistent_created", None)
            if created is None:
                created = obj._persistent_created = now
            obj.changed = False
            cleared.append(obj)
            try:
                data = dumps(obj, reference)
            except Error:
                raise
            except Exception as error:
                raise SaveError(oid, f"cannot serialize {type(obj).__name__}: {error}") from error
            try:
                fields = describe(obj)
                if custom:
                    check_fields(fields)
            except Exception as error:  # a history entry that is no (time, state), a describe() of one's own
                raise SaveError(oid, f"cannot make the metadata of {type(obj).__name__}: {error}") from error
            refs = tuple(sorted(set(edges[oid]))) if oid in edges else ()
            meta = {
                "format": FORMAT_VERSION,
                "version": __version__,
                "id": oid,
                **fields,
                "references": refs,
                "created": created,
                "modified": now,
                "size": len(data),
                "crc32": zlib.crc32(data),
            }
            records.append(Record(oid, parse_id(oid)[1], meta, data, obj, refs))
        batch = {r.id for r in records}
        # a cycle through the batch passes through a record of it that refers to something: start only from those
        cycle = find_cycle(edges, lambda node: edges.get(node, ()) if node in batch else self._refs.get(node, ()))
        if cycle:
            path = " -> ".join(cycle)
            raise SaveError(cycle[0], f"reference cycle {path}: a stored object cannot refer back to itself")
        return records

    def _knows(self, obj: Any, oid: str) -> bool:
        """True when ``obj`` got ``oid`` from this store (issued, loaded or saved by a handle on its URL here).

        The registry keeps the object of the handle that loaded it last, so
        this handle's own cache is asked too: a session opened twice in one
        process must not write its unchanged copy over the other's change.
        """
        return self._known.get(oid) is obj or self._cache.get(oid) is obj

    def _check_foreign(self, records: list[Record]) -> None:
        """Check objects whose ids come from elsewhere before writing them.

        Such an object (loaded from another store, or through another handle
        on this one) is saved under its id only where that id holds the same
        object (same id, same creation time), or where its number was never
        handed out here: then the numbers up to it are reserved, so that no
        handle of this store can give it to a new object.  It never
        overwrites another object.
        """
        foreign = [record for record in records if not self._knows(record.obj, record.id)]
        if not foreign:
            return
        numbers: dict[int, str] = {}
        for record in foreign:
            if numbers.setdefault(record.number, record.id) != record.id:
                raise SaveError(record.id, f"has the number of {numbers[record.number]}, also saved in this batch")
        held = self.occupants([record.id for record in foreign])
        fresh = []
        for record in foreign:
            there = held.get(record.id)
            if there is None:
                fresh.append(record)
            elif isinstance(there, LoadError):
                reason = f"{self} holds a record under this id that cannot be read ({there.reason}); not overwriting it"
                raise SaveError(record.id, reason)
            elif there.get("id") != record.id or there.get("created") != record.meta["created"]:
                raise SaveError(
                    record.id,
                    f"{self} already holds another object under this id ({there.get('id')}): this one comes from "
                    "another store; set its persistent_id to None to save a copy under a new id, or use replace()",
                )
        if fresh:
            self._claim_numbers(fresh)
        for record in foreign:
            self._known[record.id] = record.obj

    def _claim_numbers(self, records: list[Record]) -> list[range]:
        """Reserve the numbers of ``records`` in the counter, or raise SaveError if one was handed out already.

        Returns the numbers reserved: from the lowest of ``records`` to the highest, or what of them other
        handles left.
        """
        self._check_room((record.id, record.number) for record in records)
        first = self._reserve(1).start  # every number below was handed out; this one is ours now
        lowest = min(records, key=lambda record: record.number)
        if lowest.number < first:
            raise SaveError(
                lowest.id,
                f"{self} handed out number {lowest.number} already (to an object since removed, or to one not "
                "saved yet); set persistent_id to None to save a copy under a new id",
            )
        top = max(record.number for record in records)
        if top <= first:
            return [range(first, first + 1)]
        more = self._reserve(top - first)
        taken = [record for record in records if first < record.number < more.start]  # by another handle, meanwhile
        if taken:
            raise SaveError(taken[0].id, f"{self} handed out this number to another handle meanwhile; try again")
        return [range(first, first + 1), more]

    def _check_room(self, numbered: Iterable[tuple[str, int]]) -> None:
        """Raise SaveError for an ``(id, number)`` whose number would leave the counter no room for new ids."""
        for oid, number in numbered:
            if number > LAST_TAKEN:
                raise SaveError(
                    oid,
                    f"its number is too high for {self} to take from elsewhere (above {LAST_TAKEN}): the counter "
                    "would run out of ids; set persistent_id to None to save a copy under a new id",
                )

    def occupants(self, ids: Iterable[str]) -> dict[str, dict[str, Any] | LoadError]:
        """The metadata of what the store holds where each id would be written; free ids are left out.

        A record that is there but cannot be read is a LoadError.  On SQL
        stores ids with the same number share a row, so the metadata may name
        another id.
        """
        check_not_one_id(ids)
        ids = list(ids)
        for oid in ids:
            parse_id(oid)
        return {oid: meta for oid, meta in self._read_metadata(ids) if not isinstance(meta, NoSuchObject)}

    def _remember_refs(self, oid: str, refs: Any) -> None:
        refs = tuple(r for r in refs if isinstance(r, str)) if isinstance(refs, (list, tuple)) else ()
        if refs:
            self._refs[oid] = refs
        else:
            self._refs.pop(oid, None)

    def _set_id(self, obj: Any, oid: str) -> None:
        try:
            obj.persistent_id = oid
        except AttributeError as error:
            raise InvalidArgument(
                f"cannot store a {type(obj).__name__}: it takes no attributes (subclass gc3session.Persistable)"
            ) from error

    def _next_number(self) -> int:
        if not self._numbers:
            block = self._reserve(self._block)
            if block.stop - 1 > LAST_NUMBER:  # moved there by an earlier version, which took any number
                raise StoreError(str(self), f"has run out of object ids: its counter is past {LAST_NUMBER}")
            self._numbers = list(reversed(block))
            self._block = min(self._block * 2, MAX_ID_BLOCK)
        return self._numbers.pop()

    # -- loading --------------------------------------------------------------

    def load(self, id: str) -> Any:  # noqa: A002
        """The object saved as ``id``; the same object as long as it is in memory."""
        return self.load_many([id])[id]

    def load_many(self, ids: Iterable[str], *, errors: dict[str, LoadError] | None = None) -> dict[str, Any]:
        """Load several objects in one batch, returning ``{id: object}``.

        A failure raises :class:`LoadError`; with an ``errors`` dict given,
        failures are put there instead and the other objects are returned.
        """
        check_not_one_id(ids)
        chunks = list(id_chunks(dict.fromkeys(ids), LOAD_BATCH))  # every id checked before anything is read
        loaded: dict[str, Any] = {}
        with self._lock, gc_paused():
            self._check_pid()
            for chunk in chunks:
                self._load_chunk(chunk, loaded, errors)
        return loaded

    def _load_chunk(self, ids: list[str], loaded: dict[str, Any], errors: dict[str, LoadError] | None) -> None:
        wanted = [oid for oid in ids if oid not in self._cache]
        raw = self._read_for_load(wanted) if wanted else {}
        absent = set(wanted).difference(raw)  # read with the chunk and not there: no need to ask again
        loading: dict[str, None] = {}  # the records being unpickled, innermost last
        fresh: list[Any] = []  # the objects unpickled, for the plugins to watch

        def resolve(ref: str) -> Any:
            obj = self._cache.get(ref)
            if obj is not None:
                return obj
            if not (isinstance(ref, str) and is_id(ref)):  # never let a record name a path
                holder = next(reversed(loading), "a record")
                raise LoadError(holder, f"holds a reference to {str(ref)[:80]!r}, which is not an id")
            if ref in loading:
                raise LoadError(ref, "reference cycle between stored objects")
            loading[ref] = None
            entry: tuple[dict[str, Any], bytes] | LoadError | None
            try:
                if ref in raw:
                    entry = raw.pop(ref)
                else:  # a reference outside the chunk, or one whose record failed to decode: read it alone
                    entry = None if ref in absent else self._read_for_load([ref]).get(ref)
                obj = self._decode(ref, entry, resolve)
                fresh.append(obj)
                return obj
            finally:
                loading.pop(ref, None)

        try:
            for oid in ids:
                try:
                    loaded[oid] = resolve(oid)
                except LoadError as error:
                    if error.id != oid:  # a record it refers to, maybe through others: name both
                        failure = LoadError(oid, f"it refers to {error.id}, which cannot be loaded: {error.reason}")
                        failure.__cause__ = error
                        error = failure
                    if errors is None:
                        raise error
                    errors[oid] = error
        finally:
            if fresh and self.hooks is not None:
                self.hooks.watch(fresh)

    def _decode(
        self, oid: str, entry: tuple[dict[str, Any], bytes] | LoadError | None, resolve: Callable[[str], Any]
    ) -> Any:
        if entry is None:
            raise missing(oid, self)
        if isinstance(entry, LoadError):
            raise entry
        meta, data = entry
        check_metadata(oid, meta, data)
        try:
            obj = self.serializer.loads(data, resolve)
        except LoadError:
            raise
        except Exception as error:
            raise LoadError(oid, f"cannot unpickle: {type(error).__name__}: {error}") from error
        if getattr(obj, "persistent_id", None) != oid:
            raise LoadError(oid, f"record holds object {getattr(obj, 'persistent_id', None)!r}")
        obj.changed = False
        self._cache[oid] = obj
        self._known[oid] = obj
        refs = meta.get("references")
        if refs or oid in self._refs:  # most records refer to nothing
            self._remember_refs(oid, refs or ())
        return obj

    # -- metadata, listing, removal ---------------------------------------------

    def list(self, **filters: Any) -> list[str]:
        """Ids of the stored objects, oldest first; ``filters`` match metadata fields (``state="NEW"``)."""
        with self._lock:
            self._check_pid()
            return self._list(filters)

    def metadata(self, id: str) -> dict[str, Any]:  # noqa: A002
        """The metadata record of ``id``, read without unpickling."""
        for _, meta in self.iter_metadata([id]):
            if isinstance(meta, LoadError):
                raise meta
            return meta
        raise missing(id, self)  # pragma: no cover - iter_metadata yields each id

    def iter_metadata(self, ids: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """``(id, metadata)`` for the given ids (all when None), streaming; a failure comes as a LoadError.

        ``ids`` may be any iterable, a generator too: it is read a thousand at
        a time, and an id that is not valid raises InvalidArgument when the
        stream reaches it.  On a SQL store the stream holds one database
        connection until it ends or is closed.
        """
        return self._in_chunks(self._read_metadata, ids)

    def iter_summaries(self, ids: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """Like :meth:`iter_metadata`, for listings: stores that can read fewer fields faster do so.

        The fields a listing shows: ``id``, ``jobname``, ``state``, ``cls``,
        ``returncode``, ``modified``, ``children`` (others may come along; a
        record may lack some, so read them with ``get``).
        """
        return self._in_chunks(self._read_summaries, ids)

    def iter_children(
        self, ids: Iterable[str], references: bool = False
    ) -> Iterator[tuple[str, builtins.list[str] | LoadError]]:
        """``(id, the ids of its children)``, streaming, as each record itself holds them; with ``references``,
        also the ids of every other object the record refers to.

        For decisions that delete (which children does a collection still
        hold?): read from the metadata, never from a copy kept for listings.
        """
        for oid, meta in self.iter_metadata(ids):
            if isinstance(meta, LoadError):
                yield oid, meta
            elif references:
                yield oid, held_ids(meta)
            else:
                yield oid, id_list(meta.get("children"))

    def known_references(self, obj: Any) -> tuple[str, ...] | None:
        """The ids the record of ``obj`` refers to (children included), as this handle last saved or loaded it;
        None if the handle holds no record of this object (never saw it, or forgot it: invalidate_cache)."""
        oid = getattr(obj, "persistent_id", None)
        if oid is None or self._cache.get(oid) is not obj:
            return None
        return self._refs.get(oid, ())

    def in_memory(self, id: str) -> Any:  # noqa: A002
        """The object this handle loaded or saved as ``id``, while it is in memory; else None."""
        return self._cache.get(id)

    @property
    def generation(self) -> int:
        """A number that changes whenever this handle writes or deletes records, or forgets those it read."""
        return self._generation

    def _in_chunks(
        self, read: Callable[[builtins.list[str] | None], Iterator[Any]], ids: Iterable[str] | None
    ) -> Iterator[Any]:
        self._check_pid()
        if ids is None:
            return read(None)
        return self._read_chunks(read, ids)

    @staticmethod
    def _read_chunks(read: Callable[[builtins.list[str]], Iterator[Any]], ids: Iterable[str]) -> Iterator[Any]:
        for chunk in id_chunks(ids, LOAD_BATCH):
            yield from read(chunk)  # a generator still, which a caller may close

    def remove(self, id: str) -> None:  # noqa: A002
        """Delete ``id`` from the store (nothing happens if it is not there)."""
        self.remove_many([id])

    def remove_many(self, ids: Iterable[str]) -> None:
        """Delete several objects in one batch."""
        check_not_one_id(ids)
        ids = list(dict.fromkeys(ids))
        for oid in ids:
            parse_id(oid)
        with self._lock:
            self._check_pid()
            if ids:
                self._generation += 1
                self._delete(ids)
            for oid in ids:
                obj = self._cache.pop(oid, None)
                if obj is not None:
                    obj.changed = True  # no longer stored: saving it (or a parent) again must write it
                self._refs.pop(oid, None)

    # -- raw records ----------------------------------------------------------

    def export(self, ids: Iterable[str]) -> Iterator[tuple[str, tuple[dict[str, Any], bytes] | LoadError]]:
        """``(id, (metadata, pickle))`` of each id, as stored, without unpickling; a failure as a LoadError."""
        for chunk in list(id_chunks(ids, LOAD_BATCH)):  # every id checked before anything is read
            with self._lock:
                self._check_pid()
                raw = self._read(chunk)
            for oid in chunk:
                entry = raw.get(oid) or missing(oid, self)
                if not isinstance(entry, LoadError):
                    try:
                        check_metadata(oid, *entry)
                    except LoadError as error:
                        entry = error
                yield oid, entry

    def import_records(self, records: Iterable[tuple[str, dict[str, Any], bytes]]) -> None:
        """Write records exported from another store, keeping their ids, in one batch.

        A record goes where a row or file already is (the caller checks
        :meth:`occupants` first), or takes a number this store never handed
        out, as a foreign save does: the counter moves past it, so new ids
        never collide with it.  A number handed out already (to an object
        since removed, or to one not saved yet) is a SaveError, and nothing
        is written; but one that an earlier import through this handle
        reserved (a copy in batches: children numbered between their
        parents) is this import's to take.  A batch that fails half way
        (files are written one by one) deletes the records it added, and
        leaves those that were there.
        """
        batch = []
        for oid, meta, data in records:
            check_metadata(oid, meta, data)
            batch.append(Record(oid, parse_id(oid)[1], meta, data, None))
        if not batch:
            return
        with self._lock:
            self._check_pid()
            held = self.occupants([record.id for record in batch])
            fresh = [record for record in batch if record.id not in held
                     and not any(record.number in span for span in self._imported)]
            if fresh:
                self._imported = _merged([*self._imported, *self._claim_numbers(fresh)])
            try:
                self._generation += 1
                self._write(batch)
            except BaseException:  # a batch cut short (files are written one by one): its new records go again
                with contextlib.suppress(Exception):  # (their numbers are this import's), not those already there
                    self._delete([record.id for record in batch if record.id not in held])
                raise
            for record in batch:
                self._cache.pop(record.id, None)

    def size(self) -> int | None:
        """Bytes the store takes, where it can tell; None otherwise."""
        return None

    # -- life cycle -----------------------------------------------------------

    def invalidate_cache(self) -> None:
        """Forget the objects in memory: the next load reads the store again."""
        with self._lock:
            self._cache.clear()
            self._refs.clear()
            self._generation += 1

    def pre_fork(self) -> None:
        """Call before ``os.fork()``: release what a child must not share."""

    def post_fork(self) -> None:
        """Call in the child after ``os.fork()`` (done automatically on first use too)."""
        with self._lock:
            self._pid = os.getpid()
            self._numbers = []
            self._imported = []

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self.post_fork()

    def close(self) -> None:
        """Release files and connections; safe to call twice."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {mask_password(self.url)}>"

    def __str__(self) -> str:
        return mask_password(self.url)

    # -- storage primitives ---------------------------------------------------
    # (``builtins.list``: in the class body after the method ``list``, a bare ``list`` would name the method)

    @abc.abstractmethod
    def _reserve(self, n: int) -> range:
        """Take ``n`` new object numbers from the store's counter."""

    @abc.abstractmethod
    def _bump(self, number: int) -> None:
        """Make sure the counter never hands out ``number`` or anything below it."""

    @abc.abstractmethod
    def _write(self, records: builtins.list[Record]) -> None:
        """Write the records, each atomically; raise SaveError naming what failed."""

    @abc.abstractmethod
    def _read(self, ids: builtins.list[str]) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        """``{id: (metadata, data)}``; a missing id is left out, a damaged one maps to a LoadError."""

    def _read_for_load(self, ids: builtins.list[str]) -> dict[str, tuple[dict[str, Any], bytes] | LoadError]:
        """What loading reads: :meth:`_read`, unless a store overrides it to read less.

        Loading checks only the metadata fields ``id``, ``size``, ``crc32``
        and ``references``; a store that can skip reading the others (the
        SQL stores keep them in columns of their own) may return just those.
        """
        return self._read(ids)

    @abc.abstractmethod
    def _delete(self, ids: builtins.list[str]) -> None:
        """Delete the records that exist among ``ids``."""

    @abc.abstractmethod
    def _list(self, filters: dict[str, Any]) -> builtins.list[str]:
        """Ids of all records matching ``filters``, by number."""

    @abc.abstractmethod
    def _read_metadata(self, ids: builtins.list[str] | None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """Metadata of ``ids`` (of all records when None), streaming."""

    def _read_summaries(self, ids: builtins.list[str] | None) -> Iterator[tuple[str, dict[str, Any] | LoadError]]:
        """The listing fields of ``ids`` (see :meth:`iter_summaries`): :meth:`_read_metadata` unless overridden."""
        return self._read_metadata(ids)


_known_objects: dict[str, weakref.WeakValueDictionary[str, Any]] = {}
_known_objects_lock = threading.Lock()


def same_records(occupied: dict[str, dict[str, Any] | LoadError], checksums: dict[str, Any]) -> set[str]:
    """The ids in ``occupied`` (what :meth:`Store.occupants` found) that hold the very record meant to go there:
    its own id, and the checksum in ``checksums``."""
    return {oid for oid, meta in occupied.items()
            if isinstance(meta, dict) and meta.get("id") == oid and meta.get("crc32") == checksums.get(oid)}


def _merged(spans: list[range]) -> list[range]:
    """``spans`` (ranges of step 1) with those that overlap or touch made one: a copy's reserves mostly follow
    each other, so the list stays short however many batches it takes."""
    merged: list[range] = []
    for span in sorted(spans, key=lambda span: span.start):
        if merged and span.start <= merged[-1].stop:
            merged[-1] = range(merged[-1].start, max(merged[-1].stop, span.stop))
        else:
            merged.append(span)
    return merged


def known_objects(where: str | None) -> weakref.WeakValueDictionary[str, Any]:
    """The objects in memory that got their ids from the records at ``where``, by id (shared by their handles).

    ``where`` names the records, not just the place: a store URL, or a
    database and table.  None gives a registry of one's own, for records no
    other handle can reach (an in-memory database).
    """
    if where is None:
        return weakref.WeakValueDictionary()
    with _known_objects_lock:
        return _known_objects.setdefault(where, weakref.WeakValueDictionary())


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a bulk load or save, back on after (if it was on).

    Every object unpickled is a new container the collector would scan
    again and again while the heap grows: that took half the time of
    opening a session of 100,000 tasks.  Saving a batch makes containers
    too (metadata, records), and a full collection in the middle of a
    flush of 10,000 tasks cost a fifth of it.  Neither makes much cyclic
    garbage, so there is nothing for the collector to find meanwhile.  The
    switch is the whole process's: when threads load or save at once, the
    first to finish turns it back on, which costs the others speed, nothing
    else.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def check_not_one_id(ids: Iterable[Any]) -> None:
    """Refuse a string where a list of ids is due: it would iterate letters, each "not a valid object id"."""
    if isinstance(ids, (str, bytes)):
        raise InvalidArgument(f"expected a list of ids, not the string {ids[:80]!r}")


def id_chunks(ids: Iterable[str], size: int) -> Iterator[list[str]]:
    """``ids`` in lists of ``size``, each id checked (InvalidArgument for one that is not valid).

    The ids before a failure (an id that is not valid, or an error of the
    stream itself, such as a bad line of an index read as it goes) come
    first, in a list of their own: a listing shows what it could read.
    """
    check_not_one_id(ids)
    stream = iter(ids)
    while True:
        chunk: list[str] = []
        failure: Exception | None = None
        try:
            chunk.extend(itertools.islice(stream, size))  # what came before a failure stays in the list
        except Exception as error:  # raised again below, after the ids read before it
            failure = error
        if not all_ids(chunk):
            for n, oid in enumerate(chunk):
                try:
                    parse_id(oid)
                except InvalidArgument as error:  # the first that is not valid, named
                    chunk, failure = chunk[:n], error
                    break
        if chunk:
            yield chunk
        if failure is not None:
            raise failure
        if len(chunk) < size:
            return


def all_ids(oids: list[Any]) -> bool:
    """True if every item of ``oids`` is a valid id: one pass of a regular expression over them all."""
    try:
        text = "\n".join(oids)
    except TypeError:  # an item that is no str
        return False
    return text.count("\n") == len(oids) - 1 and ID_LINES.fullmatch(text + "\n") is not None


def missing(oid: str, store: Store) -> NoSuchObject:
    """The error for an id that ``store`` does not hold."""
    return NoSuchObject(oid, f"no such object in {store}")


#: The metadata fields the store fills itself, which a serializer's ``describe`` must leave alone.
STORE_FIELDS = frozenset({"format", "version", "id", "references", "created", "modified", "size", "crc32"})


def check_fields(fields: Any) -> None:
    """Raise unless ``fields``, from a serializer's own ``describe``, can go into a metadata record."""
    if not isinstance(fields, dict):
        raise TypeError(f"describe() gave a {type(fields).__name__}, not a dict")
    odd = [key for key in fields if not isinstance(key, str)]
    if odd:
        raise TypeError(f"describe() gave field names that are no strings: {odd[0]!r}")
    children = fields.get("children", [])
    if not (isinstance(children, (list, tuple)) and all(isinstance(child, str) for child in children)):
        raise TypeError(f"describe() gave children that are no list of ids: {str(children)[:80]!r}")
    taken = sorted(STORE_FIELDS.intersection(fields))
    if taken:
        raise ValueError(f"describe() gave fields that the store fills itself: {', '.join(taken)}")
    try:
        encode_json(fields)
    except RecursionError:
        raise ValueError("describe() gave a value that contains itself") from None


def check_metadata(oid: str, meta: Any, data: bytes) -> None:
    """Raise LoadError unless ``meta`` is a metadata record of ``oid`` that matches ``data``."""
    if not isinstance(meta, dict):
        raise LoadError(oid, "metadata is not a JSON object")
    if meta.get("id") != oid:
        raise LoadError(oid, f"record holds object {meta.get('id')!r}")
    if meta.get("size") not in (None, len(data)):
        raise LoadError(oid, f"record is truncated: {len(data)} of {meta.get('size')} bytes")
    if meta.get("crc32") not in (None, zlib.crc32(data)):
        raise LoadError(oid, "record is corrupt: checksum does not match")


#: The options every store takes (besides ``idfactory`` and ``protocol``, which each names).
SHARED_OPTIONS = ("class_map", "allowed_classes", "serializer")
#: The options of one kind of built-in store that the others ignore, so that one call fits a session whatever
#: store its ``store.url`` names (``fsync`` and ``create`` every built-in store takes).
ONE_KIND_OPTIONS = ("table_name", "extra_fields", "existing_table")


def store_options(options: dict[str, Any]) -> dict[str, Any]:
    """Keep the options that every store understands (refused if of the wrong type); drop the others, which a
    store of another kind may take (a built-in store refuses the names none takes: see check_option_names)."""
    check_options(options, names=False)
    return {name: options[name] for name in SHARED_OPTIONS if name in options}


def check_option_names(options: Iterable[str]) -> None:
    """Refuse option names that no built-in store takes (a typo would be ignored)."""
    known = {*SHARED_OPTIONS, *ONE_KIND_OPTIONS, "idfactory", "protocol", "fsync", "create"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(f"unknown option {', '.join(map(repr, unknown))} (the store options are "
                              f"{', '.join(sorted(known))})")


def check_options(options: Mapping[str, Any], *, names: bool = True) -> None:
    """Refuse store options of the wrong type, and with ``names`` any that no built-in store takes: before
    anything is made."""
    if names:
        check_option_names(options)
    if "protocol" in options:
        check_protocol(options["protocol"])
    check_class_map(options.get("class_map"))
    check_allowed_classes(options.get("allowed_classes"))
    for name, kind in (("idfactory", IdFactory), ("serializer", Serializer)):
        value = options.get(name)
        if value is not None and not isinstance(value, kind):
            raise InvalidArgument(f"{name} must be a gc3session.persistence.{kind.__name__}, not {value!r}")
    extra = options.get("extra_fields")
    if extra is not None and not (isinstance(extra, Mapping) and all(callable(get) for get in extra.values())):
        raise InvalidArgument(f"extra_fields must map sqlalchemy.Column objects to functions of the object, "
                              f"not {extra!r}")


def find_cycle(roots: Iterable[str], refs: Callable[[str], Iterable[str]]) -> list[str] | None:
    """A path ``a -> ... -> a`` through ``refs`` starting from one of ``roots``, or None."""
    done: set[str] = set()
    for root in roots:
        if root in done:
            continue
        path = [root]
        on_path = {root}
        stack: list[Iterator[str]] = [iter(refs(root))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                node = path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done:
                stack.append(iter(refs(child)))
                path.append(child)
                on_path.add(child)
    return None


def matches(meta: dict[str, Any], filters: dict[str, Any]) -> bool:
    """True when every filter equals the metadata field of the same name."""
    return all(meta.get(key) == (str(value) if key == "state" else value) for key, value in filters.items())


# -- URLs and the factory -------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# the password runs to the last "@": it may hold "/" (SQLAlchemy takes that) or "@" (which it cannot, but a
# user may try); masking too much of a URL is harmless, showing part of a password is not
# (slashes or not: "postgresql:/me:pw@host" is refused, naming the URL; a password may hold a newline)
_PASSWORD = re.compile(r"(:/*[^:/@]*):(.*)@", re.DOTALL)
#: A scheme and a colon without the two slashes that make it a URL (``postgresql:/me@host/db``).
_SCHEME_NO_SLASHES = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)")
#: The name of a URL option whose value is secret: ``password``, ``sslpassword``, ``api_token``...
SECRET_OPTION = re.compile(r"password|passwd|pwd|secret|token", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(rf"([?&][^=&#]*(?:{SECRET_OPTION.pattern})[^=&#]*=)[^&#]*", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_registry: dict[str, Callable[..., Store]] = {}


def mask_password(url: str) -> str:
    """``url`` with any password, and the value of any option named like one (see SECRET_OPTION), as ``***``."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1:***@", str(url)))


def written_password(url: str) -> str:
    """The password as written in ``url`` (all that :func:`mask_password` masks there), or ""."""
    found = _PASSWORD.search(url)
    return found[2] if found else ""


def expand_variables(url: str) -> str:
    """Replace each ``${NAME}`` in ``url`` by the environment variable NAME."""

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name not in os.environ:
            shown = mask_password(url)
            raise InvalidArgument(f"store URL {shown} names ${{{name}}}, which is not set in the environment")
        return os.environ[name]

    return _VARIABLE.sub(value, url)


def url_scheme(url: str) -> str | None:
    """The scheme of ``url`` without its ``+driver``, lower case; None for a plain path."""
    match = _SCHEME.match(url)
    return match[1].split("+")[0].lower() if match else None


def register(scheme: str, constructor: Callable[..., Store]) -> None:
    """Make ``make_store`` call ``constructor(url, **kwargs)`` for URLs of ``scheme``."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9.-]*", scheme):
        raise InvalidArgument(f"{scheme!r} is not a URL scheme")
    _registry[scheme.lower()] = constructor


def make_store(url: str | os.PathLike[str] | Store, **kwargs: Any) -> Store:
    """A store for ``url``: a plain path or ``file://`` URL, ``sqlite://``, ``postgresql://``, ``mysql://``.

    Keyword arguments go to the store's constructor; a filesystem store ignores
    those of SQL stores, and a built-in store refuses any other it does not take.
    ``${NAME}`` in the URL is replaced by the environment variable NAME.  Third-party packages add schemes with
    :func:`register` or the entry-point group ``gc3session.stores``.
    """
    if isinstance(url, Store):
        if kwargs:  # they would be ignored: an allow-list, say
            raise InvalidArgument(f"options {', '.join(sorted(kwargs))} are for making a store, and {url} is made "
                                  "already: give them to its constructor")
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument(f"a store URL must be a non-empty string or path, not {url!r}")
    written = url.strip()
    url = expand_variables(written).strip()
    check_not_mistyped(url)
    scheme = url_scheme(url) or "file"
    constructor = _registry.get(scheme) or _from_entry_point(scheme)
    if constructor is None:
        known = ", ".join(sorted(_registry))
        raise InvalidArgument(f"unknown store URL scheme {scheme!r} in {mask_password(url)} (known schemes: {known})")
    store = constructor(url, **kwargs)
    if written != url:
        store.url = written  # what a session writes to store.url: the variables, not their values
    return store


def check_not_mistyped(url: str) -> None:
    """Refuse ``url`` if it starts like a URL of a known scheme without its ``//``: it would be taken for a
    relative path, and the tasks would go to a local directory of that name."""
    match = _SCHEME_NO_SLASHES.match(url)
    if match is None:
        return
    scheme = match[1].split("+")[0].lower()
    if scheme in _registry or scheme == "file" or _from_entry_point(scheme) is not None:
        raise InvalidArgument(f"store URL {mask_password(url)} lacks the // after {match[1]}: (write {match[1]}://...)")


def _from_entry_point(scheme: str) -> Callable[..., Store] | None:
    for entry in entry_points(group="gc3session.stores"):
        if entry.name.lower() == scheme:
            constructor = entry.load()
            register(scheme, constructor)
            return constructor
    return None


__all__ = [
    "Record", "Store", "check_options", "expand_variables", "make_store", "mask_password", "register", "store_options",
    "url_scheme",
]
