"""Data-parallel training on several GPUs of one node with `accelerate launch` (or torchrun).

    accelerate launch --config_file lyra/conf/accelerate/multi_gpu.yaml --num_processes 4 \
        -m lyra.train hydra.run.dir=outputs/ddp-r16 lora.r=16

Every rank runs Hydra, so every rank would pick its own `${now:...}` run dir: the run dir must be
given explicitly, and `rank_aware_argv` refuses to start without it. Rank 0 owns the run dir's
Hydra files and log; other ranks get `hydra.output_subdir=null` and log to stdout only, so they
write nothing but what the Trainer itself shares (checkpoints are saved by rank 0 too). Each rank
loads its 4-bit base on its own device (`lyra.modeling.training_device` reads LOCAL_RANK) and only
rank 0 writes the adapter, metrics.json and the W&B run (`lyra.train`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from lyra.errors import UserError

MULTIRUN_FLAGS = ("-m", "--multirun")


def world_size(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("RANK", env.get("LOCAL_RANK", "0")))


def rank_aware_argv(argv: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """The command line Hydra should see on this rank (unchanged outside multi-process launches)."""
    if world_size(env) <= 1:
        return list(argv)
    args = argv[1:]
    if any(arg in MULTIRUN_FLAGS for arg in args):
        raise UserError("hydra.mode", "a multirun cannot run under accelerate/torchrun; launch one "
                        "`accelerate launch` per job, or sweep with hydra/launcher=submitit_slurm")
    if not any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in args):
        raise UserError("hydra.run.dir", f"must be given when {world_size(env)} processes train together, so "
                        "every rank uses the same run dir (e.g. hydra.run.dir=outputs/ddp-run)")
    if rank(env) == 0:
        return list(argv)
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def finish_process_group() -> None:
    """Wait for rank 0's writes, then tear the process group down on every rank.

    A rank that exits with a live gloo/NCCL group aborts ("terminate called without an active
    exception"), which fails the whole launch while rank 0 is still saving.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_process_group() -> None:
    """Tear the group down without waiting for the other ranks: this rank is failing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # the original error is what the user must see
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group_teardown() -> Iterator[None]:
    """Every way out of a training job tears the process group down on this rank.

    Done: `finish_process_group` (barrier, then destroy). Failing: destroy at once, so this rank
    exits with its own error instead of gloo's abort; the other ranks see a closed peer. A no-op in
    a single-process run.
    """
    try:
        yield
    except BaseException:
        abort_process_group()
        raise
    finish_process_group()
