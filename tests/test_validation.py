"""Bad settings are refused before any model loads: one line naming the key and the allowed range.

Most cases run `validate(compose([...]))` in-process and assert the exact message; two subprocess
checks pin the CLI shape (exactly one stderr line `lyra: error: ...`, exit code 2, no traceback).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from lyra.config import validate, validate_max_length, validate_output_dir
from lyra.errors import UserError

SMOKE = ["experiment=smoke", "logger=none"]


def refusal(overrides: list[str]) -> str:
    with pytest.raises(UserError) as error:
        validate(compose([*SMOKE, *overrides]))
    return f"lyra: error: {error.value}"


@pytest.fixture(scope="module")
def smoke_config():
    return compose(SMOKE)


@pytest.mark.parametrize(("key", "value", "line"), [
    ("lora.r", 0, "lora.r: must be an integer > 0, got 0"),
    ("lora.r", -4, "lora.r: must be an integer > 0, got -4"),
    ("lora.r", 8.5, "lora.r: must be an integer > 0, got 8.5"),
    ("lora.lora_alpha", 0, "lora.lora_alpha: must be > 0, got 0"),
    ("lora.lora_alpha", -16, "lora.lora_alpha: must be > 0, got -16"),
    ("lora.lora_dropout", 1.0, "lora.lora_dropout: must be in [0, 1), got 1.0"),
    ("lora.lora_dropout", -0.1, "lora.lora_dropout: must be in [0, 1), got -0.1"),
    ("trainer.learning_rate", 0, "trainer.learning_rate: must be > 0, got 0"),
    ("trainer.learning_rate", -1e-4, "trainer.learning_rate: must be > 0, got -0.0001"),
    ("trainer.per_device_train_batch_size", 0, "trainer.per_device_train_batch_size: must be an integer >= 1, got 0"),
    ("trainer.per_device_eval_batch_size", 0, "trainer.per_device_eval_batch_size: must be an integer >= 1, got 0"),
    ("trainer.gradient_accumulation_steps", 0, "trainer.gradient_accumulation_steps: must be an integer >= 1, got 0"),
    ("data.max_length", 8, "data.max_length: must be an integer >= 32, got 8"),
    ("resume", "", "resume: must be auto, never, or the path of a run dir or checkpoint, got ''"),
    ("resume", None, "resume: must be auto, never, or the path of a run dir or checkpoint, got None"),
    ("overwrite", "maybe", "overwrite: must be true or false, got 'maybe'"),
    ("model.trust_remote_code", "yes", "model.trust_remote_code: must be true or false, got 'yes'"),
    ("model.lean_activations", "on", "model.lean_activations: must be true or false, got 'on'"),
    ("model.onednn_linears", "yes", "model.onednn_linears: must be true or false, got 'yes'"),
    ("model.fused_lora", "yes", "model.fused_lora: must be true or false, got 'yes'"),
])
def test_out_of_range_values_name_the_key_and_range(smoke_config, key, value, line):
    config = smoke_config.copy()
    OmegaConf.update(config, key, value)
    with pytest.raises(UserError) as error:
        validate(config)
    assert f"lyra: error: {error.value}" == f"lyra: error: {line}"


def test_override_strings_parse_to_the_same_refusals():
    assert refusal(["lora.lora_dropout=1"]) == "lyra: error: lora.lora_dropout: must be in [0, 1), got 1"
    assert refusal(["overwrite=maybe"]) == "lyra: error: overwrite: must be true or false, got 'maybe'"


def test_a_valid_config_passes(smoke_config):
    validate(smoke_config)


def test_max_length_must_hold_the_system_prompt_plus_one_turn(tokenizer):
    prompt = "你是萊拉（Lyra），一位溫柔的女僕助理。"
    with pytest.raises(UserError) as error:
        validate_max_length(40, prompt, tokenizer)
    match = re.fullmatch(r"data\.max_length: 40 cannot hold the system prompt plus one turn; use at least (\d+)",
                         str(error.value))
    assert match, str(error.value)
    needed = int(match.group(1))
    validate_max_length(needed, prompt, tokenizer)  # the advice is exactly enough
    with pytest.raises(UserError):
        validate_max_length(needed - 1, prompt, tokenizer)
    with pytest.raises(UserError):  # a longer system prompt needs more room
        validate_max_length(needed, prompt * 3, tokenizer)


def test_missing_empty_and_blank_data_files(tmp_path):
    missing = tmp_path / "missing.jsonl"
    assert refusal(["data=jsonl", f"data.train_file={missing}"]) == \
        f"lyra: error: data.train_file: file not found: {missing}"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert refusal(["data=jsonl", f"data.train_file={empty}"]) == f"lyra: error: data.train_file: file is empty: {empty}"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    train = tmp_path / "train.jsonl"
    train.write_text('{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}\n')
    assert refusal(["data=jsonl", f"data.train_file={train}", f"data.eval_file={blank}"]) == \
        f"lyra: error: data.eval_file: file is empty: {blank}"
    assert refusal(["data=jsonl"]) == \
        "lyra: error: data.train_file: is required with data=jsonl (e.g. data.train_file=my_chats.jsonl)"


def test_an_eval_split_that_ends_up_empty_is_refused(tmp_path, tokenizer):
    """Every eval conversation is longer than data.max_length: no eval example survives."""
    from lyra.data import build_datasets

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"conversations": [{"from": "user", "value": "嗨"}, {"from": "assistant", "value": "主人好"}]}\n')
    evaluation.write_text('{"conversations": [{"from": "user", "value": "嗨"}, '
                          '{"from": "assistant", "value": "' + "很長的回答。" * 200 + '"}]}\n')
    config = compose([*SMOKE, "data=jsonl", f"data.train_file={train}", f"data.eval_file={evaluation}",
                      "data.max_length=256"])
    validate(config)
    with pytest.raises(UserError) as error:
        build_datasets(config.data, tokenizer)
    assert str(error.value) == f"data.max_length: no example of {evaluation} fits in 256 tokens; raise it"


def test_4bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args))
    assert refusal(["quantization=nf4"]) == (
        "lyra: error: quantization: 4-bit needs bitsandbytes>=0.47 (bitsandbytes is not installed); "
        "`pip install -U bitsandbytes` or use quantization=none")
    validate(compose([*SMOKE, "quantization=none"]))  # the named fix works


def test_4bit_with_a_broken_bitsandbytes_names_the_fix(monkeypatch):
    import importlib.machinery
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: importlib.machinery.ModuleSpec(name, None)
                        if name == "bitsandbytes" else find_spec(name, *args))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # installed, but importing it fails
    assert refusal(["quantization=nf4"]) == (
        "lyra: error: quantization: 4-bit needs bitsandbytes>=0.47 (bitsandbytes cannot load (ModuleNotFoundError: "
        "import of bitsandbytes halted; None in sys.modules)); `pip install -U bitsandbytes` or use quantization=none")


def test_target_modules_matching_nothing_list_the_existing_names():
    import torch

    from lyra.modeling import apply_lora, build_model

    config = compose([*SMOKE, "quantization=none", "lora.target_modules=[q_proj,qkv_proj]"])
    model = build_model(config.model, None, torch.float32, device="cpu")
    with pytest.raises(UserError) as error:
        apply_lora(model, config.lora)
    assert str(error.value) == ("lora.target_modules: ['qkv_proj'] match no module in the model; available: "
                                "['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']")


# ------------------------------------------------------------------------------------ output dirs

def hydra_node(cwd: Path, output_dir: Path, overrides=(), mode: str = "RUN"):
    from hydra.types import RunMode

    node = OmegaConf.create({"runtime": {"cwd": str(cwd), "output_dir": str(output_dir)},
                             "overrides": {"hydra": [], "task": list(overrides)}})
    node.mode = RunMode[mode]
    return node


def test_output_dir_inside_the_project_outputs_is_fine(tmp_path):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    validate_output_dir(run_dir, hydra_node(tmp_path, run_dir))
    job_dir = tmp_path / "multirun" / "2026-01-01" / "10-00-00" / "3"
    validate_output_dir(job_dir, hydra_node(tmp_path, job_dir, mode="MULTIRUN"))


def test_output_dir_outside_outputs_needs_an_explicit_override(tmp_path):
    elsewhere = tmp_path.parent / "elsewhere"
    with pytest.raises(UserError) as error:  # e.g. hydra.run.dir set in an experiment preset
        validate_output_dir(elsewhere, hydra_node(tmp_path, elsewhere))
    assert str(error.value) == (
        f"paths.output_dir: {elsewhere} is outside the project's outputs ({tmp_path / 'outputs'}, "
        f"{tmp_path / 'multirun'}); pass hydra.run.dir= or paths.output_dir= on the command line to write there "
        "on purpose")
    validate_output_dir(elsewhere, hydra_node(tmp_path, elsewhere, overrides=[f"hydra.run.dir={elsewhere}"]))
    validate_output_dir(elsewhere, hydra_node(tmp_path, tmp_path / "outputs" / "x",
                                              overrides=[f"paths.output_dir={elsewhere}"]))


def test_multirun_jobs_never_share_an_output_dir(tmp_path):
    shared = tmp_path / "outputs" / "shared"
    job_dir = tmp_path / "multirun" / "day" / "time" / "1"
    with pytest.raises(UserError) as error:
        validate_output_dir(shared, hydra_node(tmp_path, job_dir, overrides=[f"paths.output_dir={shared}"],
                                               mode="MULTIRUN"))
    assert str(error.value) == (f"paths.output_dir: {shared} is shared by every job of this multirun; leave "
                                "paths.output_dir alone and set hydra.sweep.dir= instead")


# ---------------------------------------------------------------------------------- the CLI shape

def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lyra.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2_before_any_model_loads(tmp_path):
    # The default model is the hub's Qwen3-0.6B: offline, touching it would crash with a traceback.
    result = run_cli(tmp_path, "logger=none", "lora.r=0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["lyra: error: lora.r: must be an integer > 0, got 0"]
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- Hydra's own errors, in lyra's voice

@pytest.mark.parametrize("override, expected", [
    ("lora.use_dora=true", "lyra: error: lora.use_dora: not set by the config files, but a peft.LoraConfig option: "
                           "add it with +lora.use_dora=true"),
    ("trainer.neftune_noise_alpha=5", "but a transformers.TrainingArguments option: add it with "
                                      "+trainer.neftune_noise_alpha=5"),
    ("lora.rr=3", "lyra: error: lora.rr: no such key; did you mean lora.r?"),
    ("trainer.learning_rat=1e-4", "did you mean trainer.learning_rate?"),
    ("eval=nope", "lyra: error: eval=nope: no such option; options: none, probes, smoke"),
])
def test_hydra_composition_errors_are_one_lyra_line(override, expected, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lyra.train", "experiment=smoke", override],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_kwarg_that_fails_inside_peft_names_its_key(tmp_path):
    """+lora.init_lora_weights=pissa is a real LoraConfig kwarg that peft refuses on a 4-bit base."""
    result = subprocess.run([sys.executable, "-m", "lyra.train", "experiment=smoke", "logger=none",
                             "+lora.init_lora_weights=pissa", f"hydra.run.dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "lyra: error: lora.init_lora_weights: peft cannot build this adapter" in result.stderr.splitlines()[-1]


def test_an_experiment_with_eval_none_validates_and_says_what_it_ignores(caplog):
    """experiment=cpu_real sets eval.num_probes; eval=none turns probes off: no traceback, one warning."""
    from lyra.probes import PersonaProbeCallback, validate_probes

    cfg = compose(["experiment=cpu_real", "eval=none"])
    with caplog.at_level(logging.WARNING, logger="lyra.probes"):
        validate_probes(cfg.get("eval"), cfg.persona)
    assert "eval=none: probes are off, so eval.num_probes, eval.probes_every from the experiment are ignored" in caplog.text
    assert not PersonaProbeCallback(cfg.get("eval"), cfg.persona, cfg.data.system_prompt).enabled
