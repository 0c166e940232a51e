"""Memory caps for benchmark processes: the cgroup v1 memory controller.

A ``MemoryCgroup`` is a child of this process's own memory cgroup (so the machine's
accounting above it still holds), capped with ``memory.limit_in_bytes`` (and the same
``memory.memsw.limit_in_bytes`` where swap accounting exists, so swap cannot stretch
the cap). Page cache is charged to the group that faults it in, so a process whose
files are larger than its cap really re-reads them from disk: exactly the situation
an offloading baseline is in on a machine with that much memory.

A child joins with ``preexec_fn=group.join`` (it moves itself before exec, so nothing
it allocates escapes). ``destroy`` kills whatever is still in the group and removes
it; groups left by a benchmark that was SIGKILLed are named after its pid and swept
by the next run (``sweep_stale``).

Needs root and a cgroup v1 memory hierarchy (``/sys/fs/cgroup/memory``);
``unavailable_reason`` says what is missing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["MemoryCgroup", "unavailable_reason", "describe", "PREFIX"]

ROOT = Path("/sys/fs/cgroup/memory")
PREFIX = "swarm-bench-"


def _own_group() -> Path:
    """This process's memory cgroup directory (the root if it cannot be told)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                candidate = ROOT / path.lstrip("/")
                if candidate.is_dir():
                    return candidate
    except OSError:
        pass
    return ROOT


def unavailable_reason() -> str | None:
    """None if memory cgroups can be made here, else why not."""
    if not (ROOT / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller mounted at {ROOT}"
    if os.geteuid() != 0:
        return "creating memory cgroups needs root"
    if not os.access(_own_group(), os.W_OK):
        return f"{_own_group()} is not writable"
    return None


def describe() -> str:
    """What was found: the mount, this process's group and its limit."""
    reason = unavailable_reason()
    if reason is not None:
        return f"memory cgroups unavailable: {reason}"
    own = _own_group()
    limit = int((own / "memory.limit_in_bytes").read_text())
    shown = "none" if limit >= 1 << 60 else f"{limit / 2**30:.1f} GiB"
    return (f"cgroup v1 memory controller mounted at {ROOT}; this process is in /{own.relative_to(ROOT)} "
            f"(limit {shown}); capped groups are made under it")


class MemoryCgroup:
    """A memory cgroup capped at ``limit`` bytes (module docstring). Use as a context manager."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = _own_group() / f"{PREFIX}{os.getpid()}-{name}"
        self.limit = limit

    def __enter__(self) -> MemoryCgroup:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def create(self) -> None:
        self.path.mkdir()
        try:
            # memsw (memory + swap) must stay >= the memory limit: set memory first.
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(self.limit))
        except BaseException:
            self.destroy()
            raise

    def join(self) -> None:
        """Move the calling process into the group (use as ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, name: str) -> int:
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    @property
    def max_usage(self) -> int:
        """Peak bytes charged (RSS plus page cache)."""
        return self._read("memory.max_usage_in_bytes")

    @property
    def failcnt(self) -> int:
        """How often the cap was hit (each time the kernel had to reclaim to stay under it)."""
        return self._read("memory.failcnt")

    @property
    def oom_kills(self) -> int:
        try:
            for line in (self.path / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def stat(self) -> dict[str, int]:
        """``memory.stat`` now (``rss``, ``cache``, ``mapped_file``, ... in bytes)."""
        out: dict[str, int] = {}
        try:
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if value.isdigit():
                    out[key] = int(value)
        except OSError:
            pass
        return out

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def destroy(self, timeout: float = 10.0) -> None:
        """SIGKILL whatever is still inside, then remove the group. Safe to call twice."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the killed processes are still exiting


def sweep_stale() -> list[str]:
    """Remove groups left by benchmark processes that no longer exist; their names."""
    removed = []
    try:
        entries = list(_own_group().iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.is_dir() and entry.name.startswith(PREFIX)):
            continue
        owner = entry.name[len(PREFIX):].split("-", 1)[0]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        group = MemoryCgroup.__new__(MemoryCgroup)
        group.path, group.limit = entry, 0
        try:
            group.destroy()
            removed.append(entry.name)
        except OSError:
            pass
    return removed
