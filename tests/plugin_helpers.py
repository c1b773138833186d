"""Plugins for the hook tests, importable by name (entry points name them as ``module:attribute``)."""

from __future__ import annotations

from typing import Any


class RecordingPlugin:
    """Records every hook call as a tuple, with ids in place of objects."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def session_opened(self, session: Any) -> None:
        self.calls.append(("session_opened", session.name))

    def task_added(self, session: Any, task: Any) -> None:
        self.calls.append(("task_added", task.persistent_id))

    def task_removed(self, session: Any, task_id: str) -> None:
        self.calls.append(("task_removed", task_id))

    def task_saved(self, store: Any, obj: Any) -> None:
        self.calls.append(("task_saved", obj.persistent_id))

    def state_changed(self, task: Any, old: Any, new: Any) -> None:
        self.calls.append(("state_changed", task.persistent_id, str(old), str(new)))

    def session_closed(self, session: Any, error: BaseException | None) -> None:
        self.calls.append(("session_closed", type(error).__name__ if error else None))

    def named(self, hook: str) -> list[tuple[Any, ...]]:
        """The calls of one hook."""
        return [call for call in self.calls if call[0] == hook]


class FailingPlugin:
    """Raises from every hook it implements."""

    def task_added(self, task: Any) -> None:
        raise RuntimeError(f"plugin bug while adding {task.persistent_id}")

    def task_saved(self, obj: Any) -> None:
        raise RuntimeError("plugin bug while saving")

    def session_closed(self) -> None:
        raise RuntimeError("plugin bug while closing")


def no_plugin() -> None:
    """An entry-point factory that decides to stay out."""
    return None


def broken_factory() -> Any:
    """An entry-point factory that fails."""
    raise RuntimeError("cannot make the plugin")
