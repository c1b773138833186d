"""The structure of a pickle, read without unpickling it.

:func:`trace` runs a pickle's opcodes (as :func:`pickletools.genops` lists
them) on a symbolic stack: nothing is imported and no code named by the
pickle runs.  What the pickle would build comes back as plain values
(strings, numbers, lists, tuples, dicts) and :class:`Built` objects, which
keep the class or function (a :class:`Global`), its arguments, the state
given to ``BUILD`` and the items set on the object.  Persistent ids are
handed to a callback, whose result stands in for them.
"""

from __future__ import annotations

import pickletools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

_PUSH_ARG = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
#: Functions that pickle uses to rebuild an object of the class in their first argument.
RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copy_reg._reconstructor",
                            "copyreg.__newobj__", "copy_reg.__newobj__"})


class CorruptPickle(ValueError):
    """The opcodes do not make a pickle."""


class Global(NamedTuple):
    """A class or function that the pickle names."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Built:
    """An object the pickle would build: its class or function, arguments, state and items."""

    cls: Any
    args: Any = ()
    state: Any = None
    items: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Trace:
    """What :func:`trace` found: the value the pickle builds, and every global it names."""

    root: Any
    globals: set[str]


def trace(data: bytes, persistent_load: Callable[[Any], Any]) -> Trace:
    """Run the opcodes of ``data``; a persistent id is replaced by ``persistent_load(pid)``.

    Raises :class:`CorruptPickle` or, for a pickle cut short, ``ValueError``.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    names: set[str] = set()
    arg: Any  # the opcode's argument, whose type the opcode decides (genops says only Any | None)

    def pop() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            raise CorruptPickle("stack underflow")
        return stack.pop()

    def pop_mark() -> list[Any]:
        if not marks:
            raise CorruptPickle("no mark")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def named(module: Any, qualname: Any) -> Global:
        found = Global(str(module), str(qualname))
        names.add(str(found))
        return found

    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _PUSH_ARG:
            stack.append(arg)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise CorruptPickle("memoizing an empty stack")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise CorruptPickle(f"memo entry {arg} is not set")
            stack.append(memo[arg])
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name in ("EMPTY_LIST", "EMPTY_SET"):
            stack.append([])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("LIST", "FROZENSET", "TUPLE"):
            items = pop_mark()
            stack.append(tuple(items) if name == "TUPLE" else items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [pop() for _ in range(int(name[-1]))]
            stack.append(tuple(reversed(items)))
        elif name == "DICT":
            stack.append(_set_items({}, pop_mark()))
        elif name in ("APPEND", "APPENDS", "ADDITEMS"):
            items = [pop()] if name == "APPEND" else pop_mark()
            if stack and isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = [*reversed([pop(), pop()])] if name == "SETITEM" else pop_mark()
            if stack:
                _set_items(stack[-1], items)
        elif name == "GLOBAL":
            stack.append(named(*arg.partition(" ")[::2]))
        elif name == "STACK_GLOBAL":
            qualname, module = pop(), pop()
            stack.append(named(module, qualname))
        elif name == "INST":
            cls = named(*arg.partition(" ")[::2])
            stack.append(Built(cls, tuple(pop_mark())))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise CorruptPickle("OBJ without a class")
            stack.append(Built(items[0], tuple(items[1:])))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                pop()
            args = pop()
            stack.append(Built(pop(), args))
        elif name == "BUILD":
            state = pop()
            if stack and isinstance(stack[-1], Built):
                stack[-1].state = state
        elif name in ("PERSID", "BINPERSID"):
            stack.append(persistent_load(arg if name == "PERSID" else pop()))
        elif name == "POP":
            if marks and len(stack) == marks[-1]:
                marks.pop()
            else:
                pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            value = pop()
            stack.extend((value, value))
        elif name == "STOP":
            return Trace(pop(), names)
        elif name not in ("PROTO", "FRAME"):  # EXT*, out-of-band buffers: keep the stack's shape, values unknown
            for _ in op.stack_before:
                pop()
            stack.extend(object() for _ in op.stack_after)
    raise CorruptPickle("no STOP")  # pragma: no cover - genops raises ValueError first


def _set_items(target: Any, flat: list[Any]) -> Any:
    if len(flat) % 2:
        raise CorruptPickle("odd number of dictionary items")
    mapping = target.items if isinstance(target, Built) else target
    if isinstance(mapping, dict):
        for key, value in zip(flat[::2], flat[1::2], strict=True):
            try:
                mapping[key] = value
            except TypeError:  # an unhashable key: nothing a reader of attributes needs
                pass
    return target


def attributes(obj: Any) -> dict[str, Any] | None:
    """The attributes the pickle gives ``obj``: its state dict, slots and string-keyed items; None if none."""
    if not isinstance(obj, Built):
        return None
    found = {k: v for k, v in obj.items.items() if isinstance(k, str)}
    for part in obj.state if isinstance(obj.state, tuple) else (obj.state,):
        if isinstance(part, dict):
            found.update((k, v) for k, v in part.items() if isinstance(k, str))
    return found or None


def class_path(obj: Built) -> str | None:
    """``module.Name`` of the class of ``obj``, looking through pickle's reconstructor functions."""
    cls = obj.cls
    if isinstance(cls, Global) and str(cls) in RECONSTRUCTORS and isinstance(obj.args, tuple) and obj.args:
        cls = obj.args[0]
    return str(cls) if isinstance(cls, Global) else None


__all__ = ["Built", "CorruptPickle", "Global", "Trace", "attributes", "class_path", "trace"]
