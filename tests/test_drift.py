"""Tagged probes (a rate over the probes that ask for it) and persona drift over long chats (lyra.drift).

    python -m pytest tests/test_drift.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from lyra.errors import UserError
from lyra.generation import FittedPrompt, Reply
from lyra.persona import HOLD_KEYS, metric_direction, persona_hold, persona_metrics
from lyra.probes import Probe, load_probes

LYRA_EN = {"name": "Lyra", "user_address": "Master", "language": "en"}
ALL = ("name", "address", "language")


def reply(text: str) -> Reply:
    return Reply(text=text, raw=text, ended_by_eos=True)


# ---------------------------------------------------------------- tagged probes

def test_a_rate_counts_only_the_probes_that_ask_for_it():
    replies = [reply("Lyra is here, Master."),               # who are you?   name, address, language
               reply("Pancakes need flour, eggs and milk."),  # a recipe:     address, language
               reply("Master, oats are a good start."),       # breakfast?    address, language
               reply("Lyra says 你好, Master")]                # untagged: every rate; 14 of 16 letters ASCII
    checks = [ALL, ("address", "language"), ("address", "language"), None]
    untagged = persona_metrics(replies, LYRA_EN)
    tagged = persona_metrics(replies, LYRA_EN, checks)
    assert untagged["self_name_rate"] == 0.5  # the recipe and breakfast replies count as misses
    assert tagged["self_name_rate"] == 1.0  # over "who are you?" and the untagged probe only
    assert untagged["address_rate"] == tagged["address_rate"] == 0.75
    assert untagged["language_rate"] == tagged["language_rate"] == 0.75
    assert tagged["eos_rate"] == 1.0 and tagged["avg_reply_chars"] == untagged["avg_reply_chars"]
    # a rate no probe asks for is not measured: left out, not 0
    assert "self_name_rate" not in persona_metrics(replies[1:3], LYRA_EN, checks[1:3])
    with pytest.raises(ValueError, match="4 replies but 3 checks"):
        persona_metrics(replies, LYRA_EN, checks[:3])


def test_unknown_check_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"id": "a", "prompt": "Hi", "checks": ["name"]}\n'
                    '{"id": "b", "prompt": "Who are you?", "checks": ["name", "adress"]}\n', encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_probes(path)
    assert str(error.value) == (f"eval.probes_file: {path}:2: unknown check 'adress' in \"checks\" "
                                "(known: name, address, language)")
    path.write_text('{"id": "a", "prompt": "Hi", "checks": "name"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf":1: \"checks\" must be a list of check names \(name, address, language\), "
                                        r"got 'name'$"):
        load_probes(path)
    path.write_text('{"id": "a", "prompt": "Hi", "checks": ["name", "name"]}\n{"id": "b", "prompt": "Yo"}\n',
                    encoding="utf-8")
    assert load_probes(path) == [Probe("a", "Hi", ("name",)), Probe("b", "Yo", None)]


def test_unknown_check_on_the_command_line_is_one_line_exit_2(smoke_run, tmp_path):
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"id": "a", "prompt": "Hi", "checks": ["nmae"]}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "lyra.evaluate", f"run_dir={smoke_run}",
                             f"eval.probes_file={bad}", "drift.turns=3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"lyra: error: eval.probes_file: {bad}:1: unknown check 'nmae' in \"checks\" (known: name, address, language)")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- holds and the replay loop

def test_persona_hold_is_last_turn_over_turn_one_and_handles_a_zero_start():
    turns = [{"self_name_rate": 0.0, "address_rate": 0.5, "language_rate": 1.0},
             {"self_name_rate": 0.5, "address_rate": 0.75, "language_rate": 0.5}]
    assert persona_hold(turns) == {"persona_hold": (1.0 + 0.5) / 2,  # address 1.5 counts as 1: gains hide no loss
                                   "self_name_hold": None, "address_hold": 1.5, "language_hold": 0.5}
    assert persona_hold([{"address_rate": 0.0}, {"address_rate": 0.0}])["persona_hold"] is None
    assert all(metric_direction(key) == "maximize" for key in HOLD_KEYS)


class ScriptedModel:
    """Stands in for fit_prompt + generate_in_batches: a persona that forgets its name at turn 3 in chat 0."""

    def __init__(self):
        self.histories: list[list[dict]] = []

    def fit_prompt(self, prompt_text, tokenizer, history, system_prompt, max_prompt_tokens):
        self.histories.append([dict(m) for m in history])
        return FittedPrompt(ids=[len(history), len(prompt_text)], history=list(history), prompt_text=prompt_text)

    def generate_in_batches(self, prompts, model, tokenizer, batch_size, **generation):
        assert generation == {"max_new_tokens": 5, "do_sample": False} and batch_size == 2
        turn = prompts[0][0] // 2 + 1  # every history holds 2 messages per earlier turn
        texts = ["Happy to help, Master." if chat == 0 and turn >= 3 else f"Lyra answers turn {turn}, Master."
                 for chat in range(len(prompts))]
        return [Reply(text=t, raw=t, ended_by_eos=True, prompt_tokens=sum(p)) for t, p in zip(texts, prompts)]


def test_drift_aggregates_per_turn_and_feeds_the_model_its_own_replies(monkeypatch):
    import lyra.generation
    from lyra.drift import DriftPlan, Script, format_drift_table

    fake = ScriptedModel()
    monkeypatch.setattr(lyra.generation, "fit_prompt", fake.fit_prompt)
    monkeypatch.setattr(lyra.generation, "generate_in_batches", fake.generate_in_batches)
    monkeypatch.setattr(lyra.generation, "context_budget", lambda model, new, limit: 999)
    probes = [Probe(f"p{i}", f"question {i}", ALL) for i in range(2)]
    from lyra.drift import probe_scripts

    scripts = probe_scripts(probes, turns=4, count=8)
    assert [[t.id for t in s.turns] for s in scripts] == [["p0", "p1", "p0", "p1"], ["p1", "p0", "p1", "p0"]]
    plan = DriftPlan(scripts, "probes", 4, {"max_new_tokens": 5, "do_sample": False}, batch_size=2)
    results = plan.run(model=None, tokenizer=None, persona=LYRA_EN, system_prompt="You are Lyra.")

    per_turn = results["drift"]["per_turn"]
    assert [row["self_name_rate"] for row in per_turn] == [1.0, 1.0, 0.5, 0.5]
    assert [row["address_rate"] for row in per_turn] == [1.0] * 4
    assert results["self_name_hold"] == 0.5 and results["address_hold"] == results["language_hold"] == 1.0
    assert results["persona_hold"] == (0.5 + 1.0 + 1.0) / 3 < 1
    # chat 0's turn-4 prompt carries its own earlier replies, its own forgotten-name reply included
    assert fake.histories[-2] == [
        {"role": "user", "content": "question 0"}, {"role": "assistant", "content": "Lyra answers turn 1, Master."},
        {"role": "user", "content": "question 1"}, {"role": "assistant", "content": "Lyra answers turn 2, Master."},
        {"role": "user", "content": "question 0"}, {"role": "assistant", "content": "Happy to help, Master."}]
    transcript = results["drift"]["transcripts"][1]
    assert [t["reply"] for t in transcript["turns"]][-1] == "Lyra answers turn 4, Master."
    table = format_drift_table(results["drift"], {k: results[k] for k in HOLD_KEYS})
    lines = table.splitlines()
    assert lines[0] == "persona drift: 2 chats x 4 turns (probes)"
    assert lines[1].split() == ["turn", "think_leak_rate", "eos_rate", "address_rate", "self_name_rate",
                                "language_rate", "avg_reply_chars"]
    assert lines[5].split()[:5] == ["3", "0.0000", "1.0000", "1.0000", "0.5000"]
    assert lines[-1].startswith("persona_hold=0.8333, self_name_hold=0.5000, address_hold=1.0000")


@pytest.mark.parametrize("override, message", [
    ("drift.turns=-1", "drift.turns: must be an integer >= 0 (0 = off), got -1"),
    ("drift.scripts=0", "drift.scripts: must be an integer >= 1, got 0"),
    ("drift.source=chats", "drift.source: must be one of auto, eval, probes, got 'chats'"),
    ("drift.max_new_tokens=0", "drift.max_new_tokens: must be an integer >= 1, got 0"),
])
def test_bad_drift_settings_are_one_line(override, message):
    from lyra.drift import check_drift

    with pytest.raises(UserError) as error:
        check_drift(compose(["run_dir=x", override], config_name="evaluate").drift)
    assert str(error.value) == message


def test_auto_source_takes_eval_conversations_long_enough_else_chains_probes(tmp_path):
    from lyra.drift import select_scripts

    eval_file = tmp_path / "eval.jsonl"
    turns = [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello, Master!"},
             {"from": "user", "value": "Tea?"}, {"from": "assistant", "value": "Lyra brews it."}]
    eval_file.write_text(json.dumps({"id": "long", "conversations": turns}) + "\n"
                         + json.dumps({"id": "short", "conversations": turns[:2]}) + "\n", encoding="utf-8")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}", "checks": ["name"]}) + "\n"
                              for i in range(3)), encoding="utf-8")
    data = OmegaConf.create({"eval_file": str(eval_file), "on_invalid": "error", "labels": {}})
    eval_cfg = OmegaConf.create({"probes_file": str(probes)})
    drift = OmegaConf.create({"turns": 2, "scripts": 1, "source": "auto"})
    scripts, source = select_scripts(drift, data, eval_cfg, LYRA_EN)
    assert source == "eval" and [(s.id, [t.prompt for t in s.turns], s.turns[0].checks) for s in scripts] == [
        ("long", ["Hi", "Tea?"], None)]
    scripts, source = select_scripts(OmegaConf.merge(drift, {"scripts": 2}), data, eval_cfg, LYRA_EN)
    assert source == "probes" and [[t.prompt for t in s.turns] for s in scripts] == [["q0", "q1"], ["q1", "q0"]]
    with pytest.raises(UserError, match=r"^drift.source: eval: eval.jsonl: 0 of 2 conversations have >= 3 user "
                                        r"turns \(the longest has 2\); use drift.source=probes or fewer drift.turns$"):
        select_scripts(OmegaConf.merge(drift, {"turns": 3, "source": "eval"}), data, eval_cfg, LYRA_EN)


# ---------------------------------------------------------------- end to end on the smoke run

HELD_OUT = [{"id": "a", "conversations": [{"from": "user", "value": "早安"}, {"from": "assistant", "value": "主人早安！"}]}]


def test_smoke_run_drift_prints_the_per_turn_table_and_writes_persona_hold(smoke_run, tmp_path, capsys):
    from lyra.evaluate import evaluate

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in HELD_OUT), encoding="utf-8")
    output = tmp_path / "evaluation.json"
    results = evaluate(compose([f"run_dir={smoke_run}", f"eval_file={held_out}", "eval.num_probes=2",
                                "eval.generation.max_new_tokens=4", "drift.turns=3", "drift.scripts=2",
                                "drift.max_new_tokens=6", f"output_file={output}"], config_name="evaluate"))
    written = json.loads(output.read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    assert set(HOLD_KEYS) <= set(written) and "persona_hold" in printed
    drift = written["drift"]
    # the held-out file has 1 user turn per chat, too few for 3 turns: the probes are chained
    assert drift["source"] == "probes" and drift["chats"] == 2 and drift["turns"] == 3
    assert [row["turn"] for row in drift["per_turn"]] == [1, 2, 3]
    lines = printed.splitlines()
    header = lines.index("persona drift: 2 chats x 3 turns (probes)")
    assert lines[header + 1].split() == ["turn", "think_leak_rate", "eos_rate", "address_rate", "self_name_rate",
                                         "language_rate", "simplified_rate", "avg_reply_chars"]
    assert [line.split()[0] for line in lines[header + 3: header + 6]] == ["1", "2", "3"]
    for chat in drift["transcripts"]:  # each turn's prompt holds the earlier turns: it only grows
        tokens = [turn["prompt_tokens"] for turn in chat["turns"]]
        assert len(tokens) == 3 and tokens[0] < tokens[1] < tokens[2]
        assert all(len(turn["checks"]) == 3 for turn in chat["turns"])  # the shipped probes are tagged
    for turn in drift["per_turn"]:  # a fraction of the 2 chats
        assert (turn["address_rate"] * 2).is_integer()
    expected = persona_hold(drift["per_turn"])
    assert {key: written[key] for key in HOLD_KEYS} == expected and results["persona_hold"] == expected["persona_hold"]
    assert written["probes_per_rate"] == {"address_rate": 2, "self_name_rate": 2, "language_rate": 2}
    assert not (smoke_run / "evaluation.json").exists()  # output_file was honoured; the shared run is untouched


def test_compare_shows_and_ranks_persona_hold(smoke_run, tmp_path, capsys):
    from lyra.compare import main

    sweep = tmp_path / "sweep"
    for job, hold in (("0", 0.25), ("1", 0.75), ("2", None)):
        job_dir = sweep / job
        job_dir.mkdir(parents=True)
        (job_dir / "metrics.json").write_text((smoke_run / "metrics.json").read_text(encoding="utf-8"), encoding="utf-8")
        if hold is not None:  # job 2 was never evaluated for drift
            (job_dir / "evaluation.json").write_text(json.dumps({"persona_hold": hold, "address_hold": 1.0,
                                                                 "self_name_hold": None}), encoding="utf-8")
    assert main([str(sweep), "--metric", "persona_hold", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[4] == "persona_hold" and "address_hold" in header and "self_name_hold" not in header
    ranked = [(line.split()[1], line.split()[4]) for line in lines[2:5]]
    assert ranked == [("1", "0.7500"), ("0", "0.2500"), ("2", "-")]  # maximized; unevaluated last
    csv_header = (tmp_path / "out" / "compare.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "persona_hold" in csv_header


def test_holds_go_to_the_runs_offline_wandb_summary(tmp_path):
    import wandb

    from lyra.tracking import update_run_summary

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    run = wandb.init(project="lyra-test", dir=str(run_dir), mode="offline", reinit="create_new", settings=settings)
    run_id = run.id
    run.summary.update({"train_loss": 1.5})
    run.finish()
    logger = OmegaConf.create({"logger": {"project": "lyra-test", "entity": None}})
    assert update_run_summary(run_dir, logger, {"persona_hold": 0.5, "self_name_hold": None}) is True
    assert update_run_summary(run_dir, OmegaConf.create({"logger": None}), {"persona_hold": 0.5}) is False
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(path.name == f"run-{run_id}.wandb" for path in files)  # one run, resumed
    summaries = []
    for path in files:
        out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(path)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        summaries.append(json.loads(out))
    assert all(record["run_id"] == run_id for record in summaries)
    later = next(record["summary"] for record in summaries if "persona_hold" in record["summary"])
    assert later["persona_hold"] == 0.5 and "self_name_hold" not in later
