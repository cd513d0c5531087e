"""How many CPU threads torch uses: the cores that are actually free, not the cores that exist.

    from lyra.threads import use_free_cores
    use_free_cores()          # at the start of each job, before the first matmul: logs "torch threads: 1 (...)"

On a desktop people train while doing other things. torch starts one thread per core, and its
threads wait for each other at every parallel region: with one busy process beside a 2-thread step on
2 cores, one thread shares a core and the other spins at the barrier, and a `cpu_real` step took 6.8x
as long as idle, against 1.6x with one thread (measured for issue 24; scripts/bench_contention.py
measures it on any machine). So on CPU lyra counts the cores of its affinity mask that are idle now
(per-core idle time over a short window, psutil) and gives torch that many threads, at least one.

Reproducibility: CPU float results depend on the thread count (the order of a sum), so two runs with
the same seed are bit-identical only with the same count; pin it with `OMP_NUM_THREADS` for that.
`OMP_NUM_THREADS` always wins: it is the override, and torchrun/accelerate set it for multi-process runs.
On a GPU, CPU threads only feed the device, so nothing is changed there.

The choice is made when a job starts (each job of a multirun sweep looks again) and, during training,
again every `RECHOOSE_EVERY_S` seconds (`FreeCoresCallback`): a neighbour that starts mid-run costs
2.6x per step with two threads against 1.6x with one (docs/bench/contention.json), so it pays to
follow it. During training lyra's own threads keep the cores busy, so the per-core idle time cannot
tell a neighbour from lyra: the callback counts the neighbours' CPU time instead, the cores' busy
time since its last look minus this process's own, a difference of two counters that costs no wait.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BUSY_SHARE = 0.5  # a core busy more than half the window counts as taken
RECHOOSE_EVERY_S = 30.0  # training: how often the neighbours are counted again; shorter follows faster, each change
# of thread count costs a step of torch re-forming its thread pool
SAMPLE_SECONDS = 0.25  # long enough to see a CPU-bound neighbour, short enough to go unnoticed at start


def allowed_cores() -> int:
    """The cores this process may run on (affinity mask, cgroup-pinned containers included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def on_allowed_cores(per_core: list):
    """The entries of a per-core list (psutil's percpu figures) for the cores of this process's affinity mask."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return [per_core[c] for c in cores if c < len(per_core)] if cores else per_core


def free_cores(sample_seconds: float = SAMPLE_SECONDS) -> tuple[int, str]:
    """(cores of the affinity mask that are idle now, how that was seen)."""
    allowed = allowed_cores()
    try:
        import psutil

        busy = on_allowed_cores(psutil.cpu_percent(interval=sample_seconds, percpu=True))
        idle = sum(1 for share in busy if share < BUSY_SHARE * 100)
        return max(1, idle), f"{idle} of {allowed} allowed cores idle over {sample_seconds:g} s"
    except Exception as error:  # psutil missing or no per-core counters: fall back to the load average
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        idle = max(1, round(allowed - load))
        return idle, f"{allowed} allowed cores, load average {load:.1f} ({type(error).__name__})"


def use_free_cores() -> int:
    """Set torch's intra-op threads to the free cores on CPU; returns the count torch now uses."""
    import torch

    if torch.cuda.is_available():
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        log.info("torch threads: %d (OMP_NUM_THREADS=%s)", torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
        return torch.get_num_threads()
    count, seen = free_cores()
    torch.set_num_threads(min(count, allowed_cores()))
    log.info("torch threads: %d (%s; OMP_NUM_THREADS=N overrides)", torch.get_num_threads(), seen)
    return torch.get_num_threads()


class NeighbourMeter:
    """Cores busy with other processes since the last `read()`: the allowed cores' busy time minus this
    process's own CPU time, over the wall time between two reads (counters only, no sampling wait)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._last = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        import time

        mine = on_allowed_cores(self._psutil.cpu_times(percpu=True))
        busy = sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                   + getattr(t, "steal", 0.0) for t in mine)
        own = self._process.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def seconds_since_read(self) -> float:
        import time

        return time.monotonic() - self._last[0]

    def read(self) -> tuple[float, float]:
        """(cores the neighbours kept busy on average, seconds measured) since the previous read."""
        now = self._snapshot()
        (then, busy_then, own_then), self._last = self._last, now
        elapsed = now[0] - then
        if elapsed <= 0:
            return 0.0, 0.0
        return max(0.0, (now[1] - busy_then) - (now[2] - own_then)) / elapsed, elapsed


def threads_beside(neighbour_cores: float, allowed: int) -> int:
    """Torch threads that leave the neighbours their cores: at least one."""
    return max(1, min(allowed, allowed - round(neighbour_cores)))


def free_cores_callback():
    """A transformers TrainerCallback that re-chooses torch's thread count during training, or None
    where lyra does not choose (GPU, OMP_NUM_THREADS set, no psutil)."""
    import torch
    from transformers import TrainerCallback

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        meter = NeighbourMeter()
    except Exception as error:  # psutil missing or no per-core counters
        log.info("torch threads stay as chosen at start (no per-core counters: %s)", type(error).__name__)
        return None

    class FreeCoresCallback(TrainerCallback):
        def __init__(self) -> None:
            self.changes: list[tuple[int, int, int]] = []  # (step, from, to)

        def on_step_end(self, args, state, control, **kwargs):
            if meter.seconds_since_read() < RECHOOSE_EVERY_S:
                return
            neighbours, seconds = meter.read()
            wanted, now = threads_beside(neighbours, allowed_cores()), torch.get_num_threads()
            if wanted != now:
                torch.set_num_threads(wanted)
                self.changes.append((state.global_step, now, wanted))
                log.info("torch threads: %d -> %d at step %d (other processes kept %.1f cores busy over the last "
                         "%.0f s; OMP_NUM_THREADS=N pins it)", now, wanted, state.global_step, neighbours, seconds)

    return FreeCoresCallback()
