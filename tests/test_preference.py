"""Preference training: pair files (TRL, LLaMA-Factory) through the one reader, objective=dpo|orpo on
TRL with lyra's model/LoRA/checkpoints, DPO's loss equal to TRL's own, and `lyra.data pairs`.

Training tests use the tiny 4-bit Qwen3 of experiment=smoke; DPO continues the smoke run's adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import compose, smoke_overrides
from lyra.config import validate
from lyra.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "preference"
SYSTEM = "You are Lyra, a gentle maid. You call the user Master."


def line_of(path: Path, text: str) -> int:
    """The line of the first record holding `text` (for a .json array: where its element opens)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    hit = next(i for i, line in enumerate(lines) if text in line)
    if path.suffix == ".json":
        hit = max(i for i in range(hit + 1) if lines[i] == "  {")  # the array's elements open at indent 2
    return hit + 1


# ------------------------------------------------------------------------------------- reading

def test_the_four_record_shapes_read_with_problems_at_file_line(tokenizer):
    from lyra.data.preference import prepare_pairs

    expected = {  # file: (usable pairs, {text on the problem's line: message fragment})
        "trl_conversational.jsonl": (2, {"Say hi": "the same reply", "Say bye": 'missing "rejected"'}),
        "trl_plain.jsonl": (1, {"two plus two": 'needs string replies; "rejected" is an array'}),
        "trl_implicit.jsonl": (1, {'"Hello"': "must share every message but their last"}),
        "llamafactory_dpo.json": (1, {"Something quicker?": '"rejected": message 5 (assistant) holds a <think> block',
                                      "You are welcome": '"chosen" must end with an assistant reply'}),
    }
    for name, (count, problems) in expected.items():
        path = FIXTURES / name
        prepared = prepare_pairs(path, tokenizer, SYSTEM)
        assert len(prepared.pairs) == count == len(prepared.encoded), name
        assert len(prepared.problems) == len(problems), [str(p) for p in prepared.problems]
        for problem, (text, fragment) in zip(prepared.problems, problems.items()):
            assert str(problem).startswith(f"{path}:{line_of(path, text)}: "), (str(problem), text)
            assert fragment in problem.message, str(problem)
    conversational = prepare_pairs(FIXTURES / "trl_conversational.jsonl", tokenizer, SYSTEM)
    assert conversational.report.ignored_note().endswith('"score_chosen" (1), "score_rejected" (1)')
    assert conversational.system_prompt_inserted == 1  # the second pair brings its own system message


def test_a_pair_is_tokenized_as_chat_prompts_the_model(tokenizer):
    """The prompt is chat's prompt for that history (persona system prompt included); each reply runs to
    the template's end-of-turn token, exactly as an SFT example of the same turn."""
    from lyra.data.preference import prepare_pairs
    from lyra.data.tokenization import encode_turn
    from lyra.generation import build_prompt_ids

    prepared = prepare_pairs(FIXTURES / "trl_plain.jsonl", tokenizer, SYSTEM)
    (prompt, chosen, rejected), pair = prepared.encoded[0], prepared.pairs[0]
    assert prompt == build_prompt_ids("How do I keep basil fresh?", tokenizer, system_prompt=SYSTEM)
    sft_ids, _ = encode_turn([{"role": "system", "content": SYSTEM}, *pair.prompt, pair.chosen], tokenizer)
    assert prompt + chosen == sft_ids
    assert chosen[-1] == rejected[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(rejected) == "Basil should be stored properly.<|im_end|>"
    dataset, stats = prepared.dataset(max_length=len(prompt) + len(chosen) - 1)  # the pair no longer fits
    assert len(dataset) == 0 and stats.dropped_turns == 1


def test_validate_and_stats_read_preference_files(capsys):
    from lyra.data.__main__ import main

    assert main(["validate", str(FIXTURES / "trl_conversational.jsonl"), "--system-prompt", SYSTEM]) == 1
    out = capsys.readouterr().out
    assert f"{FIXTURES / 'trl_conversational.jsonl'}:3: " in out and "the same reply" in out
    good = FIXTURES / "trl_implicit.jsonl"
    assert main(["stats", str(FIXTURES / "llamafactory_dpo.json"), "--json", "--system-prompt", SYSTEM]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pairs"] == 1 and stats["multi_turn_prompts"] == 0 and stats["skipped_invalid"] == 2
    assert main(["stats", str(good), "--system-prompt", SYSTEM]) == 0
    assert "preference pairs         1" in capsys.readouterr().out


def test_sft_refuses_a_pair_file_with_the_objective_to_use(tmp_path):
    from lyra.data.formats import read_file

    report = read_file(FIXTURES / "trl_plain.jsonl")
    assert report.conversations == [] and "objective=dpo or objective=orpo" in report.problems[0].message


# ----------------------------------------------------------------------------------- validation

def test_validate_checks_the_objective_group_before_anything_heavy(tmp_path, smoke_run):
    pairs = str(FIXTURES / "trl_plain.jsonl")
    cases = [
        (["objective=dpo", f"objective.train_file={pairs}"],
         "objective.init_adapter: is required with objective=dpo: the SFT run DPO continues"),
        (["objective=dpo", f"objective.train_file={pairs}", f"objective.init_adapter={tmp_path}"],
         f"objective.init_adapter: {tmp_path} holds no adapter (adapter_config.json)"),
        (["objective=orpo"], "objective.train_file: is required with objective=orpo"),
        (["objective=orpo", f"objective.train_file={pairs}", "objective.beta=0"], "objective.beta: must be a number > 0"),
        (["+objective.beta=0.1"], "objective.beta: is a preference knob: set objective=dpo or objective=orpo"),
        (["objective=dpo", f"objective.train_file={pairs}", f"objective.init_adapter={smoke_run}", "lora.r=16"],
         "lora.r: "),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as error:
            validate(compose(smoke_overrides(tmp_path / "run", *overrides)))
        assert str(error.value).startswith(message), str(error.value)
    validate(compose(smoke_overrides(tmp_path / "run", "objective=dpo", f"objective.train_file={pairs}",
                                     f"objective.init_adapter={smoke_run}")))


def test_an_unknown_trl_knob_is_one_line():
    from omegaconf import OmegaConf

    from lyra.preference import preference_args

    objective = OmegaConf.create({"name": "dpo", "beta": 0.1, "betta": 1, "metric": "eval_loss"})
    with pytest.raises(UserError, match=r"^objective.betta: not a DPOConfig option$"):
        preference_args(objective, {"output_dir": "x", "use_cpu": True}, 256)


# ------------------------------------------------------------------------------------- training

def preference_overrides(run_dir: Path, *extra: str) -> list[str]:
    """Few short steps on the built-in pairs fixture, no probes, no eval split."""
    return smoke_overrides(run_dir, f"objective.train_file={FIXTURES / 'llamafactory_dpo.json'}",
                           "data.on_invalid=skip", "eval=none", "trainer.logging_steps=1", *extra)


def losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def trl_pairs(tmp_path: Path) -> Path:
    """The fixtures' usable pairs (all four shapes), twice, in one TRL conversational file."""
    from lyra.data.preference import read_pairs

    pairs = [pair for name in ("trl_conversational.jsonl", "trl_plain.jsonl", "trl_implicit.jsonl",
                               "llamafactory_dpo.json") for pair in read_pairs(FIXTURES / name).conversations]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": [p.chosen], "rejected": [p.rejected]}) + "\n"
                            for p in pairs * 2))
    return path


def test_dpo_from_the_sft_adapter_trains_and_saves(tmp_path, smoke_run):
    from lyra.train import train

    run_dir, pairs = tmp_path / "dpo", trl_pairs(tmp_path)
    metrics = train(compose(preference_overrides(
        run_dir, "objective=dpo", f"objective.init_adapter={smoke_run}", f"objective.train_file={pairs}",
        "trainer.max_steps=2")))
    assert metrics["global_step"] == 2 and all(math.isfinite(loss) for loss in losses(run_dir))
    assert metrics["train_examples"] == len(pairs.read_text().splitlines()) and metrics["tokens_seen"] > 0
    trained, sft = load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), \
        load_file(str(smoke_run / "adapter" / "adapter_model.safetensors"))
    assert trained.keys() == sft.keys()  # the SFT adapter, continued
    assert max((trained[k].float() - sft[k].float()).abs().max().item() for k in sft) > 0  # and moved
    # the frozen reference is the SFT adapter itself, kept next to it
    reference = load_file(str(run_dir / "adapter" / "ref" / "adapter_model.safetensors"))
    assert all(reference[k].equal(sft[k]) for k in sft)


def test_orpo_from_the_base_trains_and_saves(tmp_path):
    from lyra.train import train

    run_dir = tmp_path / "orpo"
    metrics = train(compose(preference_overrides(run_dir, "objective=orpo", "trainer.max_steps=2",
                                                 f"objective.train_file={trl_pairs(tmp_path)}")))
    assert metrics["global_step"] == 2 and all(math.isfinite(loss) for loss in losses(run_dir))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and metrics["tokens_seen"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_stopped_preference_run_resumes_to_the_same_adapter(tmp_path, smoke_run, objective):
    """Stopped after step 2 of 4 (checkpoint-2 on disk), rerun with the same command: it resumes from the
    checkpoint and ends where an uninterrupted run ends (fp32 base: the resume, not 4-bit speed, is tested)."""
    from lyra.train import train

    pairs = trl_pairs(tmp_path)
    extra = [f"objective={objective}", f"objective.train_file={pairs}", "quantization=none", "trainer.save_steps=2",
             *([f"objective.init_adapter={smoke_run}"] if objective == "dpo" else [])]
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "stopped"
    train(compose(preference_overrides(reference_dir, *extra, "trainer.max_steps=4")))
    train(compose(preference_overrides(run_dir, *extra, "trainer.max_steps=4", "trainer.save_steps=2")))
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")  # as if killed after checkpoint-2
    for name in ("adapter", "metrics.json", "trainer_state.json"):
        (shutil.rmtree if (run_dir / name).is_dir() else Path.unlink)(run_dir / name)
    metrics = train(compose(preference_overrides(run_dir, *extra, "trainer.max_steps=4")))
    assert metrics["global_step"] == 4 and len(losses(run_dir)) == 4
    assert losses(run_dir)[2:] == pytest.approx(losses(reference_dir)[2:], abs=1e-5)
    resumed, reference = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir, reference_dir))
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) < 1e-5


def test_lyras_dpo_loss_is_trls_own(tmp_path, smoke_run):
    """lyra's DPO trainer and a plain trl.DPOTrainer, each on the SFT adapter, give the same loss on the
    same batch; TRL's own tokenization of the same pairs differs from lyra's only by the newline the
    template writes after <|im_end|> (never generated, so lyra does not train it, as in SFT)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lyra.config import init_adapter_path
    from lyra.modeling import apply_lora, build_model, build_quantization, build_tokenizer, resolve_dtype
    from lyra.preference import build_preference_datasets, build_preference_trainer, preference_args
    from lyra.train import build_training_args

    pairs = trl_pairs(tmp_path)
    cfg = compose(preference_overrides(tmp_path / "run", "objective=dpo", f"objective.init_adapter={smoke_run}",
                                       f"objective.train_file={pairs}", "lora.lora_dropout=0"))
    tokenizer = build_tokenizer(cfg.model)
    dtype = resolve_dtype(cfg.model.dtype)

    def model():
        base = build_model(cfg.model, build_quantization(cfg.quantization, dtype), dtype)
        return apply_lora(base, cfg.lora, init_adapter=init_adapter_path(cfg.objective.init_adapter))

    splits = build_preference_datasets(cfg.objective, cfg.data, tokenizer)
    args = build_training_args(cfg.trainer, tmp_path / "run", dtype, False, cfg.objective, cfg.data.max_length)
    lyra_trainer = build_preference_trainer(cfg.objective, model(), args, tokenizer, splits, [])

    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    for record in records:
        record["prompt"] = [{"role": "system", "content": cfg.data.system_prompt}, *record["prompt"]] \
            if record["prompt"][0]["role"] != "system" else record["prompt"]
        record["chat_template_kwargs"] = {"enable_thinking": False}
    plain_args = DPOConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", bf16=False,
                           beta=cfg.objective.beta, max_length=cfg.data.max_length, gradient_checkpointing=False)
    plain = DPOTrainer(model=model(), args=plain_args, train_dataset=Dataset.from_list(records),
                       processing_class=tokenizer)

    newline = tokenizer.encode("\n", add_special_tokens=False)
    for ours, theirs in zip(splits.train, plain.train_dataset):
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["chosen_ids"] + newline == theirs["chosen_ids"]
        assert ours["rejected_ids"] + newline == theirs["rejected_ids"]

    batch = lyra_trainer.data_collator([splits.train[i] for i in range(4)])
    with torch.no_grad():
        lyra_loss = lyra_trainer.compute_loss(lyra_trainer.model, dict(batch))
        trl_loss = plain.compute_loss(plain.model, dict(batch))
    assert torch.isfinite(lyra_loss) and lyra_loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)


# ------------------------------------------------------------------------------------ pair building

def test_pairs_from_the_smoke_run_fail_a_persona_check(tmp_path, smoke_run, capsys):
    from lyra.data.__main__ import main
    from lyra.data.preference import read_pairs
    from lyra.persona import failed_checks
    from lyra.runs import load_run_config, run_persona

    out = tmp_path / "pairs.jsonl"
    # sampled: the random tiny model's greedy reply is an immediate stop (empty, dropped and counted)
    assert main(["pairs", f"run_dir={smoke_run}", "--out", str(out), "--max-pairs", "4", "--max-new-tokens", "12",
                 "--temperature", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "of 4 assistant turns as pairs" in printed and f"pairs to {out}" in printed
    report = read_pairs(out)
    assert report.problems == [] and len(report.conversations) >= 1  # what it writes is what training reads
    persona = run_persona(load_run_config(smoke_run), smoke_run)
    for record, pair in zip(map(json.loads, out.read_text().splitlines()), report.conversations):
        fails = failed_checks(pair.rejected["content"], persona)
        assert fails and set(record["lyra"]["rejected_fails"]) <= set(fails)
        assert not set(record["lyra"]["rejected_fails"]) & set(failed_checks(pair.chosen["content"], persona))
        assert pair.prompt[0]["role"] != "system"  # the persona's prompt is inserted at training, as for SFT
