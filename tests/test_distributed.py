"""Data-parallel training with `accelerate launch`: 2 CPU processes (gloo) behave like 2 GPUs.

The result must be one run dir with one adapter, one metrics.json and one W&B run, written by
rank 0 only, and nothing else anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from lyra.distributed import rank_aware_argv
from lyra.errors import UserError

from conftest import REPO_ROOT

ARGV = ["lyra/train.py", "experiment=smoke", "hydra.run.dir=outputs/ddp"]


def test_single_process_argv_is_untouched():
    assert rank_aware_argv(["train.py", "-m", "lora.r=4,8"], env={}) == ["train.py", "-m", "lora.r=4,8"]


def test_ranks_share_the_explicit_run_dir_and_only_rank0_keeps_hydra_files():
    assert rank_aware_argv(ARGV, env={"WORLD_SIZE": "2", "RANK": "0"}) == ARGV
    assert rank_aware_argv(ARGV, env={"WORLD_SIZE": "2", "RANK": "1"}) == [
        *ARGV, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def test_multi_process_launch_needs_an_explicit_run_dir():
    with pytest.raises(UserError) as error:
        rank_aware_argv(["train.py", "experiment=smoke"], env={"WORLD_SIZE": "2", "RANK": "1"})
    assert error.value.key == "hydra.run.dir"
    assert "must be given when 2 processes train together" in error.value.message
    with pytest.raises(UserError, match="multirun cannot run under accelerate"):
        rank_aware_argv([*ARGV, "-m"], env={"WORLD_SIZE": "2", "RANK": "0"})


def _offline_runs(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*"))


@pytest.mark.slow
def test_two_process_cpu_run_writes_one_adapter_and_one_wandb_run(tmp_path, small_corpus):
    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", str(REPO_ROOT / "lyra/conf/accelerate/multi_gpu.yaml"),
               "--num_processes", "2", "-m", "lyra.train", "experiment=smoke", "trainer.max_steps=2",
               "trainer.eval_steps=2", "trainer.save_strategy=no", "eval=none", *small_corpus, "hydra.run.dir=ddp"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    # Both ranks' full output, not a tail: rank 1's lines can sit anywhere in the interleaved stream.
    full_log = f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    (tmp_path / "launch.log").write_text(full_log)  # tmp_path is not a run dir: checked below without it
    assert result.returncode == 0, full_log
    run_dir = tmp_path / "ddp"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(_offline_runs(run_dir / "wandb")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "home", "launch.log"]  # no stray rank dirs
    assert _offline_runs(tmp_path / "home") == []
    # rank 1 logs to stdout only: the run's log holds rank 0's lines once
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert sum("train split:" in line for line in log_lines) == 1
    assert sum("train split:" in line for line in result.stdout.splitlines() + result.stderr.splitlines()) == 2
    assert "terminate called" not in full_log


@pytest.mark.parametrize("fails", [False, True])
def test_every_way_out_of_a_job_tears_the_process_group_down(tmp_path, fails):
    """A rank that leaves with a live gloo group can abort ("terminate called without an active
    exception"): success and failure both destroy it (one-rank group, so no peer is needed)."""
    import torch.distributed as dist

    from lyra.distributed import process_group_teardown

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="rank failed") if fails else contextlib.nullcontext():
            with process_group_teardown():
                dist.barrier()
                if fails:
                    raise RuntimeError("rank failed")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
