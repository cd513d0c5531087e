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


def test_the_training_callback_counts_only_the_neighbours_cpu_time(monkeypatch, restore_threads, caplog):
    """lyra's own busy threads must not make it give its cores away; a neighbour's must."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "allowed_cores", lambda: 2)
    clock = {"now": 0.0, "busy": [0.0, 0.0], "own": 0.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    Times = __import__("collections").namedtuple("Times", "user nice system")
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu: [Times(b, 0.0, 0.0) for b in clock["busy"]])
    monkeypatch.setattr(psutil.Process, "cpu_times", lambda self: Times(clock["own"], 0.0, 0.0))
    callback = threads.free_cores_callback()
    torch.set_num_threads(2)
    state = type("State", (), {"global_step": 0})()

    def advance(seconds: float, own_cores: float, neighbour_cores: float) -> None:
        clock["now"] += seconds
        clock["own"] += own_cores * seconds
        per_core = (own_cores + neighbour_cores) * seconds / 2
        clock["busy"] = [b + per_core for b in clock["busy"]]
        state.global_step += 1
        callback.on_step_end(None, state, None)

    advance(threads.RECHOOSE_EVERY_S, own_cores=2.0, neighbour_cores=0.0)  # lyra alone, both cores busy
    assert torch.get_num_threads() == 2 and callback.changes == []
    advance(threads.RECHOOSE_EVERY_S / 2, own_cores=1.0, neighbour_cores=1.0)  # too soon to look
    assert callback.changes == []
    with caplog.at_level("INFO", logger="lyra.threads"):
        advance(threads.RECHOOSE_EVERY_S / 2, own_cores=1.0, neighbour_cores=1.0)  # a neighbour took a core
    assert torch.get_num_threads() == 1 and callback.changes == [(3, 2, 1)] and "torch threads: 2 -> 1" in caplog.text
    advance(threads.RECHOOSE_EVERY_S, own_cores=1.0, neighbour_cores=0.0)  # it left
    assert torch.get_num_threads() == 2 and callback.changes[-1] == (4, 1, 2)


def test_no_training_callback_when_omp_num_threads_pins_the_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.free_cores_callback() is None
