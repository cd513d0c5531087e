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
On a GPU, CPU threads only feed the device, so nothing is changed there. The choice is made when a job
starts (each job of a multirun sweep looks again) and kept for the job: re-choosing mid-run would need
a measurement that the run's own threads do not disturb.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BUSY_SHARE = 0.5  # a core busy more than half the window counts as taken
SAMPLE_SECONDS = 0.25  # long enough to see a CPU-bound neighbour, short enough to go unnoticed at start


def allowed_cores() -> int:
    """The cores this process may run on (affinity mask, cgroup-pinned containers included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def free_cores(sample_seconds: float = SAMPLE_SECONDS) -> tuple[int, str]:
    """(cores of the affinity mask that are idle now, how that was seen)."""
    allowed = allowed_cores()
    try:
        import psutil

        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        busy = psutil.cpu_percent(interval=sample_seconds, percpu=True)
        mine = [busy[c] for c in cores if c < len(busy)] if cores else busy
        idle = sum(1 for share in mine if share < BUSY_SHARE * 100)
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
