"""Worker threads at a lower OS priority, for bulk work (prefills, FORWARD_ONCE, the
decoding, hashing and encryption of big messages).

It sits below both the transport and the peer because both have bulk work: the
transport decrypts and encrypts big messages in these threads, the peer computes,
decodes and signs big inputs and outputs in them.

Why: the scheduler decides which request a compute slot serves, but a decode step
that takes the small-step slot while a prefill computes still shares the cores with
it, and the operating system splits them evenly: a stream of long FORWARD_ONCEs from
fresh identities, each fairly scheduled, doubled an honest client's step latency on a
two-core machine (issue 10, item 4). Bulk work in threads of a higher niceness yields
the cores to the decode steps, the event loop and everything else on the machine (a
volunteer's own programs included, as BOINC does), and still takes every core nobody
else wants: the scheduler stays work-conserving. Not lower than that: a bulk thread
holds the GIL between its torch calls, and one that waits long for a core makes the
decode steps of its process wait with it (measured on the once-flood attack, honest
p50 against no attack, one run each: 2.4x at niceness 0, 1.65x at 10, 1.96x with
SCHED_IDLE; at 10 runs spread from 1.45x to 2.2x).

Linux keeps niceness per thread, and anyone may raise their own: the threads here set
theirs once when they start and are used only for bulk work. A thread waits
``IDLE_EXIT`` seconds for its next job before it ends, so a quiet process keeps none.

At most ``MAX_THREADS`` run at once (the cores, at least 2, or what a scheduler's
slots need: ``allow_bulk_threads``); further jobs wait their turn. Bulk work is all
CPU, so more threads would not finish it sooner, and each thread's malloc arena keeps
what it freed (six fresh identities, each with a whole-context FORWARD_ONCE decoding
at once, had a server run ten bulk threads and keep +100 MB; issue 10, item 4).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["BULK_NICE", "MAX_THREADS", "allow_bulk_threads", "run_bulk"]

BULK_NICE = 10  # niceness of bulk threads (at least the process's own)
IDLE_EXIT = 10.0  # seconds an idle bulk thread lives
MAX_THREADS = max(2, os.cpu_count() or 1)  # bulk threads at most

T = TypeVar("T")

_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_lock = threading.Lock()
_waiting = 0  # threads waiting for a job
_unclaimed = 0  # jobs no thread has taken yet
_threads = 0  # threads alive


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


def allow_bulk_threads(n: int) -> None:
    """Let at least ``n`` bulk jobs run at once (a scheduler with ``n - 1`` slots: on a
    GPU its jobs wait on the device, not on the cores)."""
    global MAX_THREADS
    with _lock:
        MAX_THREADS = max(MAX_THREADS, n)


def _submit(job: Callable[[], None]) -> None:
    global _unclaimed, _threads
    with _lock:  # (the queue is changed under the lock too: a thread timing out sees it)
        _jobs.put(job)
        _unclaimed += 1
        start = _unclaimed > _waiting and _threads < MAX_THREADS
        if start:
            _threads += 1
    if start:
        threading.Thread(target=_work, name="bulk compute", daemon=True).start()


def _work() -> None:
    global _waiting, _unclaimed, _threads
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(BULK_NICE, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:  # not permitted here: bulk work runs at the process's priority
        pass
    while True:
        with _lock:
            _waiting += 1
        try:
            job = _jobs.get(timeout=IDLE_EXIT)
        except queue.Empty:
            with _lock:
                _waiting -= 1
                if _jobs.empty():
                    _threads -= 1
                    return
            continue  # a job came as this thread timed out: take it
        with _lock:
            _waiting -= 1
            _unclaimed -= 1
        job()
