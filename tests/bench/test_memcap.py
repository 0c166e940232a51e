"""bench/_memcap: memory cgroups cap real processes and are removed afterwards, killed
children, SIGKILLed owners and all (skipped where cgroup v1 memory or root is missing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import _memcap

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(_memcap.unavailable_reason() is not None,
                                 reason=f"memory cgroups: {_memcap.unavailable_reason()}")]


def test_a_process_over_its_cap_is_killed_and_the_group_removed() -> None:
    with _memcap.MemoryCgroup("test-over", 64 * 2**20) as group:
        proc = subprocess.run([sys.executable, "-c", "b = b'x' * (256 * 2**20)"], preexec_fn=group.join)
        assert proc.returncode == -9
        assert group.oom_kills >= 1
        ok = subprocess.run([sys.executable, "-c", "b = b'x' * (8 * 2**20)"], preexec_fn=group.join)
        assert ok.returncode == 0
        assert 0 < group.max_usage <= 64 * 2**20
    assert not group.path.exists()


def test_destroy_kills_what_is_left_and_sweep_removes_orphans() -> None:
    group = _memcap.MemoryCgroup("test-left", 256 * 2**20)
    group.create()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=group.join)
    assert group.pids() == [proc.pid]
    group.destroy()
    assert proc.wait(10) == -9
    assert not group.path.exists()
    orphan = _memcap.MemoryCgroup("test-orphan", 2**20)
    orphan.path = orphan.path.with_name(f"{_memcap.PREFIX}999999999-test-orphan")  # an owner pid that cannot exist
    orphan.create()
    assert orphan.path.name in _memcap.sweep_stale()
    assert not orphan.path.exists()
