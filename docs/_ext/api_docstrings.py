"""Griffe extension for the API reference: reST-ish docstrings to Markdown.

Loaded by the mkdocstrings handler (``extensions`` in ``mkdocs.yml``).

The docstrings of gc3session are plain prose with a little reST in it:
``double backticks``, Sphinx roles such as :class:`Store` or
:meth:`~Serializer.dumps`, and now and then a doctest.  mkdocstrings renders
docstrings as Markdown, where double backticks already work but roles and
doctests do not.  Once the package is loaded, this extension rewrites every
docstring:

- a role becomes inline code, linked to the object it names when that object
  is part of the loaded package (the link is "optional": if the object is
  not rendered anywhere, the name stays plain code and the build does not
  warn); ``~`` shows the last part of the name only, as in Sphinx;
- a doctest (lines from ``>>>`` to the next blank line) becomes a fenced
  ``pycon`` block;
- an attribute with no docstring of its own gets the ``#:`` comment lines
  right above it, the Sphinx convention the code uses for constants.

The reference shows members without docstrings too (``State.NEW``,
``Task.state``, ``Session.path``), so this extension also hides what is not
API even though it has a public-looking name: special methods without a
docstring of their own (``__repr__``, ``__len__``: their behaviour is
described by the class), ``__slots__``, and a module's logger.  And it
drops the value of an attribute that ``__init__`` sets (``self.path =
os.path.abspath(...)``): that is the constructor's code, not something a
reader can rely on.

It only changes what the documentation shows, never the library.
"""

from __future__ import annotations

import html
import re
from typing import Any

from griffe import Alias, Attribute, Docstring, Extension, GriffeLoader, Module, Object

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|const|mod|exc|obj):`(?P<target>[^`]+)`")
TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>")


class ApiDocstrings(Extension):
    """Rewrite the docstrings of a loaded package for Markdown, and hide what is not API."""

    def on_package(self, *, pkg: Module, loader: GriffeLoader, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if _not_api(obj):
                obj.public = False
            if isinstance(obj, Attribute) and _set_by_init(obj):
                obj.value = None
            if obj.docstring is None and isinstance(obj, Attribute):
                obj.docstring = _comment_docstring(obj)
            if obj.docstring is not None:
                obj.docstring.value = _doctests(_roles(obj.docstring.value, obj, loader))


def _objects(obj: Object) -> Any:
    """``obj`` and everything defined in it (aliases, which are imports, left out)."""
    yield obj
    for member in obj.members.values():
        if not isinstance(member, Alias):
            yield from _objects(member)


def _not_api(obj: Object) -> bool:
    name = obj.name
    if name.startswith("__") and name.endswith("__") and name != "__init__":
        return name == "__slots__" or obj.docstring is None
    return (
        isinstance(obj, Attribute)
        and isinstance(obj.parent, Module)
        and name in ("log", "logger")
        and str(obj.value or "").startswith("logging.getLogger(")
    )


def _set_by_init(attr: Attribute) -> bool:
    """True for an attribute that only ``__init__`` assigns (``self.x = ...``)."""
    return "instance-attribute" in attr.labels and "class-attribute" not in attr.labels


def _comment_docstring(attr: Attribute) -> Docstring | None:
    """The ``#:`` comment lines just above ``attr``, as its docstring."""
    try:
        lines = attr.lines_collection[attr.filepath]
    except Exception:  # no source to read (a compiled module, say)
        return None
    found: list[str] = []
    number = (attr.lineno or 1) - 2  # the line above, counted from 0
    while number >= 0 and lines[number].lstrip().startswith("#:"):
        found.insert(0, lines[number].lstrip()[2:].strip())
        number -= 1
    if not found:
        return None
    return Docstring("\n".join(found), lineno=number + 2, parent=attr)


def _roles(text: str, scope: Object, loader: GriffeLoader) -> str:
    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        titled = TITLED.fullmatch(target)
        if titled:
            title, target = titled["title"], titled["target"]
        else:
            short = target.startswith("~")
            target = target.lstrip("~.!")
            title = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{html.escape(title)}</code>"
        path = _resolve(target, scope, loader)
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


def _resolve(target: str, scope: Object, loader: GriffeLoader) -> str | None:
    """The canonical path of the object ``target`` names, looked up as Sphinx would from ``scope``."""
    candidates = []
    where: Object | None = scope
    while where is not None:
        candidates.append(f"{where.path}.{target}")
        where = where.parent
    candidates.append(target)
    for path in candidates:
        try:
            found = loader.modules_collection.get_member(path)
        except Exception:  # not there, or behind an import that was not loaded
            continue
        try:
            return found.canonical_path
        except Exception:  # an alias to something that was not loaded
            return None
    return None


def _doctests(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    fenced = False  # inside a ``` block the docstring already has
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith(">>>") and (not out or not out[-1].strip()):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)
