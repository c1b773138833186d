"""A plugin that shows progress on a terminal: a bar and the count of tasks in each state.

It is installed as the ``progress`` entry point of ``gc3session.plugins``,
through :func:`terminal_progress`, so every session of a script run on a
terminal gets it; off a terminal (a pipe, a log file, a batch job) it stays
out of the way entirely.  The line appears only once a burst of adds or
saves has lasted ``delay`` seconds (with no pause longer than :data:`IDLE`),
is redrawn at most every ``interval`` seconds, and is finished with a
newline when the session closes.

The bar fills with the share of tasks that are TERMINATED.  Counts cover
the tasks this session has loaded, added or saved.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .persistence.store import Store
    from .session import Session

#: The state whose share fills the bar.
DONE = "TERMINATED"
#: Seconds without adds or saves that end a burst.
IDLE = 0.25


class ProgressReporter:
    """Draw a one-line progress report on ``stream`` (standard error by default): on a terminal, one line
    drawn over; on anything else (a log file), a whole line for each report."""

    def __init__(
        self, stream: TextIO | None = None, *, delay: float = 0.5, interval: float = 0.1, width: int = 20
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.interval = interval
        self.width = width
        self.states: dict[str, str] = {}  # id -> state name
        self.counts: Counter[str] = Counter()
        self.saved = 0
        self._started: float | None = None
        self._last_event = 0.0
        self._drawn_at = 0.0
        self._shown = False
        self._terminal = _is_terminal(self.stream)  # else (a log file) whole lines, one per report

    # -- hooks ------------------------------------------------------------------

    def session_opened(self, session: Session) -> None:
        pending = list(session.tasks.loaded())
        while pending:  # children too, as saving counts them
            task = pending.pop()
            self._note(task)
            children = getattr(task, "tasks", None)
            if isinstance(children, (list, tuple)):
                pending.extend(children)

    def task_added(self, session: Session, task: Any) -> None:
        self._note(task)
        self._tick()

    def task_saved(self, store: Store, obj: Any) -> None:
        self.saved += 1
        self._note(obj)
        self._tick()

    def task_removed(self, session: Session, task_id: str) -> None:
        state = self.states.pop(task_id, None)
        if state is not None:
            self.counts[state] -= 1
        self._tick()

    def session_closed(self, session: Session, error: BaseException | None) -> None:
        if self._shown:
            self._draw()
            if self._terminal:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = False
        self._started = None

    # -- drawing ----------------------------------------------------------------

    def _note(self, obj: Any) -> None:
        oid = getattr(obj, "persistent_id", None)
        state = getattr(obj, "state", None)
        if oid is None or state is None:
            return
        state = str(state)
        old = self.states.get(oid)
        if old != state:
            if old is not None:
                self.counts[old] -= 1
            self.counts[state] += 1
            self.states[oid] = state

    def _tick(self) -> None:
        now = time.monotonic()
        if self._started is None or now - self._last_event > IDLE:
            self._started = now  # a new burst
        self._last_event = now
        if now - self._started >= self.delay and now - self._drawn_at >= self.interval:
            self._draw()
            self._drawn_at = now

    def line(self) -> str:
        """The report as one line of text, without the carriage return."""
        total = len(self.states)
        done = self.counts.get(DONE, 0)
        filled = self.width * done // total if total else 0  # full only when all are done
        bar = "#" * filled + "-" * (self.width - filled)
        counts = " ".join(f"{state} {n:,}" for state, n in sorted(self.counts.items()) if n > 0)
        return f"[{bar}] {done:,}/{total:,} done | {counts} | {self.saved:,} saved"

    def _draw(self) -> None:
        if self._terminal:  # the line drawn over, cut to the terminal's width
            columns = shutil.get_terminal_size().columns
            self.stream.write("\r" + self.line()[: max(columns - 1, 10)] + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._shown = True


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def terminal_progress() -> ProgressReporter | None:
    """A reporter when standard error is a terminal (and ``TERM`` is not ``dumb``), else ``None``."""
    stream = sys.stderr
    if not _is_terminal(stream) or os.environ.get("TERM") == "dumb":
        return None
    return ProgressReporter(stream)


__all__ = ["ProgressReporter", "terminal_progress"]
