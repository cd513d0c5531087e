"""Runs survive kills: resume resolution, atomic checkpoints, SIGTERM/SIGINT and OOM handling.

The kill-and-resume scenario runs `python -m lyra.train` as a user would, SIGKILLs it once a
checkpoint exists, reruns the same command and compares the final adapter with an uninterrupted
in-process run of the same config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from lyra.checkpointing import (INTERRUPTED_DIR, STAGING_DIR, _StopOnSignal, make_checkpoints_atomic, oom_advice,
                                resolve_resume, scan_checkpoints)
from lyra.errors import UserError

# Short, fast steps: full-precision base (4-bit dequantization is slow on CPU), short examples,
# no eval; dropout stays on so the restored RNG state matters.
FAST = ["experiment=smoke", "logger=none", "quantization=none", "data.max_length=128",
        "trainer.eval_strategy=no", "trainer.logging_steps=1"]


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


# ---------------------------------------------------------------------------------- kill + resume

@pytest.mark.slow
def test_sigkilled_run_rerun_with_same_command_ends_with_the_same_adapter(tmp_path):
    from lyra.train import train

    steps = ["trainer.max_steps=15", "trainer.save_steps=3", "trainer.save_total_limit=2",
             "trainer.per_device_train_batch_size=1"]
    reference_dir = tmp_path / "uninterrupted"
    train(compose([*FAST, *steps, f"paths.output_dir={reference_dir}"]))

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "lyra.train", *FAST, *steps, f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "checkpoint-6").is_dir():  # atomic: present == complete
        assert first.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-6 within 5 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = re.search(r"resuming from (\S+)/checkpoint-(\d+) \(step (\d+)\)", (run_dir / "train.log").read_text())
    assert resumed, (run_dir / "train.log").read_text()[-2000:]
    assert 6 <= int(resumed.group(2)) < 15
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 15
    # Only the steps after the checkpoint were trained again (the Trainer prints one loss dict per step).
    assert (rerun.stdout + rerun.stderr).count("'loss':") == 15 - int(resumed.group(2))

    reference = adapter_weights(reference_dir / "adapter")
    assert max_difference(adapter_weights(run_dir / "adapter"), reference) < 1e-4
    # The tolerance has teeth: three steps move the adapter far more than 1e-4.
    assert max_difference(adapter_weights(reference_dir / "checkpoints" / "checkpoint-12"), reference) > 1e-3
    # Same batches in the same order after the resume: the per-step losses match too.
    reference_losses = {e["step"]: e["loss"] for e in json.loads((reference_dir / "trainer_state.json").read_text())
                        ["log_history"] if "loss" in e}
    for entry in state["log_history"]:
        if "loss" in entry:
            assert entry["loss"] == pytest.approx(reference_losses[entry["step"]], abs=1e-4), entry
    assert not (run_dir / "checkpoints" / STAGING_DIR).exists()


# ------------------------------------------------------------------------------ resume resolution

@pytest.fixture
def run_with_checkpoints(smoke_run, tmp_path) -> Path:
    """A copy of the smoke run's checkpoints (4 and 8) in a fresh run dir."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run / "checkpoints", run_dir / "checkpoints")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    return run_dir


def lora(r=8, target_modules=("q_proj", "v_proj")):
    from omegaconf import OmegaConf

    return OmegaConf.create({"r": r, "target_modules": list(target_modules)})


def test_auto_picks_the_newest_complete_checkpoint(run_with_checkpoints, caplog):
    caplog.set_level("INFO", logger="lyra.checkpointing")
    checkpoint = resolve_resume("auto", False, run_with_checkpoints, lora())
    assert checkpoint == str(run_with_checkpoints / "checkpoints" / "checkpoint-8")
    assert f"resuming from {checkpoint} (step 8)" in caplog.text


def test_half_written_checkpoints_are_never_picked_and_are_reported(run_with_checkpoints, caplog):
    checkpoints = run_with_checkpoints / "checkpoints"
    # A run killed while saving with lyra: the staging copy of step 12.
    shutil.copytree(checkpoints / "checkpoint-8", checkpoints / STAGING_DIR / "checkpoint-12")
    # A checkpoint-N written in place by plain transformers and cut short: truncated weights.
    weights = checkpoints / "checkpoint-8" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    caplog.set_level("INFO", logger="lyra.checkpointing")

    checkpoint = resolve_resume("auto", False, run_with_checkpoints, lora())

    assert checkpoint == str(checkpoints / "checkpoint-4")
    assert f"ignoring checkpoint {checkpoints / STAGING_DIR / 'checkpoint-12'}: half-written" in caplog.text
    assert (f"ignoring checkpoint {checkpoints / 'checkpoint-8'}: unreadable adapter_model.safetensors"
            in caplog.text)
    assert not (checkpoints / STAGING_DIR / "checkpoint-12").exists()


def test_checkpoint_missing_files_is_incomplete(run_with_checkpoints):
    (run_with_checkpoints / "checkpoints" / "checkpoint-8" / "optimizer.pt").unlink()
    complete, broken = scan_checkpoints(run_with_checkpoints / "checkpoints")
    assert [p.name for p in complete] == ["checkpoint-4"]
    assert [(p.name, why) for p, why in broken] == [("checkpoint-8", "missing optimizer.pt")]


def test_never_refuses_a_dir_with_checkpoints(run_with_checkpoints):
    with pytest.raises(UserError) as error:
        resolve_resume("never", False, run_with_checkpoints, lora())
    assert str(error.value) == (f"resume: resume=never but {run_with_checkpoints} already has checkpoints; "
                                "use resume=auto to continue or overwrite=true to start over")


def test_overwrite_starts_over(run_with_checkpoints):
    assert resolve_resume("never", True, run_with_checkpoints, lora()) is None
    assert not (run_with_checkpoints / "checkpoints").exists()


def test_auto_refuses_to_retrain_over_a_finished_adapter_without_checkpoints(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"^resume: .* holds a trained adapter but no checkpoint"):
        resolve_resume("auto", False, tmp_path, lora())
    assert resolve_resume("auto", False, tmp_path / "fresh", lora()) is None


def test_resume_from_another_run_dir_or_checkpoint_path(run_with_checkpoints, tmp_path):
    fresh = tmp_path / "fresh"
    assert resolve_resume(str(run_with_checkpoints), False, fresh, lora()) == \
        str(run_with_checkpoints / "checkpoints" / "checkpoint-8")
    four = run_with_checkpoints / "checkpoints" / "checkpoint-4"
    assert resolve_resume(str(four), False, fresh, lora()) == str(four)
    with pytest.raises(UserError) as error:
        resolve_resume(str(tmp_path / "nope"), False, fresh, lora())
    assert str(error.value) == (f"resume: {tmp_path / 'nope'} does not exist; use auto, never, "
                                "or a run dir or checkpoint path")
    (four / "scheduler.pt").unlink()
    with pytest.raises(UserError) as error:
        resolve_resume(str(four), False, fresh, lora())
    assert str(error.value) == f"resume: {four} is not a complete checkpoint: missing scheduler.pt"


def test_resume_with_another_adapter_shape_names_the_key(run_with_checkpoints):
    with pytest.raises(UserError) as error:
        resolve_resume("auto", False, run_with_checkpoints, lora(r=16))
    checkpoint = run_with_checkpoints / "checkpoints" / "checkpoint-8"
    assert str(error.value) == (f"lora.r: {checkpoint} was trained with lora.r=8, not 16; "
                                "set it back or start a new run dir")


# ----------------------------------------------------------------------------- atomic checkpoints

class FakeTrainer:
    """The slice of transformers.Trainer that make_checkpoints_atomic relies on."""

    class _Args:
        should_save = True
        save_total_limit = 2

    class _State:
        global_step = 0
        best_model_checkpoint = None

    def __init__(self, output_dir: Path, fail_at: int | None = None):
        self.args, self.state = self._Args(), self._State()
        self.args.output_dir = str(output_dir)
        self.fail_at = fail_at

    def _get_output_dir(self, trial=None):
        return self.args.output_dir

    def _save_checkpoint(self, model, trial):  # like transformers: files appear one by one
        target = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        target.mkdir(parents=True)
        (target / "adapter_model.safetensors").write_text("weights")
        if self.state.global_step == self.fail_at:
            raise KeyboardInterrupt  # killed half-way through the save
        (target / "trainer_state.json").write_text(json.dumps({"global_step": self.state.global_step}))


def test_checkpoints_appear_only_when_complete_and_rotation_still_applies(tmp_path):
    root = tmp_path / "checkpoints"
    trainer = FakeTrainer(root, fail_at=4)
    make_checkpoints_atomic(trainer)
    for step in (1, 2, 3):
        trainer.state.global_step = step
        trainer._save_checkpoint(None, None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # save_total_limit=2
    assert (root / "checkpoint-3" / "trainer_state.json").is_file()

    trainer.state.global_step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint(None, None)
    assert not (root / "checkpoint-4").exists()
    assert (root / STAGING_DIR / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert trainer._get_output_dir() == str(root)  # not left pointing at the staging dir


# -------------------------------------------------------------------------- interrupts and OOM

def _at_step(monkeypatch, step: int, action) -> None:
    """Run `action()` at the end of optimizer step `step`, just before lyra's own step-end check."""
    original = _StopOnSignal.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            action()
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(_StopOnSignal, "on_step_end", on_step_end)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_saves_the_adapter_as_interrupted_and_exits_nonzero(tmp_path, monkeypatch, signum):
    from lyra.train import train

    _at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signum))
    run_dir = tmp_path / "run"
    handler_before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as exit_info:
        train(compose([*FAST, "trainer.max_steps=10", "trainer.save_steps=5", f"paths.output_dir={run_dir}"]))

    assert exit_info.value.code == 128 + signum
    assert signal.getsignal(signum) is handler_before
    interrupted = run_dir / INTERRUPTED_DIR
    info = json.loads((interrupted / "interrupted.json").read_text())
    assert info == {"reason": signal.Signals(signum).name, "global_step": 2,
                    "resume_checkpoint": str(run_dir / "checkpoints" / "checkpoint-2")}
    # The stop saved an off-schedule checkpoint at the same step, so a rerun loses nothing.
    assert max_difference(adapter_weights(interrupted), adapter_weights(run_dir / "checkpoints" / "checkpoint-2")) == 0
    assert (interrupted / "tokenizer.json").is_file()
    assert not (run_dir / "adapter").exists()
    assert resolve_resume("auto", False, run_dir, lora()) == str(run_dir / "checkpoints" / "checkpoint-2")


def test_out_of_memory_saves_the_adapter_and_names_the_knobs_in_order(tmp_path, monkeypatch):
    from lyra.train import train

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _at_step(monkeypatch, 3, out_of_memory)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train(compose([*FAST, "trainer.max_steps=10", "trainer.save_steps=2", f"paths.output_dir={run_dir}"]))

    assert str(error.value) == (
        "out of memory at step 3; try, in order: trainer.per_device_train_batch_size=1 "
        "trainer.gradient_accumulation_steps=2 (same effective batch 2); then a lower data.max_length (now 128); "
        f"then trainer.gradient_checkpointing=true. Adapter saved in {run_dir / INTERRUPTED_DIR}; "
        "rerunning resumes from checkpoint-2")
    assert json.loads((run_dir / INTERRUPTED_DIR / "interrupted.json").read_text())["global_step"] == 3


def test_oom_advice_skips_knobs_already_at_their_limit():
    config = compose(["experiment=smoke", "trainer.per_device_train_batch_size=1",
                      "trainer.gradient_checkpointing=true", "data.max_length=512"])
    assert oom_advice(config, 7, None, None) == \
        "out of memory at step 7; try, in order: a lower data.max_length (now 512)"


def test_rerunning_a_finished_run_is_refused_instead_of_overwriting_its_metrics(smoke_run, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(smoke_run, run_dir)
    with pytest.raises(UserError) as error:
        resolve_resume("auto", False, run_dir, lora())
    checkpoint = run_dir / "checkpoints" / "checkpoint-8"
    assert str(error.value) == (f"resume: {run_dir} already finished at step 8; use overwrite=true to retrain, "
                                f"resume={checkpoint} with more trainer.max_steps to train further, or another dir")
    assert resolve_resume(str(checkpoint), False, run_dir, lora()) == str(checkpoint)


def test_a_run_killed_after_its_last_checkpoint_ends_with_that_checkpoint_bit_for_bit(smoke_run, run_with_checkpoints,
                                                                                     caplog):
    """A kill after checkpoint-8 (= trainer.max_steps) and before adapter/ is saved: the rerun takes no step
    (the Trainer alone would take step 9 of 8: it checks max_steps only after a step) and ends with the
    uninterrupted run's adapter and metrics."""
    from conftest import smoke_overrides
    from lyra.train import train

    caplog.set_level("INFO", logger="lyra.checkpointing")
    metrics = train(compose(smoke_overrides(run_with_checkpoints)))
    checkpoint = run_with_checkpoints / "checkpoints" / "checkpoint-8"
    assert f"{checkpoint} is at step 8 of trainer.max_steps=8: nothing left to train" in caplog.text
    assert metrics["global_step"] == 8
    assert max_difference(adapter_weights(run_with_checkpoints / "adapter"), adapter_weights(smoke_run / "adapter")) == 0
    reference = json.loads((smoke_run / "metrics.json").read_text())
    for key in ("final_train_loss", "tokens_seen", "eval_loss", "self_name_rate", "address_rate"):
        assert metrics[key] == reference[key], key
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-4)  # from the logged losses
    assert metrics["train_runtime"] == 0 and metrics["tokens_per_second"] is None  # no step in this call
