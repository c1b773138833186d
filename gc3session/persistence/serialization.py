"""How objects become bytes and metadata, and back.

The store never calls :mod:`pickle` itself: it hands objects to a
:class:`Serializer`, so a different format only needs a subclass that
overrides :meth:`~Serializer.dumps`, :meth:`~Serializer.loads` and
:meth:`~Serializer.describe`.

Inside a record, every other :class:`~gc3session.task.Persistable` the object
refers to is written as a reference (a call of :func:`stored_reference` with
its id), and resolved through the store when loading, so a child saved on its own and reached through its parent is
one object in memory.
"""

from __future__ import annotations

import io
import json
import json.scanner
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ..exceptions import InvalidArgument
from ..task import Persistable

#: Pickle protocol of every record: fixed, so that older Pythons read what newer ones write.
DEFAULT_PROTOCOL = 4
#: Version of the metadata record; raised when its meaning changes.
FORMAT_VERSION = 1

#: Globals a restricted unpickler accepts besides the allowed classes: plain data types only.
SAFE_GLOBALS = frozenset(
    {
        "builtins.bool", "builtins.bytearray", "builtins.bytes", "builtins.complex",
        "builtins.dict", "builtins.float", "builtins.frozenset", "builtins.int",
        "builtins.list", "builtins.object", "builtins.range", "builtins.set",
        "builtins.slice", "builtins.str", "builtins.tuple",
        "collections.OrderedDict", "collections.deque",
        "datetime.date", "datetime.datetime", "datetime.time", "datetime.timedelta",
        "datetime.timezone", "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
        "pathlib.Path", "pathlib.PosixPath", "pathlib.PurePath", "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath", "pathlib.WindowsPath",
        "pathlib._local.Path", "pathlib._local.PosixPath", "pathlib._local.PurePath",  # where Python 3.13 keeps them
        "pathlib._local.PurePosixPath", "pathlib._local.PureWindowsPath", "pathlib._local.WindowsPath",
        "gc3session.task.Execution", "gc3session.task.State", "gc3session.task.Task",
        "gc3session.task.TaskCollection",
    }
)


def _unencodable(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_encoder() -> Callable[[Any], str]:
    """Compact JSON for metadata.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs
    more than encoding a metadata record: on CPython, one C encoder is built
    here and reused (without the check for circular references, which
    metadata made of plain fields does not need).
    """
    fallback = json.JSONEncoder(separators=(",", ":")).encode
    make: Any = getattr(json.encoder, "c_make_encoder", None)  # private and untyped; None raises the TypeError below
    try:
        iterencode = make(None, _unencodable, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
    except TypeError:  # pragma: no cover - no C accelerator (None), or one that takes other arguments
        return fallback
    return lambda value: "".join(iterencode(value, 0))


#: ``value`` as compact ASCII JSON (like ``json.dumps(value, separators=(",", ":"))``).
encode_json = _json_encoder()
#: ``(value, end)``: the JSON value that starts at ``index`` of ``text`` and where it ends; StopIteration if
#: there is none there.  The C scanner where there is one (typeshed asks for a make_scanner as context, json
#: itself passes a JSONDecoder).
scan_json: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_json_space = re.compile(r"[ \t\n\r]*")


def decode_json(text: str) -> Any:
    """``json.loads(text)`` for a str, straight through the scanner: for a metadata record, a third faster."""
    start = 0 if text[:1] in "{[" else _json_space.match(text).end()  # type: ignore[union-attr]
    try:
        value, end = scan_json(text, start)
    except StopIteration as stop:  # how the scanner says there is no value at ``start``
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    except RecursionError:  # a damaged record, nested thousands deep: bad JSON like any other
        raise json.JSONDecodeError("Nested too deep", text, start) from None
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise json.JSONDecodeError("Extra data", text, _json_space.match(text, end).end())  # type: ignore[union-attr]
    return value


class RefusedGlobal(pickle.UnpicklingError):
    """A restricted unpickler met a global that is not allowed."""


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as pickle records it."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Serializer:
    """Pickle with references between persistables, class renames and an optional allow-list.

    ``class_map`` maps old ``module.Name`` paths to new ones, for classes that
    moved since they were saved.  ``allowed_classes`` (module prefixes such as
    ``"mypkg"`` or ``"mypkg.tasks.Fit"``, or classes) turns on a restricted
    unpickler that refuses any other global: use it to open a session that
    someone else wrote.  Both are read-only: each global is looked up once
    and remembered.
    """

    def __init__(
        self,
        *,
        protocol: int = DEFAULT_PROTOCOL,
        class_map: Mapping[str, str] | None = None,
        allowed_classes: Iterable[str | type] | None = None,
    ) -> None:
        self.protocol = check_protocol(protocol)
        self._class_map = check_class_map(class_map)
        self._allowed = check_allowed_classes(allowed_classes)
        self._idle: list[_Pickler] = []  # picklers not in use: building one costs more than a small pickle
        self._globals: dict[tuple[str, str], Any] = {}  # what each global of a pickle was found to be

    @property
    def class_map(self) -> Mapping[str, str]:
        """Old ``module.Name`` -> new one (read-only: globals are looked up once and remembered)."""
        return MappingProxyType(self._class_map)

    @property
    def allowed(self) -> tuple[str, ...] | None:
        """The allowed module prefixes and classes, or None when any global may be unpickled (read-only)."""
        return self._allowed

    def dumps(self, obj: Any, reference: Callable[[Persistable], str]) -> bytes:
        """Pickle ``obj``; every other Persistable inside it becomes ``reference(child)``."""
        try:
            pickler = self._idle.pop()
        except IndexError:  # none idle: the first call, or one from another thread or from inside a pickling
            pickler = _Pickler(self.protocol)
        data = pickler.dumps(obj, reference)  # a pickler that fails is dropped
        # a big pickle leaves a big memo table, which never shrinks and which clearing walks whole: every
        # later pickle through that pickler would pay for it (a collection of 100,000 children made each
        # of them cost a millisecond)
        if len(data) <= REUSED_UP_TO and pickler.protocol == self.protocol:
            self._idle.append(pickler)
        return data

    def __getstate__(self) -> dict[str, Any]:
        # a copy gets picklers of its own (picklers do not pickle), and finds its globals again
        return {**self.__dict__, "_idle": [], "_globals": {}}

    def loads(self, data: bytes, resolve: Callable[[str], Any]) -> Any:
        """Unpickle ``data``; a reference is replaced by ``resolve(id)``."""
        return _Unpickler(io.BytesIO(data), self, resolve).load()

    def describe(self, obj: Any) -> dict[str, Any]:
        """The metadata fields that can be read without unpickling (besides id and times).

        A subclass may add fields of its own: a dict with str keys and plain
        JSON values (str, int, float, bool, None, lists, dicts with str
        keys), ``children`` a list of ids, and none of the fields the store
        fills itself (``format``, ``version``, ``id``, ``references``,
        ``created``, ``modified``, ``size``, ``crc32``).  Anything else, or
        an exception, makes saving the object raise SaveError naming it, and
        nothing of that batch is written.
        """
        execution = getattr(obj, "execution", None)
        state = getattr(execution, "state", None) if execution is not None else getattr(obj, "state", None)
        history = getattr(execution, "history", None) or []
        children = getattr(obj, "tasks", None)
        jobname = getattr(obj, "jobname", None)
        return {
            "cls": class_path(type(obj)),
            "jobname": None if jobname is None else str(jobname),
            "state": None if state is None else str(state),
            "returncode": _int_or_none(getattr(execution, "returncode", None)),
            "children": _child_ids(children),
            "history": tuple([(float(t), str(s)) for t, s in history]),  # tuples: nothing for the GC to follow
        }

    def find_class(self, module: str, name: str) -> tuple[str, str]:
        """Map a global through ``class_map`` and check it against the allow-list."""
        full = self._class_map.get(f"{module}.{name}")
        if full is not None:
            module, _, name = full.rpartition(".")
        if self.allowed is not None and not self._is_allowed(f"{module}.{name}"):
            raise RefusedGlobal(f"{module}.{name} is not in allowed_classes")
        return module, name

    def _is_allowed(self, full: str) -> bool:
        if full in SAFE_GLOBALS:
            return True
        assert self.allowed is not None
        return any(full == a or full.startswith(a + ".") for a in self.allowed)


def stored_reference(oid: str) -> Any:
    """What a reference to another stored object pickles as; only a store's unpickler can resolve it."""
    raise pickle.UnpicklingError(f"{oid} is a reference to another stored object: load the record through its store")


_REFERENCE = (stored_reference.__module__, stored_reference.__name__)


#: The largest pickle after which its pickler is used again (see Serializer.dumps).
REUSED_UP_TO = 16 * 1024


class _Pickler(pickle.Pickler):
    """Pickles one object after another into its own buffer, each pickle on its own (no memo shared)."""

    # reducer_override, unlike persistent_id, is not called for plain ints, strings, lists and dicts,
    # which makes pickling a task about twice as fast
    def __init__(self, protocol: int) -> None:
        self._buffer = io.BytesIO()
        super().__init__(self._buffer, protocol)
        self.protocol = protocol
        self._root: Any = None
        self._reference: Any = None  # the reference function of the current dumps()

    def dumps(self, obj: Any, reference: Callable[[Persistable], str]) -> bytes:
        self._root, self._reference = obj, reference
        try:
            self.dump(obj)
            return self._buffer.getvalue()
        finally:
            self._root = self._reference = None
            self.clear_memo()  # the memo holds every object pickled: let them go
            self._buffer.seek(0)
            self._buffer.truncate()

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._root or not isinstance(obj, Persistable):
            return NotImplemented
        return stored_reference, (self._reference(obj),)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, serializer: Serializer, resolve: Callable[[str], Any]) -> None:
        super().__init__(file)
        self._serializer = serializer
        self._resolve = resolve

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _REFERENCE:
            return self._reference
        known = self._serializer._globals  # every record names its classes: look each one up once
        found = known.get((module, name))
        if found is None:
            found = known[module, name] = self._find(module, name)
        return found

    def _find(self, module: str, name: str) -> Any:
        module, name = self._serializer.find_class(module, name)
        found = super().find_class(module, name)
        if self._serializer.allowed is not None:
            # "allowed.module" + "os.system" must not reach os.system: check what the name really is
            real = f"{getattr(found, '__module__', None)}.{getattr(found, '__qualname__', None)}"
            if not isinstance(found, type) or not self._serializer._is_allowed(real):
                raise RefusedGlobal(f"{module}.{name} (which is {real}) is not in allowed_classes")
        return found

    def _reference(self, oid: Any) -> Any:
        if not isinstance(oid, str):
            raise pickle.UnpicklingError(f"bad reference {oid!r} in record")
        return self._resolve(oid)

    def persistent_load(self, pid: Any) -> Any:
        # records imported from gc3pie refer to others by pickle's persistent ids: gc3libs' Id, a str subclass
        # whose hash is not the string's, so it is made a plain str before the look-up
        return self._reference(str.__str__(pid) if isinstance(pid, str) else pid)


def check_protocol(protocol: Any) -> int:
    """``protocol``, or InvalidArgument if it is no pickle protocol this module can use."""
    if not isinstance(protocol, int) or not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise InvalidArgument(f"pickle protocol must be 2 to {pickle.HIGHEST_PROTOCOL}, not {protocol!r}")
    return protocol


def check_class_map(class_map: Any) -> dict[str, str]:
    """``class_map`` as a dict, or InvalidArgument if it is no mapping of ``module.Name`` strings."""
    if class_map is None:
        return {}
    if not isinstance(class_map, Mapping):
        kind = type(class_map).__name__
        raise InvalidArgument(f"class_map must map old 'module.Name' strings to new ones, not a {kind}")
    return {_check_path(k): _check_path(v) for k, v in class_map.items()}


def check_allowed_classes(allowed_classes: Any) -> tuple[str, ...] | None:
    """``allowed_classes`` as a tuple of names, or InvalidArgument if it holds anything but names and classes."""
    if allowed_classes is None:
        return None
    if isinstance(allowed_classes, (str, type)):
        allowed_classes = [allowed_classes]
    elif not isinstance(allowed_classes, Iterable):
        raise InvalidArgument("allowed_classes must be module prefixes or classes (a name, a class, or a list of "
                              f"them), not {allowed_classes!r}")
    allowed = []
    for entry in allowed_classes:
        if isinstance(entry, type):
            allowed.append(class_path(entry))
        elif isinstance(entry, str) and entry.strip(". "):
            allowed.append(entry)
        else:
            raise InvalidArgument(f"allowed_classes entries must be module prefixes or classes, not {entry!r}")
    return tuple(allowed)


def _check_path(path: str) -> str:
    if not isinstance(path, str) or "." not in path.strip("."):
        raise InvalidArgument(f"class_map entries must be 'module.Name' strings, not {path!r}")
    return path


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _child_ids(children: Any) -> list[str | None] | tuple[()]:
    if not isinstance(children, (list, tuple)) or not children:
        return ()  # one shared empty tuple rather than a new list for every task without children
    return [getattr(c, "persistent_id", None) for c in children if isinstance(c, Persistable)]


__all__ = [
    "DEFAULT_PROTOCOL", "FORMAT_VERSION", "SAFE_GLOBALS", "RefusedGlobal", "Serializer", "class_path", "decode_json",
    "encode_json", "stored_reference",
]
