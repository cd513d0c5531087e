"""Two trainings at once never collide: the tiny-model cache is built once, under a file lock.

Both runs start together against an empty `LYRA_CACHE`, so both race to build the model.
(Multirun jobs sharing a dir is refused by `validate_output_dir`, see test_validation.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_concurrent_smoke_runs_with_a_fresh_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "LYRA_CACHE": str(cache)}
    overrides = ["experiment=smoke", "logger=none", "quantization=none", "data.max_length=128",
                 "trainer.max_steps=1", "trainer.eval_strategy=no", "trainer.save_strategy=no"]
    runs = {name: tmp_path / name for name in ("a", "b")}
    processes = {name: subprocess.Popen([sys.executable, "-m", "lyra.train", *overrides, f"hydra.run.dir={run_dir}"],
                                        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                 for name, run_dir in runs.items()}
    outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, outputs[name][-3000:]

    logs = [(run_dir / "train.log").read_text() for run_dir in runs.values()]
    assert sum(log.count("built tiny Qwen3") for log in logs) == 1  # one built it, the other waited
    # Only the finished model and its lock: no half-written staging dir left behind.
    assert sorted(path.name for path in cache.iterdir()) == ["tiny_qwen3", "tiny_qwen3.lock"]
    for run_dir in runs.values():
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "metrics.json").is_file()
