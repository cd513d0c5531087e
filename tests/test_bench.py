"""scripts/bench_train.py: a seconds-long smoke run of the in-process variants (seed baseline, stock
transformers, TRL, lyra; in-process to skip interpreter start-ups), the report's keys, the
objective-parity flag that keeps peers honest, and the child command line round trip."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_train", REPO_ROOT / "scripts" / "bench_train.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

HAS_TRL = importlib.util.find_spec("trl") is not None
PEERS = "baseline,hf,trl" if HAS_TRL else "baseline,hf"
SMOKE = ["--variants", PEERS, "--quantization", "none", "--steps", "1", "--batch-size", "2", "--max-length", "128",
         "--json", "--sequential"]  # in-process below (run_child is patched); the turns are tested on real children


def test_child_command_round_trips_the_options():
    args = argparse.Namespace(model="small", steps=3, batch_size=5, max_length=256, new_tokens=7, generate=True,
                              quantization="none", llamafactory_python="/venvs/lf/bin/python", profile=True)
    command = bench.child_command(args, "kv_cache")
    assert command[2:] == ["--variant", "kv_cache", "--model", "small", "--steps", "3", "--batch-size", "5",
                           "--max-length", "256", "--new-tokens", "7", "--quantization", "none", "--generate",
                           "--profile"]
    assert bench.child_command(args, "llamafactory")[0] == "/venvs/lf/bin/python"


@pytest.fixture
def children_in_process(monkeypatch):
    """run_child runs each variant in this process (no interpreter start-up); the corpus is encoded once."""
    import lyra.data

    encoded = {}
    build_datasets = lyra.data.build_datasets

    def encode_once(data_cfg, tokenizer):
        if "splits" not in encoded:
            encoded["splits"] = build_datasets(data_cfg, tokenizer)
        return encoded["splits"]

    monkeypatch.setattr(lyra.data, "build_datasets", encode_once)

    def in_process(args, variant):
        if reason := bench.unavailable(variant, args):
            return {"variant": variant, "status": "unsupported", "reason": reason}
        args.variant = variant
        return json.loads(json.dumps(bench.run_variant(args)))

    monkeypatch.setattr(bench, "run_child", in_process)


@pytest.mark.slow
def test_bench_smoke_reports_every_variant_with_ratios_and_parity(children_in_process, capsys):
    assert bench.main(SMOKE) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == "command: python scripts/bench_train.py " + " ".join(SMOKE)
    report = json.loads(lines[-1])
    assert {"vs", "best_peer", "speedup", "memory_ratio", "loss_parity", "flagged", "machine", "command",
            "load_average"} <= report.keys()
    assert list(report["variants"]) == PEERS.split(",") + ["lyra"]
    rows = report["variants"]
    for name, row in rows.items():
        assert row["status"] == "ok" and row["steps"] == 1 and row["conversation_tokens_per_s"] > 0
        assert {"supervised_tokens_per_s", "supervised_tokens_per_cpu_s", "pad_fraction", "training_memory_bytes",
                "first_batch_loss"} <= row.keys()
    # same examples: the seed-style run supervises every token and pads to --max-length, lyra only the replies
    assert rows["baseline"]["supervised_tokens_per_s"] / rows["baseline"]["conversation_tokens_per_s"] > 0.95
    assert rows["lyra"]["supervised_tokens_per_s"] < rows["lyra"]["conversation_tokens_per_s"]
    assert rows["baseline"]["pad_fraction"] >= rows["lyra"]["pad_fraction"]
    # objective parity: the real peers train lyra's loss on the same first batch; the seed style does not
    assert report["flagged"] == ["baseline"] and "FLAG: baseline trains a different objective" in out
    for peer in PEERS.split(",")[1:]:
        assert rows[peer]["objective"]["same_objective"]
        assert rows[peer]["first_batch_loss"] == pytest.approx(rows["lyra"]["first_batch_loss"], rel=1e-4)
    assert report["loss_parity"] is True and rows["lyra"]["loss_parity"]["max_abs_diff"] <= 1e-4
    best = report["best_peer"]
    assert best in PEERS.split(",")[1:]
    assert report["speedup"] == rows["lyra"]["supervised_tokens_per_s"] / rows[best]["supervised_tokens_per_s"]
    assert report["memory_ratio"] == report["vs"][best]["memory_ratio"]
    assert all(row["profile"] is None for row in rows.values()) and "where a timed step goes" not in out


def test_profile_splits_each_timed_step_by_what_ran(children_in_process, capsys):
    """--profile: every timed step (not the warm-up) is split into products, attention, other ops and the
    rest, and the parts add up to the step's own time."""
    argv = ["--model", "tiny", "--variants", "hf", "--quantization", "none", "--steps", "3", "--batch-size", "2",
            "--max-length", "128", "--json", "--sequential", "--profile"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    for name in ("hf", "lyra"):
        row = report["variants"][name]
        parts = row["profile"]
        assert parts["steps"] == row["timed_steps"] == 2
        assert sum(parts[part] for part in bench.PROFILE_PARTS) == pytest.approx(parts["seconds_per_step"], rel=1e-3)
        assert parts["products"] > 0 and parts["attention"] > 0 and parts["other_ops"] > 0
        # the labelled range wraps the timed window and nothing more than the clock's own calls
        assert parts["seconds_per_step"] == pytest.approx(row["timed_seconds"] / 2, rel=0.1, abs=0.005)
    assert "where a timed step goes" in out


@pytest.mark.parametrize("name, part", [
    ("mkldnn::_linear_pointwise", "products"), ("aten::addmm", "products"), ("aten::mm", "products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"), ("aten::mul", "other_ops"),
    ("aten::silu_backward", "other_ops"), ("_FusedLoRALinear", "python_and_autograd"),
    ("autograd::engine::evaluate_function: MmBackward0", "python_and_autograd"),
    ("Optimizer.step#AdamW.step", "python_and_autograd")])
def test_profile_parts_name_what_each_event_is(name, part):
    assert bench.profile_part(name) == part


@pytest.mark.slow
def test_variants_take_turns_one_optimizer_step_each(capsys):
    """The default schedule: real child interpreters, loaded side by side, then step by step in variant
    order, so the machine's drift over a run hits every variant alike; no two timed steps overlap."""
    argv = ["--model", "tiny", "--variants", "hf", "--quantization", "none", "--steps", "3", "--batch-size", "2",
            "--max-length", "128", "--json"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["schedule"] == "in turns" and report["overlapping_steps"] == []
    assert "schedule: in turns" in out and "OVERLAPPING" not in out
    windows = sorted((start, end, name) for name in ("hf", "lyra")
                     for start, end in report["variants"][name]["step_windows"])
    assert [name for _, _, name in windows] == ["hf", "lyra"] * 3  # round after round, in variant order
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(windows, windows[1:]))
    assert report["variants"]["lyra"]["loss_parity"]["ok"] and report["best_peer"] == "hf"


def test_overlapping_steps_are_named():
    rows = {"hf": {"step_windows": [[0.0, 1.0], [2.0, 3.0]]}, "lyra": {"step_windows": [[1.0, 2.0], [2.5, 3.5]]},
            "trl": {"status": "failed"}}
    assert bench.overlapping_steps(rows) == ["hf/lyra"]
    rows["lyra"]["step_windows"][1] = [3.0, 4.0]
    assert bench.overlapping_steps(rows) == []


def row(loss, tokens_per_s, memory=100):
    return {"status": "ok", "first_batch_loss": loss, "supervised_tokens_per_s": tokens_per_s,
            "supervised_tokens_per_cpu_s": tokens_per_s, "training_memory_bytes": memory, "dtype": "float32"}


def test_a_peer_with_another_objective_is_flagged_and_never_the_best_peer():
    """A faster peer whose first-batch loss differs (e.g. it also trains on the prompt) is not compared."""
    results = {"hf": row(2.0, 50.0), "trl": row(2.0003, 900.0), "llamafactory": {"status": "failed", "reason": "x"},
               "lyra": {**row(2.0, 100.0, memory=40), "loss_parity": {"ok": True}}}
    summary = bench.summarize(results)
    assert summary["flagged"] == ["trl"] and summary["vs"]["trl"]["same_objective"] is False
    assert summary["best_peer"] == "hf" and summary["speedup"] == 2.0 and summary["memory_ratio"] == 0.4
    assert summary["goals_met"] is True and "llamafactory" not in summary["vs"]
    within = bench.summarize({"hf": row(2.00015, 50.0), "lyra": {**row(2.0, 100.0), "loss_parity": {"ok": True}}})
    assert within["flagged"] == []  # 1e-4 relative: fp32 kernels that sum in another order
    half = {"hf": {**row(2.01, 50.0), "dtype": "bfloat16"},
            "lyra": {**row(2.0, 100.0), "dtype": "bfloat16", "loss_parity": {"ok": True}}}
    assert bench.summarize(half)["flagged"] == []  # bf16: 1e-2 relative


def test_unavailable_peers_say_why_in_one_line(monkeypatch):
    args = argparse.Namespace(llamafactory_python=None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert bench.unavailable("unsloth", args) in ("unsloth needs a CUDA GPU",
                                                  "`unsloth` is not installed (pip install -e '.[bench]')")
    assert bench.unavailable("trl", args) == "`trl` is not installed (pip install -e '.[bench]')"
    assert bench.unavailable("llamafactory", args).startswith("llamafactory is not installed")
    assert bench.unavailable("hf", args) is None


@pytest.mark.parametrize("model", ["tiny", "small", "qwen3_0_6b"])
def test_every_random_model_composes_with_its_architecture(model, tmp_path):
    args = argparse.Namespace(model=model, quantization="auto", max_length=256, steps=2, batch_size=2)
    cfg = bench.compose_config(args, str(tmp_path))
    for key, value in bench.MODELS[model].items():
        assert cfg.model.build[key] == value
    import torch

    assert cfg.quantization.load_in_4bit == (model == "tiny" or torch.cuda.is_available())  # CPU: fp32 above tiny
    assert cfg.trainer.train_sampling_strategy == "group_by_length" and cfg.trainer.max_steps == 2


def test_a_model_option_missing_from_the_checkout_says_so(monkeypatch):
    monkeypatch.setitem(bench.MODEL_CONFIG_OPTION, "smollm2_135m", "no_such_model")
    with pytest.raises(SystemExit, match="needs lyra/conf/model/no_such_model.yaml"):
        bench.model_overrides("smollm2_135m")
