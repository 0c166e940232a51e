"""Worker threads at a lower OS priority, for bulk work (prefills, FORWARD_ONCE, the
decoding of big inputs).

Why: the scheduler decides which request a compute slot serves, but a decode step
that takes the small-step slot while a prefill computes still shares the cores with
it, and the operating system splits them evenly: a stream of long FORWARD_ONCEs from
fresh identities, each fairly scheduled, doubled an honest client's step latency on a
two-core machine (issue 10, item 4). Bulk work in threads of a higher niceness yields
the cores to the decode steps, the event loop and everything else on the machine (a
volunteer's own programs included, as BOINC does), and still takes every core nobody
else wants: the scheduler stays work-conserving.

Linux keeps niceness per thread, and anyone may raise their own: the threads here set
theirs once when they start and are used only for bulk work. A thread waits
``IDLE_EXIT`` seconds for its next job before it ends, so a quiet process keeps none.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["BULK_NICE", "run_bulk"]

BULK_NICE = 10  # niceness of bulk threads (at least the process's own)
IDLE_EXIT = 10.0  # seconds an idle bulk thread lives

T = TypeVar("T")

_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_lock = threading.Lock()
_idle = 0  # threads waiting for a job


async def run_bulk(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a bulk thread. Like ``trio.to_thread.run_sync`` without
    abandoning: once started it runs to the end, and a cancellation is delivered after."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    def job() -> None:
        result.append(outcome.capture(fn, *args))
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:  # the waiter's run ended meanwhile
            pass

    _submit(job)
    with trio.CancelScope(shield=True):
        await done.wait()
    await trio.lowlevel.checkpoint_if_cancelled()
    return result[0].unwrap()


def _submit(job: Callable[[], None]) -> None:
    global _idle
    with _lock:
        start = _idle == 0
        if not start:
            _idle -= 1  # that thread takes this job
    _jobs.put(job)
    if start:
        threading.Thread(target=_work, name="bulk compute", daemon=True).start()


def _work() -> None:
    global _idle
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(BULK_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:  # not permitted here: bulk work runs at the process's priority
        pass
    while True:
        try:
            job = _jobs.get(timeout=IDLE_EXIT)
        except queue.Empty:
            with _lock:
                if _idle > 0 and _jobs.empty():
                    _idle -= 1
                    return
            continue  # a job was handed to this thread as it timed out: take it
        job()
        with _lock:
            _idle += 1
