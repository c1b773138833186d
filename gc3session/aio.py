"""Sessions for asyncio programs.

An :class:`AsyncSession` runs every call into its :class:`~gc3session.Session`
on one worker thread of its own, one call at a time and in the order they
were made, so the event loop never waits for a disk or a database and many
coroutines can share one session.

Adds from many coroutines are committed as a group: ``await s.add(task)``
returns once the task is saved and listed in the index, as a plain
``add`` does, but the adds that arrive while the worker is busy are written
together, in one batch and one index append.  If a batch fails, its tasks
are retried one by one, so a task that cannot be saved fails only the
coroutine that added it.

>>> async def main(path):
...     async with async_session(path) as s:
...         await asyncio.gather(*(s.add(Task(f"fit-{i}")) for i in range(100)))
...         async for task in s:
...             print(task.jobname)
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .exceptions import SessionError
from .session import Session

T = TypeVar("T")

#: How many tasks async iteration loads per call to the worker.
ITER_BATCH = 1000


class AsyncSession:
    """A :class:`~gc3session.Session` for asyncio code; arguments are those of ``Session``.

    Open it with ``async with AsyncSession(path) as s`` or
    ``s = await AsyncSession.open(path)`` (then ``await s.close()``).  The
    underlying session is :attr:`session`; use its read-only attributes
    freely, but call its methods only through this object while the async
    session is in use.
    """

    def __init__(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._kwargs = kwargs
        self._session: Session | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: list[tuple[Any, asyncio.Future[str]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> AsyncSession:
        """Open (or create) the session at ``path`` without blocking the event loop."""
        self = cls(path, **kwargs)
        await self._open()
        return self

    async def _open(self) -> None:
        if self._session is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gc3session")
        try:
            self._session = await self._call(Session, self.path, **self._kwargs)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    @property
    def session(self) -> Session:
        """The underlying session."""
        if self._session is None:
            hint = "use 'async with AsyncSession(path)' or 'await AsyncSession.open(path)'"
            raise SessionError(self.path, f"is not open: {hint}")
        return self._session

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError(self.path, "is closed: open it again to go on")
        self.session  # noqa: B018 - raises the "not open" error

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))

    # -- adding ---------------------------------------------------------------

    async def add(self, task: Any, flush: bool = True) -> str:
        """Add ``task`` and return its id; with ``flush`` it is saved and indexed on return."""
        self._check_open()
        session = self.session
        if not flush:
            return await self._call(session.add, task, False)
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((task, done))
        self._start_committer()
        return await asyncio.shield(done)

    def _start_committer(self) -> None:
        """Start the task that writes the queued adds, unless it is running."""
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit())
            self._committer.add_done_callback(self._committer_ended)

    def _committer_ended(self, committer: asyncio.Task[None]) -> None:
        # cancelled before its first step (a shutdown handler that cancels every task), it never took the queue:
        # another one takes it, or the adds waiting would wait for ever
        if committer is self._committer:
            self._committer = None
            if self._queue and not self._closed:
                self._start_committer()

    async def _commit(self) -> None:
        """Write queued adds in batches until the queue is empty.

        A cancellation does not stop it: the batch goes on being written in
        the worker, and the adds waiting for it are told how it went.
        """
        while self._queue:
            batch, self._queue = self._queue, []
            if self._executor is None:  # destroyed meanwhile
                self._settle(batch, [SessionError(self.path, "was destroyed")] * len(batch))
                continue
            try:
                outcomes = await self._to_the_end(self._add_batch, [task for task, _ in batch])
            except BaseException as error:  # the worker could not even run the batch
                outcomes = [error] * len(batch)
            self._settle(batch, outcomes)

    async def _to_the_end(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the worker, awaited to its end: a cancellation of the awaiting task (a handler
        that cancels every task) neither stops nor drops it, since a future of the worker's is no task."""
        done = asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))
        while not done.done():
            try:
                await asyncio.wait({done})  # which, cancelled, leaves the future be
            except asyncio.CancelledError:
                continue
        return done.result()

    @staticmethod
    def _settle(batch: list[tuple[Any, asyncio.Future[str]]], outcomes: list[str | BaseException]) -> None:
        """Tell each add waiting in ``batch`` its id, or its error."""
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():
                continue
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

    def _add_batch(self, tasks: list[Any]) -> list[str | BaseException]:
        """On the worker: add and flush ``tasks`` together, or else one by one."""
        session = self.session
        added: list[tuple[str, bool]] = []
        try:
            for task in tasks:
                added.append(session._add(task, flush=False))  # plugins hear of the tasks once they are written
            for task, (oid, new) in zip(tasks, added, strict=True):
                # a task of the session added again: saved if it changed, as a plain add does
                if not new and getattr(task, "changed", True) and oid not in session._unsaved:
                    session.save(task)
            session.flush()
        except Exception:
            session.withdraw([oid for oid, new in added if new])
        else:
            for task, (_, new) in zip(tasks, added, strict=True):
                if new:
                    session.hooks.call("task_added", session=session, task=task)
            return [oid for oid, _ in added]
        outcomes: list[str | BaseException] = []
        for task in tasks:
            try:
                outcomes.append(session.add(task))
            except Exception as error:
                session.withdraw([getattr(task, "persistent_id", None)])
                outcomes.append(error)
        return outcomes

    # -- the rest of the session's methods ---------------------------------------

    async def flush(self) -> None:
        """Write what adds with ``flush=False`` and removals left pending."""
        await self._call(self.session.flush)

    async def save_all(self, flush: bool = True) -> None:
        """Save every changed task, in one batch."""
        await self._call(self.session.save_all, flush)

    async def save(self, obj: Any) -> str:
        """Save ``obj`` to the store without adding it to the session."""
        return await self._call(self.session.save, obj)

    async def load(self, id: str, add: bool = True, flush: bool = True) -> Any:  # noqa: A002
        """Load task ``id`` from the store (see :meth:`Session.load`)."""
        return await self._call(self.session.load, id, add, flush)

    async def load_many(self, ids: list[str], add: bool = True, flush: bool = True) -> dict[str, Any]:
        """Load several tasks in one batch; return ``{id: task}``."""
        return await self._call(self.session.load_many, ids, add, flush)

    async def remove(self, id: str, flush: bool = True) -> None:  # noqa: A002
        """Remove task ``id`` and its children from the session and the store."""
        await self._call(self.session.remove, id, flush)

    async def forget(self, id: str, flush: bool = True) -> None:  # noqa: A002
        """Drop task ``id`` from the session; it stays in the store."""
        await self._call(self.session.forget, id, flush)

    async def destroy(self) -> None:
        """Remove every task from the store, then the session directory."""
        await self._call(self.session.destroy)
        self._closed = True
        self._shutdown()

    def list_ids(self) -> list[str]:
        """Ids of the session's top-level tasks (from memory: no I/O)."""
        return list(self.session.tasks)

    def __len__(self) -> int:
        return len(self.session.tasks)

    def __contains__(self, id: object) -> bool:  # noqa: A002
        return id in self.session.tasks

    async def __aiter__(self) -> AsyncIterator[Any]:
        """The top-level tasks, loading those not in memory yet in batches off the event loop."""
        ids = self.list_ids()
        for start in range(0, len(ids), ITER_BATCH):
            for task in await self._call(self.session.tasks.get_many, ids[start : start + ITER_BATCH]):
                yield task

    # -- closing --------------------------------------------------------------

    async def close(self) -> None:
        """Wait for pending adds, then close the session (save, flush, record the end)."""
        await self._finish(None)

    async def _finish(self, error: BaseException | None) -> None:
        if self._session is None or (self._closing is None and self._executor is None):  # not open, or destroyed
            return
        if self._closing is None:
            self._closed = True  # adds from now on are refused; those queued are written first
            self._closing = asyncio.ensure_future(self._close_now(error))
        await asyncio.shield(self._closing)  # a cancelled close() still closes, in the background

    async def _close_now(self, error: BaseException | None) -> None:
        assert self._session is not None
        try:
            while self._queue or self._committer is not None:  # the adds queued are written first
                self._start_committer()
                committer = self._committer
                assert committer is not None
                try:
                    await asyncio.shield(committer)
                except asyncio.CancelledError:  # a close goes on to its end, the adds queued written first
                    if committer.cancelled():  # before it took the queue: another one takes it
                        self._committer = None
        finally:
            try:
                await self._to_the_end(self._session.__exit__, type(error) if error else None, error, None)
            finally:
                self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def __aenter__(self) -> AsyncSession:
        await self._open()
        return self

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        """Close as :meth:`close` does; an exception is recorded in the run record and goes on."""
        await self._finish(error)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "not open" if self._session is None else f"{len(self)} tasks"
        return f"<{type(self).__name__} {self.path!r}: {state}>"


def async_session(path: str | os.PathLike[str], **kwargs: Any) -> AsyncSession:
    """``async with async_session(path) as s:`` opens the session at ``path`` for asyncio code."""
    return AsyncSession(path, **kwargs)


__all__ = ["AsyncSession", "async_session"]
