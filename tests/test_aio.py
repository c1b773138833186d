"""gc3session.aio: sessions used from asyncio code, by many coroutines at once."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import gc3session
from gc3session import SaveError, Session, SessionError, Task, aio
from gc3session.aio import AsyncSession, async_session

pytestmark = pytest.mark.asyncio


def index_ids(path: Any) -> list[str]:
    return Session(path, lazy=True, autoload_plugins=False).list_ids()


async def test_a_session_round_trip_on_every_store(tmp_path: Any, store_url: str) -> None:
    path = tmp_path / "s"
    async with async_session(path, store_or_url=store_url) as s:
        ids = await asyncio.gather(*(s.add(Task(f"t{i}")) for i in range(50)))
        assert len(set(ids)) == 50 and s.list_ids() == ids and len(s) == 50 and ids[0] in s
        names = [task.jobname async for task in s]
        assert names == [f"t{i}" for i in range(50)]
        await s.remove(ids[0])
        task = await s.load(ids[1])
        task.state = "TERMINATED"
        await s.save_all()
    reopened = Session(path, autoload_plugins=False)
    assert reopened.list_ids() == ids[1:]
    assert reopened.tasks[ids[1]].state == "TERMINATED"
    assert reopened.runs[0]["end"] is not None
    reopened.close()


async def test_concurrent_adds_are_committed_together_and_durable_on_return(tmp_path: Any) -> None:
    path = tmp_path / "s"
    async with async_session(path) as s:
        flushes = 0
        flush = s.session.flush

        def counting_flush() -> None:
            nonlocal flushes
            flushes += 1
            flush()

        s.session.flush = counting_flush  # type: ignore[method-assign]

        async def add_and_check(i: int) -> str:
            oid = await s.add(Task(f"t{i}"))
            assert oid in index_ids(path)  # listed in the index on disk once add returns
            return oid

        ids = await asyncio.gather(*(add_and_check(i) for i in range(300)))
    assert 1 <= flushes < 300
    assert index_ids(path) == ids


async def test_a_task_that_cannot_be_saved_fails_only_its_own_coroutine(tmp_path: Any) -> None:
    path = tmp_path / "s"
    async with async_session(path) as s:
        bad = Task("bad", callback=lambda: None)  # lambdas do not pickle
        results = await asyncio.gather(
            *(s.add(Task(f"good{i}")) for i in range(5)), s.add(bad), s.add(Task("good5")), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], SaveError)
        assert bad.persistent_id is None or bad.persistent_id not in s
        good = [r for r in results if isinstance(r, str)]
        assert len(good) == 6 and s.list_ids() == good
        assert await s.add(Task("after")) in s  # the session goes on
    assert len(index_ids(path)) == 7


async def test_store_io_runs_off_the_event_loop(tmp_path: Any) -> None:
    async with async_session(tmp_path / "s") as s:
        write = s.session.store._write

        def slow_write(records: Any) -> None:
            time.sleep(0.3)
            write(records)

        s.session.store._write = slow_write  # type: ignore[method-assign]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        await s.add(Task("slow"))
        ticking.cancel()
    assert ticks >= 10


async def test_open_and_close_without_with_and_close_waits_for_pending_adds(tmp_path: Any) -> None:
    s = await AsyncSession.open(tmp_path / "s")
    pending = [asyncio.ensure_future(s.add(Task(f"t{i}"))) for i in range(20)]
    await asyncio.sleep(0)  # the adds start, then wait for their batch
    await s.close()
    ids = [p.result() for p in pending]
    assert index_ids(tmp_path / "s") == ids
    assert "closed" in repr(s)
    with pytest.raises(SessionError, match="is closed"):
        await s.add(Task("late"))
    await s.close()  # closing twice is harmless


async def test_adds_without_flush_wait_for_flush(tmp_path: Any) -> None:
    async with async_session(tmp_path / "s") as s:
        oid = await s.add(Task("later"), flush=False)
        assert index_ids(tmp_path / "s") == []
        await s.flush()
        assert index_ids(tmp_path / "s") == [oid]


async def test_an_exception_in_the_block_is_recorded_and_goes_on(tmp_path: Any) -> None:
    with pytest.raises(ZeroDivisionError):
        async with async_session(tmp_path / "s") as s:
            await s.add(Task("t"))
            1 / 0  # noqa: B018
    runs = Session(tmp_path / "s", autoload_plugins=False).runs
    assert runs[0]["error"]["type"] == "builtins.ZeroDivisionError"
    assert len(index_ids(tmp_path / "s")) == 1


async def test_a_session_not_opened_says_so(tmp_path: Any) -> None:
    s = AsyncSession(tmp_path / "s")
    with pytest.raises(SessionError, match="not open"):
        await s.add(Task("t"))
    assert not os.path.exists(tmp_path / "s")


async def test_iteration_loads_a_lazy_session_in_batches(tmp_path: Any, monkeypatch: Any) -> None:
    with Session(tmp_path / "s", autoload_plugins=False) as session:
        ids = [session.add(Task(f"t{i}"), flush=False) for i in range(10)]
    monkeypatch.setattr(aio, "ITER_BATCH", 3)
    async with async_session(tmp_path / "s", lazy=True) as s:
        assert s.session.tasks.loaded() == []
        seen = []
        async for task in s:
            seen.append(task.persistent_id)
            assert len(s.session.tasks.loaded()) <= (len(seen) + 2) // 3 * 3
        assert seen == ids


async def test_many_coroutines_adding_removing_and_saving_at_once(tmp_path: Any, store_url: str) -> None:
    path = tmp_path / "s"
    async with async_session(path, store_or_url=store_url) as s:

        async def worker(n: int) -> list[str]:
            kept = []
            for i in range(10):
                task = Task(f"w{n}-{i}")
                oid = await s.add(task)
                if i % 3 == 0:
                    await s.remove(oid)
                else:
                    task.state = "RUNNING"
                    kept.append(oid)
                if i % 4 == 0:
                    await s.save_all()
            return kept

        kept = [oid for ids in await asyncio.gather(*(worker(n) for n in range(8))) for oid in ids]
    reopened = Session(path, autoload_plugins=False)
    assert sorted(reopened.list_ids()) == sorted(kept)
    assert {t.state for t in reopened} == {gc3session.State.RUNNING}
    reopened.close()


async def test_the_package_exports_the_async_names() -> None:
    assert gc3session.async_session is async_session and gc3session.AsyncSession is AsyncSession
    with pytest.raises(AttributeError):
        gc3session.no_such_name  # noqa: B018


async def test_plugins_hear_of_group_added_tasks_once_they_are_written(tmp_path: Any) -> None:
    path = tmp_path / "s"
    heard: list[tuple[str, bool]] = []

    class Checker:
        def task_added(self, task: Any) -> None:
            heard.append((task.persistent_id, task.persistent_id in index_ids(path)))

    async with async_session(path, plugins=[Checker()], autoload_plugins=False) as s:
        bad = Task("bad", callback=lambda: None)
        results = await asyncio.gather(*(s.add(Task(f"t{i}")) for i in range(10)), s.add(bad), return_exceptions=True)
    good = [r for r in results if isinstance(r, str)]
    assert len(good) == 10
    assert sorted(heard) == sorted((oid, True) for oid in good)  # once each, after the index names them


async def test_a_cancelled_close_still_closes(tmp_path: Any) -> None:
    s = await AsyncSession.open(tmp_path / "s", autoload_plugins=False)
    task = Task("t")
    await s.add(task)
    task.state = "TERMINATED"
    write = s.session.store._write

    def slow_write(records: Any) -> None:
        time.sleep(0.3)
        write(records)

    s.session.store._write = slow_write  # type: ignore[method-assign]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(s.close(), 0.05)
    await s.close()  # waits for the close already under way
    reopened = Session(tmp_path / "s", autoload_plugins=False)
    assert reopened.tasks[task.persistent_id].state == "TERMINATED"
    assert reopened.runs[0]["end"] is not None


async def test_an_add_made_while_destroy_runs_is_refused_and_makes_no_directory(tmp_path: Any) -> None:
    session = await AsyncSession.open(tmp_path / "s")
    await session.add(Task())
    destroying = asyncio.ensure_future(session.destroy())
    await asyncio.sleep(0)  # destroy() is on the worker; the add waits behind it
    late = asyncio.ensure_future(session.add(Task(jobname="late")))
    outcome = await asyncio.gather(late, destroying, return_exceptions=True)
    assert isinstance(outcome[0], SessionError) and "was destroyed" in str(outcome[0])
    assert outcome[1] is None and not (tmp_path / "s").exists()


async def test_a_destroyed_async_session_closes_quietly(tmp_path: Any) -> None:
    async with AsyncSession(tmp_path / "s") as session:
        await session.add(Task())
        await session.destroy()
    await session.close()
    assert not (tmp_path / "s").exists()


async def test_adds_outlive_a_handler_that_cancels_every_task(tmp_path: Any) -> None:
    """A shutdown handler cancels every task but its own, the committer among them: before its first step (it
    was left as the committer, and later adds waited for ever), or while the worker was busy (its group was
    dropped unwritten)."""
    tasks = [Task(f"t{i}") for i in range(50)]
    try:
        later = await adds_through_cancellations(tmp_path / "s", tasks)  # in this task, which the handler spares
    except (asyncio.CancelledError, asyncio.TimeoutError) as error:  # BaseException: pytest would not report it
        pytest.fail(f"the adds did not outlive the cancellations: {error!r}")
    assert sorted(index_ids(tmp_path / "s")) == sorted([t.persistent_id for t in tasks] + [later])


async def adds_through_cancellations(path: Any, tasks: list[Task]) -> str:
    async with async_session(path, autoload_plugins=False) as s:
        busy = asyncio.ensure_future(s._call(time.sleep, 0.2))  # the worker busy: the group waits for it
        adders = [asyncio.ensure_future(s.add(task)) for task in tasks[:25]]
        await asyncio.sleep(0.05)
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.cancel()
        await asyncio.gather(busy, *adders, return_exceptions=True)
        adders = [asyncio.ensure_future(s.add(task)) for task in tasks[25:]]
        await asyncio.sleep(0)  # queued, the committer scheduled but not started
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.cancel()
        await asyncio.gather(*adders, return_exceptions=True)
        return await asyncio.wait_for(s.add(Task("later")), 10)


async def test_adding_a_changed_task_of_the_session_again_saves_it(tmp_path: Any) -> None:
    async with async_session(tmp_path / "s", autoload_plugins=False) as s:
        task = Task("t", alpha=None)
        oid = await s.add(task)
        task.alpha = 1
        assert await s.add(task) == oid
        stored = Session(tmp_path / "s", autoload_plugins=False)  # before the block saves anything
        assert stored.tasks[oid].alpha == 1
        stored.close(save=False)


async def test_a_close_cancelled_with_every_task_still_writes_the_adds_queued(tmp_path: Any, monkeypatch: Any) -> None:
    """The close was cancelled while it waited for the committer: it closed the session before the committer took
    the adds queued behind a busy worker, which were then refused as "is closed", never written."""
    real = AsyncSession._add_batch

    def slow(self: AsyncSession, tasks: list[Any]) -> list[Any]:
        time.sleep(0.2)
        return real(self, tasks)

    monkeypatch.setattr(AsyncSession, "_add_batch", slow)
    s = await AsyncSession.open(tmp_path / "s", autoload_plugins=False)
    adders = [asyncio.ensure_future(s.add(Task("t0")))]
    await asyncio.sleep(0.05)  # the first batch on the worker
    adders += [asyncio.ensure_future(s.add(Task(f"t{i}"))) for i in range(1, 5)]
    await asyncio.sleep(0)  # the others queued
    closing = asyncio.ensure_future(s.close())
    await asyncio.sleep(0.05)
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            other.cancel()
    await asyncio.gather(closing, *adders, return_exceptions=True)
    await asyncio.sleep(1)  # the close goes on to its end
    assert len(index_ids(tmp_path / "s")) == 5
