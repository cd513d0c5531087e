"""lyra.threads: torch gets the cores that are free, OMP_NUM_THREADS wins, and a busy core is seen."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import lyra.threads as threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_free_cores_follow_per_core_idle_time(monkeypatch):
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [99.0, 3.0, 80.0, 10.0])
    assert threads.free_cores()[0] == 2
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0, 100.0, 100.0, 100.0])
    assert threads.free_cores()[0] == 1  # never zero threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})  # pinned: only its own cores count
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [0.0, 0.0, 95.0, 0.0])
    assert threads.free_cores()[0] == 1


def test_use_free_cores_sets_torch_threads_and_omp_num_threads_wins(monkeypatch, restore_threads, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(threads, "allowed_cores", lambda: 2)
    monkeypatch.setattr(threads, "free_cores", lambda: (1, "1 of 2 allowed cores idle"))
    with caplog.at_level("INFO", logger="lyra.threads"):
        assert threads.use_free_cores() == 1
    assert torch.get_num_threads() == 1 and "torch threads: 1 (1 of 2 allowed cores idle" in caplog.text
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert threads.use_free_cores() == 2  # the override is not second-guessed


def test_a_busy_process_takes_its_core_off_the_count():
    """A real CPU-bound neighbour pinned to one allowed core is seen as busy (Linux, 2+ cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip("needs 2 allowed cores")
    spinner = subprocess.Popen([sys.executable, "-c", f"import os, time; os.sched_setaffinity(0, {{{cores[0]}}})\n"
                                "end = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        busy_seen = [threads.free_cores(sample_seconds=0.5)[0] < len(cores) for _ in range(3)]
    finally:
        spinner.kill()
        spinner.wait()
    assert any(busy_seen)
