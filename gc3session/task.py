"""Objects a session stores: the :class:`Persistable` mix-in and the tasks.

``Persistable`` keeps its bookkeeping in class attributes with safe defaults,
so a subclass that never calls ``Persistable.__init__`` still works.  A
:class:`Task` records every change of its execution state with a timestamp
and marks itself ``changed`` whenever an attribute is assigned, so that
``Session.save_all()`` knows what to write.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .exceptions import InvalidArgument


class Persistable:
    """Mix-in for objects that a store saves as records of their own.

    Two persistables with the same ``persistent_id`` compare equal; objects
    not saved yet compare by identity.  The hash follows ``persistent_id``
    once it is set, so put unsaved objects in sets or dict keys only after
    saving them.
    """

    #: The id a store gave this object, ``None`` until it is first saved.
    persistent_id: str | None = None
    #: True when the object has changes that its store does not have yet.
    changed: bool = True

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Persistable):
            return NotImplemented
        return self.persistent_id is not None and self.persistent_id == other.persistent_id

    def __hash__(self) -> int:
        if self.persistent_id is None:
            return object.__hash__(self)
        return hash(self.persistent_id)


class State(str, enum.Enum):
    """The states of a task's execution, as in gc3libs."""

    NEW = "NEW"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    UNKNOWN = "UNKNOWN"

    __str__ = str.__str__  # the value itself ("NEW"), without a Python call: metadata asks for it on every save

    @classmethod
    def of(cls, value: State | str) -> State:
        """Return the state named by ``value``; raise InvalidArgument if none is."""
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(s.value for s in cls)
            raise InvalidArgument(f"unknown task state {value!r} (known: {known})") from None


class Execution:
    """Where a task's run stands: state, its timed history, return code, info."""

    def __init__(self, state: State | str = State.NEW) -> None:
        state = State.of(state)
        self._state = state
        self.history: list[tuple[float, State]] = [(time.time(), state)]
        self.returncode: int | None = None
        self.info: str = ""
        self.changed = True

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in ("changed", "state"):  # the state setter marks real changes itself
            object.__setattr__(self, "changed", True)

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State | str) -> None:
        value = State.of(value)
        old = self._state
        if value != old:
            # the history first: setting _state marks the execution changed, and a save that clears the mark in
            # between must find the entry there already (else it is saved without it, and never after)
            self.history.append((time.time(), value))
            self._state = value
            if _observers:
                observer = _observers.get(self)
                if observer is not None:
                    observer(old, value)

    def __repr__(self) -> str:
        return f"<Execution {self._state} returncode={self.returncode!r}>"


#: Executions whose state changes are reported, and to whom (see :func:`observe`).
_observers: weakref.WeakKeyDictionary[Execution, Callable[[State, State], None]] = weakref.WeakKeyDictionary()


def observe(execution: Execution, observer: Callable[[State, State], None] | None) -> None:
    """Call ``observer(old, new)`` after each change of ``execution.state`` (``None`` stops it).

    One observer per execution: the session's plugins use this for their
    ``state_changed`` hook.
    """
    if observer is None:
        _observers.pop(execution, None)
    else:
        _observers[execution] = observer


class Task(Persistable):
    """A unit of work.  Keyword arguments become attributes.

    >>> t = Task(jobname="fit-1", alpha=0.1)
    >>> t.alpha, t.state
    (0.1, <State.NEW: 'NEW'>)
    """

    def __init__(self, jobname: str | None = None, **attributes: Any) -> None:
        self.jobname = jobname if jobname is not None else type(self).__name__
        self.execution = Execution()
        for name, value in attributes.items():
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "execution":
            if not isinstance(value, Execution):  # the state, its history and return code live there
                raise InvalidArgument(f"a task's execution must be an Execution, not {type(value).__name__} "
                                      f"(the name is taken: give the attribute another one)")
            old = self.__dict__.get("execution")
            if old is not None and old is not value and old in _observers:  # the session's plugins keep watching
                _observers[value] = _observers.pop(old)
        object.__setattr__(self, name, value)
        if name not in ("changed", "state"):  # setting the state marks the execution when it changes
            object.__setattr__(self, "changed", True)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        object.__setattr__(self, "changed", True)

    @property
    def changed(self) -> bool:
        execution = self.__dict__.get("execution")
        return self.__dict__.get("changed", True) or bool(getattr(execution, "changed", False))

    @changed.setter
    def changed(self, value: bool) -> None:
        self.__dict__["changed"] = value
        execution = self.__dict__.get("execution")
        if execution is not None and not value:
            execution.changed = False

    @property
    def state(self) -> State:
        return self.execution.state

    @state.setter
    def state(self, value: State | str) -> None:
        self.execution.state = value

    def __repr__(self) -> str:
        name = self.persistent_id or "unsaved"
        return f"<{type(self).__name__} {name} {self.jobname!r} {self.state}>"


class TaskCollection(Task):
    """A task made of child tasks, kept in ``.tasks``."""

    def __init__(self, jobname: str | None = None, tasks: Iterable[Task] | None = None, **attributes: Any) -> None:
        super().__init__(jobname, **attributes)
        self.tasks: list[Task] = list(tasks or [])

    def add(self, task: Task) -> None:
        """Append ``task`` to the children."""
        self.tasks.append(task)
        self.changed = True

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)


__all__ = ["Execution", "Persistable", "State", "Task", "TaskCollection"]
