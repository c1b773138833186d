"""Accessors: small functions that read a value out of an object, for SQL ``extra_fields``.

``GET.execution.returncode`` is a function: called with an object, it returns
``obj.execution.returncode``.  ``GET["key"]`` reads an item instead of an
attribute, and the two combine (``GET.params["alpha"]``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any


class Accessor:
    """A path of attribute and item look-ups, applied when called."""

    __slots__ = ("_steps",)

    def __init__(self, steps: tuple[tuple[str, Any], ...] = ()) -> None:
        self._steps = steps

    def __getattr__(self, name: str) -> Accessor:
        if name.startswith("__"):
            raise AttributeError(name)
        return Accessor((*self._steps, ("attr", name)))

    def __getitem__(self, key: Any) -> Accessor:
        return Accessor((*self._steps, ("item", key)))

    def __call__(self, obj: Any) -> Any:
        for kind, key in self._steps:
            obj = getattr(obj, key) if kind == "attr" else obj[key]
        return obj

    def __repr__(self) -> str:
        path = "".join(f".{key}" if kind == "attr" else f"[{key!r}]" for kind, key in self._steps)
        return f"GET{path}"


#: The root accessor: ``GET.foo.value`` reads ``obj.foo.value``.
GET = Accessor()


def attribute(path: str) -> Callable[[Any], Any]:
    """``attribute("foo.value")`` is the same as ``GET.foo.value``."""
    return operator.attrgetter(path)


__all__ = ["GET", "Accessor", "attribute"]
