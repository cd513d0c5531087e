"""What a new user meets on a fresh machine: crashes keep the adapter, no network gives one line,
every form of lora.target_modules that peft accepts works, and the wheel carries its configs.

Crash tests inject a raising Trainer callback into an in-process run of the tiny model; the CLI
tests run `python -m lyra.train` as a user would, from a directory outside the repo.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import REPO_ROOT, compose
from lyra.checkpointing import FAILURE_LOG, INTERRUPTED_DIR
from lyra.errors import RunFailed, UserError, exit_on_user_error

FAST = ["experiment=smoke", "logger=none", "quantization=none", "eval=none",
        "trainer.eval_strategy=no", "trainer.max_steps=4", "trainer.save_steps=2"]


class ExplodingCallback(TrainerCallback):
    """Raises in one hook, at one step (None: whatever step it is called at)."""

    def __init__(self, hook: str, step: int | None = None):
        self.hook, self.step = hook, step

    def _maybe_explode(self, hook: str, state) -> None:
        if hook == self.hook and self.step in (None, state.global_step):
            raise RuntimeError(f"boom in {hook}")

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_explode("on_step_end", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_explode("on_train_end", state)

    def on_train_begin(self, args, state, control, **kwargs):
        self._maybe_explode("on_train_begin", state)


def inject_callback(monkeypatch, callback: TrainerCallback) -> None:
    import lyra.trainer

    build_trainer = lyra.trainer.build_trainer

    def with_callback(*args, callbacks=(), **kwargs):
        return build_trainer(*args, callbacks=[*callbacks, callback], **kwargs)

    monkeypatch.setattr(lyra.trainer, "build_trainer", with_callback)


def train_expecting_one_line(config, capsys) -> str:
    """Run train() under the CLI's error handler: exactly one `lyra:` line on stderr, exit code 1."""
    from lyra.train import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        train(config)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars end in \r, not a newline
    lines = [line for line in err.splitlines() if line.startswith("lyra:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_callback_failing_after_the_last_step_leaves_the_trained_adapter(tmp_path, monkeypatch, capsys, small_corpus):
    inject_callback(monkeypatch, ExplodingCallback("on_train_end"))
    run_dir = tmp_path / "run"
    line = train_expecting_one_line(compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"]), capsys)

    assert line == (f"lyra: error: ExplodingCallback.on_train_end failed after the last step (RuntimeError: boom in "
                    f"on_train_end); adapter saved in {run_dir / 'adapter'}; rerun the same command to resume from "
                    f"checkpoint-4; traceback in {run_dir / FAILURE_LOG}")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    assert "boom in on_train_end" in (run_dir / FAILURE_LOG).read_text()

    from lyra.runs import load_run  # the adapter left behind is a usable run

    assert load_run(run_dir).adapter == "adapter"


def test_a_callback_failing_mid_training_leaves_the_adapter_as_interrupted(tmp_path, monkeypatch, capsys, small_corpus):
    inject_callback(monkeypatch, ExplodingCallback("on_step_end", step=3))
    run_dir = tmp_path / "run"
    line = train_expecting_one_line(compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"]), capsys)

    assert line.startswith("lyra: error: ExplodingCallback.on_step_end failed at step 3 (RuntimeError: boom in ")
    assert f"adapter saved in {run_dir / INTERRUPTED_DIR}; rerun the same command to resume from checkpoint-2" in line
    info = json.loads((run_dir / INTERRUPTED_DIR / "interrupted.json").read_text())
    assert info["global_step"] == 3
    assert info["reason"] == "ExplodingCallback.on_step_end: RuntimeError: boom in on_step_end"
    assert (run_dir / INTERRUPTED_DIR / "adapter_model.safetensors").is_file()
    assert not (run_dir / "adapter").exists()


def test_a_failure_before_the_first_step_saves_nothing_that_would_block_the_rerun(tmp_path, monkeypatch, small_corpus):
    from lyra.checkpointing import resolve_resume
    from lyra.train import train

    inject_callback(monkeypatch, ExplodingCallback("on_train_begin"))
    run_dir = tmp_path / "run"
    config = compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"])
    with pytest.raises(RunFailed) as error:
        train(config)
    assert str(error.value) == ("ExplodingCallback.on_train_begin failed before the first step (RuntimeError: boom in "
                                f"on_train_begin); traceback in {run_dir / FAILURE_LOG}")
    assert not (run_dir / INTERRUPTED_DIR).exists() and not (run_dir / "adapter").exists()
    assert resolve_resume("auto", False, run_dir, config.lora) is None  # the same command starts afresh


def test_the_failure_line_and_log_mask_secrets(tmp_path, monkeypatch, capsys, small_corpus):
    secret = "planted-token-value-1234"
    monkeypatch.setenv("LYRA_TEST_API_TOKEN", secret)

    class LeakingCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError(f"auth failed with {secret}")

    inject_callback(monkeypatch, LeakingCallback())
    run_dir = tmp_path / "run"
    line = train_expecting_one_line(compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"]), capsys)
    assert "RuntimeError: auth failed with ***" in line and secret not in line
    for written in (run_dir / FAILURE_LOG, run_dir / INTERRUPTED_DIR / "interrupted.json"):
        text = written.read_text()
        assert "auth failed with ***" in text and secret not in text


def test_disk_full_while_writing_metrics_keeps_the_saved_adapter(tmp_path, monkeypatch, capsys, small_corpus):
    run_dir = tmp_path / "run"
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    line = train_expecting_one_line(compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"]), capsys)

    assert line.startswith("lyra: error: full_disk failed after training (OSError: [Errno 28] No space left on device)")
    assert f"the trained adapter is saved in {run_dir / 'adapter'}" in line
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "metrics.json").exists()


def test_a_failing_wandb_finish_keeps_the_saved_adapter(tmp_path, monkeypatch, small_corpus):
    import lyra.tracking
    from lyra.train import train

    def broken_finish(run, summary, adapter_dir=None):
        raise ConnectionError("W&B service went away")

    monkeypatch.setattr(lyra.tracking, "finish_run", broken_finish)
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailed) as error:
        train(compose([*FAST, *small_corpus, f"paths.output_dir={run_dir}"]))
    assert str(error.value).startswith("broken_finish failed after training (ConnectionError: W&B service went away)")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4


# ------------------------------------------------------------------------------- target_modules

REGEX = r".*\.(q_proj|v_proj)"


@pytest.mark.parametrize("value", ["all-linear", f"'{REGEX}'", "[q_proj,o_proj]"])
def test_target_modules_takes_every_form_peft_accepts(tmp_path, value, small_corpus):
    from lyra.train import train

    metrics = train(compose([*FAST, *small_corpus, "trainer.max_steps=1", f"lora.target_modules={value}",
                             f"paths.output_dir={tmp_path / 'run'}"]))
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    expected = {"all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "[q_proj,o_proj]": {"q_proj", "o_proj"}}.get(value)
    if expected is None:  # a regex is saved as is
        assert adapter["target_modules"] == REGEX
    else:
        assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == expected  # all-linear: full paths
    assert metrics["trainable_params"] > 0


@pytest.mark.parametrize(("value", "message"), [
    ("'(q_proj'", "lora.target_modules: '(q_proj' is neither all-linear nor a valid regex "
                  "(missing ), unterminated subpattern at position 0)"),
    ("[]", "lora.target_modules: must be a non-empty list of layer names such as [q_proj,v_proj], all-linear, "
           "or a regex string; got []"),
])
def test_target_modules_forms_peft_refuses_get_one_line_before_loading(value, message):
    from lyra.config import validate

    with pytest.raises(UserError) as error:
        validate(compose(["experiment=smoke", "logger=none", f"lora.target_modules={value}"]))
    assert str(error.value) == message


def test_a_regex_matching_no_module_lists_the_layers():
    import torch

    from lyra.modeling import apply_lora, build_model

    config = compose(["experiment=smoke", "quantization=none", r"lora.target_modules='.*\.qkv'"])
    model = build_model(config.model, None, torch.float32, device="cpu")
    with pytest.raises(UserError) as error:
        apply_lora(model, config.lora)
    assert str(error.value).startswith(r"lora.target_modules: the regex '.*\\.qkv' matches no module path")
    assert "layers: ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in str(error.value)


# ---------------------------------------------------------------------------------- no network

def run_from(cwd: Path, *args: str, env: dict[str, str] | None = None, python: str = sys.executable,
             timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "lyra.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on the discard port
    {"HF_HUB_OFFLINE": "1"},
], ids=["hub-unreachable", "offline-mode"])
def test_a_base_model_that_cannot_be_fetched_is_one_line_within_15_s(tmp_path, env):
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": env["HF_HUB_OFFLINE"]}
    started = time.monotonic()
    result = run_from(tmp_path, "lora.r=16", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                      env={**env, **empty_cache})
    elapsed = time.monotonic() - started

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lyra: error: model.name_or_path: "), lines
    for remedy in ("model.name_or_path=/local/dir", "HF_HOME", "HF_HUB_OFFLINE=1", "experiment=smoke"):
        assert remedy in lines[0]
    assert elapsed <= 15, f"took {elapsed:.1f} s"


def test_apps_on_a_run_whose_base_is_missing_get_the_same_line(smoke_run, tmp_path):
    from omegaconf import OmegaConf

    from lyra.runs import RUN_CONFIG, load_run

    run_dir = tmp_path / "moved"
    run_dir.mkdir()
    cfg = OmegaConf.load(smoke_run / RUN_CONFIG)
    cfg.model.build = None
    cfg.model.name_or_path = str(tmp_path / "deleted-base")
    OmegaConf.save(cfg, run_dir / RUN_CONFIG)
    with pytest.raises(UserError) as error:
        load_run(run_dir, adapter="none")
    # runs.open_run checks a run dir from elsewhere before anything loads: the base path is named, with the fix
    assert str(error.value) == (f"run_dir: {run_dir / RUN_CONFIG}: model.name_or_path {tmp_path / 'deleted-base'} "
                                "is not a model directory here (no config.json); put the base model there or "
                                "fix the path in the run's config")


# ---------------------------------------------------------------------------- installed wheel

@pytest.mark.slow
def test_the_wheel_carries_its_configs_and_trains_the_smoke_from_elsewhere(tmp_path):
    """Build the wheel, install it (without deps) into a new venv that sees this venv's dependencies
    but not the editable checkout, and train the smoke experiment from a directory outside the repo."""
    import sysconfig
    import venv

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO_ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("lyra-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies come from this venv's site-packages via a path entry: its .pth files, and so the
    # editable finder that maps `lyra` to the checkout, are not processed from there.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    located = subprocess.run([python, "-c", "import lyra; print(lyra.__file__)"], cwd=workdir,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert located.startswith(site), located  # the installed wheel, not the checkout

    result = run_from(workdir, "experiment=smoke", "logger=none", "eval=none", "trainer.max_steps=2",
                      f"hydra.run.dir={tmp_path / 'x'}", python=python)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "x" / "adapter" / "adapter_model.safetensors").is_file()
    assert list(workdir.iterdir()) == []  # nothing written where the user stood
