"""End-to-end smoke training on the tiny 4-bit Qwen3: artifacts, what changed, determinism, CLI, W&B."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO_ROOT, compose, smoke_overrides


def _losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory):
    """A smoke run whose model is captured right after LoRA is applied, with a snapshot of its weights."""
    import lyra.train as train_module

    captured = {}
    original_apply_lora = train_module.apply_lora

    def spy(model, lora_cfg, **kwargs):
        peft_model = original_apply_lora(model, lora_cfg, **kwargs)
        captured["model"] = peft_model
        captured["before"] = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
        return peft_model

    run_dir = tmp_path_factory.mktemp("spied-run")
    train_module.apply_lora = spy
    try:
        metrics = train_module.train(compose(smoke_overrides(run_dir)))
    finally:
        train_module.apply_lora = original_apply_lora
    return run_dir, metrics, captured


def test_lora_weights_change_and_base_weights_do_not(spied_run):
    _, _, captured = spied_run
    after = dict(captured["model"].named_parameters())
    lora_names = [name for name in after if "lora_" in name]
    base_names = [name for name in after if "lora_" not in name]
    assert lora_names and base_names
    assert all(after[name].requires_grad for name in lora_names)
    assert not any(after[name].requires_grad for name in base_names)
    changed = [name for name in lora_names if not torch.equal(after[name], captured["before"][name])]
    assert len(changed) == len(lora_names), f"unchanged LoRA tensors: {set(lora_names) - set(changed)}"
    for name in base_names:  # includes the packed 4-bit weights
        assert torch.equal(after[name], captured["before"][name]), f"base weight {name} changed"
    assert any("Linear4bit" in type(m).__name__ for m in captured["model"].modules())


def test_run_dir_holds_adapter_tokenizer_config_and_metrics(spied_run):
    run_dir, metrics, _ = spied_run
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(tensor.abs().sum() > 0 for key, tensor in adapter.items() if "lora_B" in key)  # B starts at zero
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    assert (run_dir / "adapter" / "chat_template.jinja").is_file()
    saved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    assert saved["quantization"]["load_in_4bit"] is True and saved["lora"]["r"] == 8
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("train_loss", "eval_loss", "train_runtime", "trainable_params", "total_params",
                "peak_memory_bytes", "tokens_seen"):
        assert math.isfinite(on_disk[key]) and on_disk[key] > 0, key
    assert on_disk["trainable_params"] < on_disk["total_params"]
    assert on_disk["global_step"] == 8


def test_same_seed_same_curve_other_seed_other_curve(spied_run, smoke_run, tmp_path):
    from lyra.train import train

    run_dir, _, _ = spied_run
    first, second = _losses(run_dir), _losses(smoke_run)
    assert len(first) == 8 and all(math.isfinite(loss) for loss in first)
    assert first == second  # bitwise identical on CPU
    train(compose(smoke_overrides(tmp_path, "trainer.seed=7", "trainer.data_seed=7")))
    assert _losses(tmp_path) != first


def test_cli_from_another_directory_with_offline_wandb(tmp_path):
    """`python -m lyra.train experiment=smoke` as a user runs it, launched outside the repo."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "lyra.train", "experiment=smoke", f"hydra.run.dir={run_dir}"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(elsewhere.iterdir()) == []  # nothing written in the launch directory
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "metrics.json").is_file()
    hydra_config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_config["quantization"]["load_in_4bit"] is True
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    inspected = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(run_files[0])],
                               capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["config"]["lora"]["r"] == 8
    assert record["config"]["quantization"]["load_in_4bit"] is True
    assert record["summary"]["train_loss"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["train_loss"])
    assert "wandb sync" in result.stderr + result.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lyra.train", "experiment=smoke", "logger=none", "lora.r=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "lyra: error: lora.r: must be an integer > 0, got 0"
    assert "Traceback" not in result.stderr
