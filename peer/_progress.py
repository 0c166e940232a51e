"""Progress of slow, one-off work (first-run GGUF conversion, loading a span, the
throughput probe) for the person at the terminal.

Off by default, so that library users and tests see nothing; the CLI turns it on with
``enable()``. On a terminal it draws a tqdm bar; elsewhere (logs, pipes) it
writes plain lines: one when the work starts, one every ``PLAIN_INTERVAL`` seconds while
it runs, and one when it is done.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["enable", "disable", "task", "note", "Task"]

PLAIN_INTERVAL = 10.0
_enabled = False
_lock = threading.Lock()  # the runtime reports from worker threads


def enable() -> None:
    """Report progress on standard error from now on (a bar if it is a terminal)."""
    global _enabled
    _enabled = True


def disable() -> None:
    global _enabled
    _enabled = False


def _stream() -> TextIO | None:
    # Looked up at each use: whoever replaced sys.stderr (a test's capture) may close it.
    return sys.stderr if _enabled else None


def note(text: str) -> None:
    """One line about a step that has no count (``measuring throughput ...``)."""
    stream = _stream()
    if stream is not None:
        with _lock:
            try:
                print(f"swarm-peer: {text}", file=stream, flush=True)
            except (OSError, ValueError):  # progress never stops the work it reports on
                pass


class Task:
    """A counted piece of work; ``advance()`` after each unit."""

    def __init__(self, desc: str, total: int, stream: TextIO | None) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self._stream = stream
        self._bar = None
        self._t0 = self._last = time.monotonic()
        if stream is None:
            return
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"swarm-peer: {desc}", file=stream, leave=False, unit="block",
                             dynamic_ncols=True)
        else:
            note(f"{desc} ({total}) ...")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._stream is not None and time.monotonic() - self._last >= PLAIN_INTERVAL:
            self._last = time.monotonic()
            note(f"{self.desc}: {self.done}/{self.total}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._stream is not None:
            note(f"{self.desc}: done in {time.monotonic() - self._t0:.1f} s")


@contextmanager
def task(desc: str, total: int) -> Iterator[Task]:
    """``with task("loading blocks 0:10", 10) as t: ... t.advance()``."""
    t = Task(desc, total, _stream())
    try:
        yield t
    finally:
        t.close()
