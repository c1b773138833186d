"""Hooks for plugins, dispatched with :mod:`pluggy`.

A plugin is any object with some of the methods of :class:`HookSpecs`; each
method takes any subset of its hook's arguments, by name.  A session gets
its plugins from ``Session(path, plugins=[...])`` and from the entry-point
group ``gc3session.plugins`` (switch that off with
``Session(path, autoload_plugins=False)`` or by setting the environment
variable ``GC3SESSION_DISABLE_PLUGIN_AUTOLOAD``).

A plugin's exception is logged and swallowed: hooks run after the data they
report on is written, and a broken plugin never stops a session.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast

import pluggy

from . import task as _task
from .exceptions import InvalidArgument

if TYPE_CHECKING:
    from .persistence.store import Store
    from .session import Session
    from .task import State

log = logging.getLogger(__name__)

PROJECT = "gc3session"
#: The entry-point group that plugins are loaded from.
ENTRY_POINT_GROUP = "gc3session.plugins"
#: Set this environment variable (to anything but empty or ``0``) to skip entry-point plugins.
DISABLE_AUTOLOAD_ENV = "GC3SESSION_DISABLE_PLUGIN_AUTOLOAD"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Optional marker for a plugin's methods, to pass pluggy options such as ``tryfirst=True``.
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    """The hooks a plugin can implement.  All are called with keyword arguments."""

    @hookspec
    def session_opened(self, session: Session) -> None:
        """A session was created or opened (its tasks loaded, unless it is lazy)."""

    @hookspec
    def task_added(self, session: Session, task: Any) -> None:
        """``task`` joined ``session`` (by ``add`` or ``load``); with the default flush it is already saved."""

    @hookspec
    def task_removed(self, session: Session, task_id: str) -> None:
        """Task ``task_id`` left ``session`` (by ``remove`` or ``forget``)."""

    @hookspec
    def task_saved(self, store: Store, obj: Any) -> None:
        """``obj`` (a task or any child) was written to ``store``."""

    @hookspec
    def state_changed(self, task: Any, old: State, new: State) -> None:
        """The execution state of a task known to the session changed from ``old`` to ``new``."""

    @hookspec
    def session_closed(self, session: Session, error: BaseException | None) -> None:
        """The session was closed; ``error`` is the exception that ended its ``with`` block, if any."""


HOOK_NAMES = frozenset(name for name in vars(HookSpecs) if not name.startswith("_"))


class _Manager(pluggy.PluginManager):
    """Takes any method named like a hook, marked with :data:`hookimpl` or not."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in HOOK_NAMES and callable(getattr(plugin, name, None)):
            opts = cast("pluggy.HookimplOpts", {})  # every option left out: pluggy fills in the defaults
        return opts


class _Guarded:
    """A plugin seen through methods that log its exceptions instead of raising them."""

    def __init__(self, plugin: object) -> None:
        self._plugin = plugin
        self._names = sorted(name for name in HOOK_NAMES if callable(getattr(plugin, name, None)))
        for name in self._names:
            setattr(self, name, _guard(plugin, name))

    def __dir__(self) -> list[str]:
        return list(self._names)


def _guard(plugin: object, name: str) -> Any:
    method = getattr(plugin, name)
    signature = inspect.signature(method)
    keyword_only = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if keyword_only:  # pluggy passes the plain parameters only: each call would fail, or never pass these
        raise InvalidArgument(f"plugin {plugin!r}: {name}() takes {', '.join(keyword_only)} as keyword-only "
                              "parameters, which hooks never pass: make them plain parameters (def "
                              f"{name}(self, {', '.join(keyword_only)}))")

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> None:  # pluggy passes arguments with defaults by keyword
        try:
            method(*args, **kwargs)
        except Exception:
            log.error("plugin %r failed in %s; the session goes on", plugin, name, exc_info=True)

    guarded.__signature__ = signature  # type: ignore[attr-defined]
    return guarded


class Hooks:
    """The plugins of one session, and the calls into them.

    ``plugins`` are registered first-come; with ``autoload`` (by default,
    unless :data:`DISABLE_AUTOLOAD_ENV` is set) the plugins of the
    ``gc3session.plugins`` entry points are added too.
    """

    def __init__(self, plugins: Iterable[object] = (), *, autoload: bool | None = None) -> None:
        self._manager = _Manager(PROJECT)
        self._manager.add_hookspecs(HookSpecs)
        self._guards: dict[int, _Guarded] = {}
        self._wanted: frozenset[str] = frozenset()
        self.active = True
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
        if autoload:
            for name, plugin in entry_point_plugins():
                try:
                    self.register(plugin)
                except Exception:
                    log.error("plugin %s (entry point %s) cannot be used", plugin, name, exc_info=True)
        if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Iterable):
            raise InvalidArgument(f"plugins must be a list of plugin objects, not {plugins!r}")
        for plugin in plugins:
            self.register(plugin)

    @property
    def plugins(self) -> list[object]:
        """The registered plugins, in the order they were registered."""
        return [guard._plugin for guard in self._guards.values()]

    def register(self, plugin: object) -> None:
        """Add ``plugin``; raise InvalidArgument if a hook method's arguments do not match its hook."""
        if id(plugin) in self._guards:
            return
        guard = _Guarded(plugin)
        try:
            self._manager.register(guard, name=f"{type(plugin).__name__}-{id(plugin):x}")
        except pluggy.PluginValidationError as error:
            raise InvalidArgument(f"plugin {plugin!r} does not fit gc3session's hooks: {error}") from error
        self._guards[id(plugin)] = guard
        self._update()

    def unregister(self, plugin: object) -> None:
        """Remove ``plugin`` (nothing happens if it is not registered)."""
        guard = self._guards.pop(id(plugin), None)
        if guard is not None:
            self._manager.unregister(guard)
            self._update()

    def _update(self) -> None:
        self._wanted = frozenset(name for name in HOOK_NAMES if getattr(self._manager.hook, name).get_hookimpls())

    def wants(self, name: str) -> bool:
        """True when some plugin implements hook ``name`` (so callers can skip building its arguments)."""
        return self.active and name in self._wanted

    def call(self, name: str, **kwargs: Any) -> None:
        """Call hook ``name`` on every plugin that implements it."""
        if self.active and name in self._wanted:
            getattr(self._manager.hook, name)(**kwargs)

    def saved(self, store: Store, objs: Iterable[Any]) -> None:
        """Report objects just written (``task_saved``) and watch their state changes."""
        if not self.active:
            return
        if "state_changed" in self._wanted:
            self.watch(objs)
        if "task_saved" in self._wanted:
            hook = self._manager.hook.task_saved
            for obj in objs:
                hook(store=store, obj=obj)

    def watch(self, objs: Iterable[Any]) -> None:
        """Report later state changes of these tasks through ``state_changed``."""
        if not (self.active and "state_changed" in self._wanted):
            return
        for obj in objs:
            execution = getattr(obj, "execution", None)
            if isinstance(execution, _task.Execution):
                _task.observe(execution, _StateRelay(obj, self))


class _StateRelay:
    """Calls ``state_changed`` for one task (held weakly, so watching keeps nothing alive)."""

    __slots__ = ("_hooks", "_task")

    def __init__(self, task: Any, hooks: Hooks) -> None:
        self._task = weakref.ref(task)
        self._hooks = hooks

    def __call__(self, old: State, new: State) -> None:
        task = self._task()
        if task is not None:
            self._hooks.call("state_changed", task=task, old=old, new=new)


def _has_hooks(obj: object) -> bool:
    return any(callable(getattr(obj, name, None)) for name in HOOK_NAMES)


_entry_points: list[tuple[str, object]] | None = None
_entry_points_lock = threading.Lock()


def entry_point_plugins() -> list[tuple[str, object]]:
    """``(name, plugin)`` for each ``gc3session.plugins`` entry point.

    An entry point names a plugin object, or a class or function that makes
    one: it is called with no arguments for every session, and may return
    ``None`` to stay out (the progress reporter does so off a terminal).
    Entry points are imported once per process; one that fails is logged
    and skipped.
    """
    global _entry_points
    with _entry_points_lock:
        if _entry_points is None:
            found = []
            for point in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    found.append((point.name, point.load()))
                except Exception:
                    log.error("cannot load plugin entry point %s (%s)", point.name, point.value, exc_info=True)
            _entry_points = found
    made = []
    for name, target in _entry_points:
        plugin = target
        if isinstance(target, type) or (callable(target) and not _has_hooks(target)):
            try:
                plugin = target()
            except Exception:
                log.error("plugin entry point %s failed to make its plugin", name, exc_info=True)
                continue
        if plugin is not None:
            made.append((name, plugin))
    return made


__all__ = ["DISABLE_AUTOLOAD_ENV", "ENTRY_POINT_GROUP", "HookSpecs", "Hooks", "entry_point_plugins", "hookimpl"]
