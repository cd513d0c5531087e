"""The parity check (lyra.parity): the same greedy probes through every way a persona is served.

The command line runs on the tiny smoke run with all four targets: hf and merged always run; gguf
runs when llama-cpp-python imports and server when lyra.serve exists, and each is otherwise
skipped with its reason printed. Real weights (SmolLM2, where greedy replies are real sentences)
go through llama.cpp in the slow test. The report logic is tested on hand-made replies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, compose
from lyra.errors import UserError
from lyra.evaluate import targets_as_list
from lyra.generation import Reply
from lyra.parity import (TargetRun, _report, check_parity_generation, format_parity, missing_runtime,
                         parse_targets)

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_SERVER = importlib.util.find_spec("lyra.serve") is not None and importlib.util.find_spec("openai") is not None
PERSONA = {"name": "Lyra", "user_address": "Master", "language": "en"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------- the command

def test_parity_command_on_the_smoke_run_prints_the_table_and_every_target_agrees(smoke_run, tmp_path):
    output = tmp_path / "evaluation.json"
    output.write_text(json.dumps({"eval_loss": 1.5}))  # an earlier evaluation's keys are kept
    done = subprocess.run(
        [sys.executable, "-m", "lyra.evaluate", f"run_dir={smoke_run}", "targets=hf,merged,gguf,server",
         "eval.num_probes=2", "eval.generation.max_new_tokens=8", f"output_file={output}",
         "parity.gguf_cache=false"],  # the read-only session run stays as it is
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    results = json.loads(output.read_text())
    parity = results["parity"]
    assert results["eval_loss"] == 1.5 and parity["reference"] == "hf" and parity["num_probes"] == 2
    ran = ["hf", "merged", *(["gguf"] if HAS_LLAMA_CPP else []), *(["server"] if HAS_SERVER else [])]
    for name in ran:
        entry = parity["targets"][name]
        assert entry["status"] == "ok", (name, entry["reason"])
        assert entry["prompt_ids_equal"] and entry["exact_match_rate"] == 1.0 and entry["eos_match_rate"] == 1.0, name
        assert [r["prompt_tokens"] for r in entry["replies"]] == [r["prompt_tokens_lyra"] for r in entry["replies"]]
    for name in ("hf", "merged", "gguf"):
        if name in ran:
            assert parity["targets"][name]["token_match_rate"] == 1.0, name
    assert parity["agree"] and parity["disagreements"] == []
    table = done.stdout
    assert "parity over 2 probes, greedy, against hf:" in table and f"all {len(ran)} targets agree" in table
    for name in ("hf", "merged", "gguf", "server"):
        assert any(line.startswith(name) for line in table.splitlines()), name
    if not HAS_LLAMA_CPP:  # never silently
        assert "gguf skipped: llama-cpp-python is not installed: pip install 'lyra[gguf-runtime]'" in table
        assert parity["skipped"]["gguf"].startswith("llama-cpp-python is not installed")
    if not HAS_SERVER:
        assert "server skipped: " in table and "server" in parity["skipped"]


def test_bad_targets_and_sampling_are_one_line_before_any_model_loads(smoke_run, tmp_path):
    from lyra.evaluate import evaluate

    base = [f"run_dir={smoke_run}", f"output_file={tmp_path / 'e.json'}"]
    with pytest.raises(UserError) as error:
        evaluate(compose([*base, "targets=[hf,vllm]"], config_name="evaluate"))
    assert error.value.key == "targets" and "vllm" in error.value.message and "hf,merged,gguf,server" in error.value.message
    with pytest.raises(UserError) as error:
        evaluate(compose([*base, "targets=[hf,merged]", "eval.generation.do_sample=true"], config_name="evaluate"))
    assert error.value.key == "eval.generation.do_sample"
    with pytest.raises(UserError) as error:
        evaluate(compose([*base, "targets=[hf,merged]", "adapter=none"], config_name="evaluate"))
    assert error.value.key == "adapter"
    assert not (tmp_path / "e.json").exists()


# ---------------------------------------------------------------- parsing and validation

def test_targets_parse_in_order_without_duplicates():
    assert parse_targets("hf,merged,gguf,server") == ["hf", "merged", "gguf", "server"]
    assert parse_targets(["gguf", "hf", "gguf"]) == ["gguf", "hf"]
    assert parse_targets(" hf , merged ") == ["hf", "merged"]
    for bad in ("", "hf,onnx", []):
        with pytest.raises(UserError, match="targets"):
            parse_targets(bad)


def test_the_issues_comma_spelling_reaches_hydra_as_a_list():
    """Hydra reads an unquoted `a,b` as a sweep and refuses it outside --multirun."""
    argv = ["evaluate", "run_dir=R", "targets=hf,merged,gguf,server", "eval.num_probes=4"]
    assert targets_as_list(argv) == ["evaluate", "run_dir=R", "targets=[hf,merged,gguf,server]", "eval.num_probes=4"]
    for kept in ("targets=hf", "targets=[hf,merged]", "targets='hf,merged'"):
        assert targets_as_list([kept]) == [kept]
    assert compose(["run_dir=R", "targets=[hf,merged,gguf,server]"], config_name="evaluate").targets == [
        "hf", "merged", "gguf", "server"]


def test_generation_the_runtimes_cannot_reproduce_is_refused_by_name():
    check_parity_generation({"do_sample": False, "repetition_penalty": 1.1, "max_new_tokens": 8, "top_k": 20},
                            ["hf", "gguf"])  # top_k is ignored by greedy decoding everywhere
    with pytest.raises(UserError) as error:
        check_parity_generation({"do_sample": False, "no_repeat_ngram_size": 3}, ["hf", "server"])
    assert error.value.key == "eval.generation.no_repeat_ngram_size"
    check_parity_generation({"do_sample": False, "no_repeat_ngram_size": 3}, ["hf", "merged"])  # both transformers
    with pytest.raises(UserError, match="greedy"):
        check_parity_generation({"do_sample": True, "temperature": 0.7}, ["hf", "merged"])


def test_a_missing_runtime_is_a_reason_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("llama_cpp", "openai") else real(name))
    assert "pip install 'lyra[gguf-runtime]'" in missing_runtime("gguf")
    assert missing_runtime("server") is not None
    assert missing_runtime("hf") is None and missing_runtime("merged") is None


# ---------------------------------------------------------------- the report

def _reply(text: str, ended: bool = True, tokens=(1, 2)) -> Reply:
    return Reply(text=text, raw=text, token_ids=list(tokens), ended_by_eos=ended, prompt_tokens=5)


class _Probe:
    def __init__(self, id: str):
        self.id = id


def _target(name: str, replies, prompt_ids_equal=None, **kwargs) -> TargetRun:
    return TargetRun(name, replies=replies, prompt_ids_equal=prompt_ids_equal or [True] * len(replies), **kwargs)


def test_each_disagreeing_target_is_named_in_one_line():
    probes = [_Probe("greet"), _Probe("tired"), _Probe("name")]
    reference = [_reply("Hello Master, Lyra here."), _reply("Rest, Master."), _reply("I am Lyra.")]
    results = {
        "hf": _target("hf", reference),
        "merged": _target("merged", list(reference)),
        "gguf": _target("gguf", [reference[0], _reply("Rest, Master!", tokens=(1, 3)), _reply("I am Lyra.", ended=False)],
                        prompt_ids_equal=[True, False, True]),
        "server": TargetRun("server", status="skipped", reason="this lyra has no lyra.serve"),
    }
    report = _report(results, probes, PERSONA, {"do_sample": False}, [[1] * 5] * 3, "f16")
    assert report["agree"] is False
    assert report["targets"]["merged"]["exact_match_rate"] == 1.0
    gguf = report["targets"]["gguf"]
    assert gguf["exact_match_rate"] == pytest.approx(2 / 3) and gguf["token_match_rate"] == pytest.approx(2 / 3)
    assert gguf["eos_match_rate"] == pytest.approx(2 / 3) and gguf["prompt_ids_equal"] is False
    assert gguf["metrics"]["eos_rate"] == pytest.approx(2 / 3) and gguf["metrics"]["self_name_rate"] == pytest.approx(2 / 3)
    assert report["disagreements"] == [
        "gguf disagrees: prompt ids differ on 1/3 probes; 1/3 replies differ from hf (first: tired); "
        "stops differently on 1/3 probes (first: name)"]
    text = format_parity(report)
    print(text)
    lines = text.splitlines()
    assert lines[0] == "parity over 3 probes, greedy, against hf:"
    assert "server skipped: this lyra has no lyra.serve" in lines and lines[-1].startswith("gguf disagrees:")
    assert not any("agree" in line and line.startswith("all") for line in lines)


def test_a_failed_target_is_a_disagreement_and_the_first_target_is_the_reference_without_hf():
    probes = [_Probe("a")]
    results = {"merged": _target("merged", [_reply("x")]),
               "gguf": TargetRun("gguf", status="failed", reason="gguf: lyra.export format=gguf failed (exit 2)")}
    report = _report(results, probes, PERSONA, {}, [[1] * 5], "f16")
    assert report["reference"] == "merged"
    assert report["disagreements"] == ["gguf failed: gguf: lyra.export format=gguf failed (exit 2)"]
    assert not report["agree"]


# ---------------------------------------------------------------- real weights through llama.cpp

@pytest.mark.slow
def test_smollm2_run_agrees_greedily_through_peft_merge_and_llama_cpp(smollm2_dir, tmp_path):
    """A SmolLM2 run (real weights, whose greedy replies are sentences) gives the same greedy replies,
    token for token, as PEFT, as the float32 merge, and as llama.cpp on its f16 GGUF export."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'lyra[gguf-runtime]'")
    from lyra.evaluate import evaluate
    from lyra.train import train

    run_dir = tmp_path / "run"
    train(compose(["model=smollm2_135m", "quantization=none", "lora=attn", "persona=lyra_en", "trainer=smoke",
                   "eval=none", "logger=none", "data.max_length=128", "trainer.max_steps=2",
                   "trainer.per_device_train_batch_size=1", "trainer.learning_rate=1e-3", "trainer.eval_strategy=no",
                   f"paths.output_dir={run_dir}"]))
    targets = ["hf", "merged", "gguf", *(["server"] if HAS_SERVER else [])]
    results = evaluate(compose([f"run_dir={run_dir}", f"targets=[{','.join(targets)}]", "eval.num_probes=2",
                                "eval.generation.max_new_tokens=24"], config_name="evaluate"))
    parity = results["parity"]
    assert parity["agree"], parity["disagreements"]
    replies = parity["targets"]["gguf"]["replies"]
    assert all(len(r["reply"]) > 10 for r in replies)  # real text, not a degenerate token
    assert parity["targets"]["gguf"]["token_match_rate"] == 1.0
    export = Path(parity["targets"]["gguf"]["notes"][0])  # cached beside the run, keyed by the adapter
    assert export.is_relative_to(run_dir / "exports") and export.is_file()
