"""swarm.bulk: bulk work runs in threads of lower OS priority (decode steps beside it
get the cores first), concurrently, to the end even when cancelled, and its threads
end when idle; the scheduler sends big tickets there and small ones not."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from swarm import bulk as _bulk
from swarm.bulk import BULK_NICE, run_bulk
from peer.scheduler import Scheduler


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_bulk_threads_are_niced_and_small_tickets_are_not():
    base = niceness()
    assert await run_bulk(niceness) == max(BULK_NICE, base)
    scheduler = Scheduler(1)
    assert await scheduler.run("a", niceness, work=512) == max(BULK_NICE, base)
    assert await scheduler.run("a", niceness, work=1, small=True) == base
    assert niceness() == base  # the event loop's thread is left alone


async def test_bulk_jobs_run_concurrently_and_errors_reach_the_caller():
    barrier = threading.Barrier(2, timeout=10)  # broken if the two ran one after the other
    results = []

    async def one() -> None:
        results.append(await run_bulk(barrier.wait))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert sorted(results) == [0, 1]
    with pytest.raises(ZeroDivisionError):
        await run_bulk(lambda: 1 / 0)


async def test_a_cancelled_bulk_job_runs_to_the_end_before_the_cancellation():
    started, release = threading.Event(), threading.Event()
    finished = []

    def job() -> str:
        started.set()
        release.wait(10)
        finished.append(True)
        return "done"

    got = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                got.append(await run_bulk(job))

            nursery.start_soon(run)
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not finished  # still waiting on the job, not abandoned
            release.set()
    assert finished == [True]
    assert scope.cancelled_caught
    assert got == []


async def test_idle_bulk_threads_end(monkeypatch):
    monkeypatch.setattr(_bulk, "IDLE_EXIT", 0.05)
    await run_bulk(niceness)

    def bulk_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "bulk compute"]

    assert bulk_threads()
    for thread in bulk_threads():  # those of earlier tests wait up to the unpatched 10 s
        await trio.to_thread.run_sync(thread.join, 15)
    assert not bulk_threads()
    assert await run_bulk(lambda: 7) == 7  # a new one starts for the next job


async def test_at_most_max_threads_jobs_run_and_the_rest_wait_their_turn(monkeypatch):
    monkeypatch.setattr(_bulk, "MAX_THREADS", 2)
    lock, release, two = threading.Lock(), threading.Event(), threading.Event()
    running, most, ran = 0, 0, []

    def job(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            if running == 2:
                two.set()
        release.wait(10)
        with lock:
            running -= 1
        ran.append(i)
        return i

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(run_bulk, job, i)
        assert await trio.to_thread.run_sync(two.wait, 10)
        assert not ran  # three wait in the queue, no third thread took one
        release.set()
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert most == 2
