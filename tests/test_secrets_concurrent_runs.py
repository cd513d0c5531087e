"""End to end, as a user runs it: two `python -m lyra.train` at once, one of them carrying secrets.

One fixture starts both runs together against an empty model cache (they race to build the tiny
model), so two scenarios cost one run's time:

- concurrency: the cache is built once under its file lock, and both runs finish in their own dirs;
- secrets: run "secret" has planted `WANDB_API_KEY`/`HF_TOKEN`/`*PASSWORD`/`*SECRET` values, W&B
  offline, and a config value interpolated from `${oc.env:HF_TOKEN}`; no planted value may appear
  in any byte it writes, and it may write nothing outside its run dir (HOME is a fresh dir).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lyra.secrets import MASK
from test_secrets import PLANTED

FAST = ["experiment=smoke", "quantization=none", "data.max_length=128"]


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("concurrent")
    cache, launch, home = root / "cache", root / "project", root / "home"
    launch.mkdir()
    home.mkdir()
    env = {**os.environ, "LYRA_CACHE": str(cache)}
    secret_env = {**env, **PLANTED, "HOME": str(home)}
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "XDG_CACHE_HOME",
                 "XDG_CONFIG_HOME"):
        secret_env.pop(name, None)
    runs = {
        "secret": ([*FAST, "logger=wandb", "logger.mode=offline", "trainer.max_steps=2", "trainer.save_steps=2",
                    "trainer.eval_steps=2", "+hub_token=${oc.env:HF_TOKEN}", "hydra.run.dir=outputs/secret-run"],
                   launch, secret_env, launch / "outputs" / "secret-run"),
        "plain": ([*FAST, "logger=none", "trainer.max_steps=1", "trainer.eval_strategy=no",
                   "trainer.save_strategy=no", f"hydra.run.dir={root / 'plain-run'}"],
                  root, env, root / "plain-run"),
    }
    processes = {name: subprocess.Popen([sys.executable, "-m", "lyra.train", *overrides], cwd=cwd, env=run_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (overrides, cwd, run_env, _) in runs.items()}
    outputs = {name: process.communicate(timeout=600) for name, process in processes.items()}
    return {"cache": cache, "launch": launch, "home": home,
            "runs": {name: {"dir": runs[name][3], "returncode": processes[name].returncode,
                            "stdout": outputs[name][0], "stderr": outputs[name][1]} for name in runs}}


@pytest.mark.slow
def test_two_concurrent_runs_build_the_model_cache_once(concurrent_runs):
    runs = concurrent_runs["runs"]
    for name, run in runs.items():
        assert run["returncode"] == 0, f"{name}: {run['stderr'][-3000:]}"
        assert (run["dir"] / "adapter" / "adapter_model.safetensors").is_file()
        assert (run["dir"] / "metrics.json").is_file()
    logs = [(run["dir"] / "train.log").read_text() for run in runs.values()]
    assert sum(log.count("built tiny Qwen3") for log in logs) == 1  # one built it, the other waited
    # Only the finished model, its lock and the tokenized-data cache: no half-written staging dir or file.
    cache = concurrent_runs["cache"]
    assert sorted(path.name for path in cache.iterdir()) == ["tiny_qwen3", "tiny_qwen3.lock", "tokenized"]
    assert [path.name for path in (cache / "tokenized").iterdir() if path.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_planted_secrets_never_reach_the_run_dir_and_nothing_is_written_outside_it(concurrent_runs):
    run = concurrent_runs["runs"]["secret"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    run_dir, launch, home = run["dir"], concurrent_runs["launch"], concurrent_runs["home"]

    # The interpolated value did reach the config (so masking had something to do)...
    assert OmegaConf.load(run_dir / "resolved_config.yaml").hub_token == MASK
    written = files_under(run_dir)
    assert run_dir / "train.log" in written and run_dir / "metrics.json" in written
    assert any(path.suffix == ".wandb" for path in written), "no offline W&B run was written"
    # ...and no planted value is anywhere in what the run wrote, text or binary, nor on its console.
    for path in written:
        content = path.read_bytes()
        for name, value in PLANTED.items():
            assert value.encode() not in content, f"{name} leaked into {path.relative_to(run_dir)}"
    for name, value in PLANTED.items():
        assert value not in run["stdout"] + run["stderr"], f"{name} leaked to the console"

    # Every file the run wrote is inside its run dir (the model cache is LYRA_CACHE).
    # The one exception is W&B's own per-process service log, a cache of the wandb client.
    assert [path for path in files_under(launch) if not path.is_relative_to(run_dir)] == []
    wandb_service_logs = home / ".cache" / "wandb" / "logs"
    assert [path for path in files_under(home) if not path.is_relative_to(wandb_service_logs)] == []
    for path in files_under(home):
        assert not any(value.encode() in path.read_bytes() for value in PLANTED.values()), path
