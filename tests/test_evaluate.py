"""lyra.evaluate and lyra.probes: persona metric definitions, probe files, the evaluation JSON, the training callback."""

from __future__ import annotations

import json
import math

import pytest

from conftest import compose
from lyra.errors import UserError
from lyra.evaluate import evaluate
from lyra.generation import Reply
from lyra.persona import PERSONA_METRICS, persona_metrics
from lyra.probes import PersonaProbeCallback, load_probes, validate_probes

ZH_PERSONA = {"name": "萊拉", "user_address": "主人", "language": "zh-TW"}


def test_persona_metrics_count_what_they_say():
    replies = [
        Reply(text="主人好，萊拉在這裡。", raw="<think>\n\n</think>\n\n主人好，萊拉在這裡。", ended_by_eos=True),
        Reply(text="我们今天去哪里？", raw="我们今天去哪里？", ended_by_eos=False),  # Simplified, cut off
        Reply(text="好的，主人", raw="好的，主人<think>未結束", ended_by_eos=True),
        Reply(text="台灣的皇后", raw="台灣的皇后", ended_by_eos=True),  # 台/后 are also Traditional
    ]
    metrics = persona_metrics(replies, ZH_PERSONA)
    assert metrics == {"think_leak_rate": 0.5, "eos_rate": 0.75, "address_rate": 0.5, "self_name_rate": 0.25,
                       "language_rate": 0.75, "simplified_rate": 0.25, "avg_reply_chars": (10 + 8 + 5 + 5) / 4}
    assert list(metrics) == list(PERSONA_METRICS)


def test_probe_file_problems_name_file_and_line(tmp_path):
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"id": "a", "prompt": "你好"}\n\n{"id": "b", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^eval.probes_file: {bad}:3: expected \{{\"id\", \"prompt\"\}}"):
        load_probes(bad)
    bad.write_text('{"id": "a", "prompt": "你好"}\n', encoding="utf-8")
    assert [(p.id, p.prompt) for p in load_probes(bad)] == [("a", "你好")]


@pytest.mark.parametrize("override, message", [
    ("eval.num_probes=0", "eval.num_probes: must be an integer >= 1 or null (all), got 0"),
    ("eval.probes_every=-1", "eval.probes_every: must be an integer >= 0 (0 = only at the end), got -1"),
    ("eval.generation.max_new_tokens=0", "eval.generation.max_new_tokens: must be an integer >= 1, got 0"),
    ("eval.probes_file=/no/such.jsonl", "eval.probes_file: file not found: /no/such.jsonl"),
])
def test_bad_eval_settings_fail_before_training(override, message):
    cfg = compose(["experiment=smoke", override])
    with pytest.raises(UserError) as error:
        validate_probes(cfg.eval, cfg.persona)
    assert str(error.value) == message
    validate_probes(compose(["experiment=smoke", "eval=none"]).get("eval"), cfg.persona)  # off: nothing to check


HELD_OUT = [
    {"id": "a", "conversations": [{"from": "user", "value": "早安"}, {"from": "assistant", "value": "主人早安！"}]},
    {"id": "b", "conversations": [{"from": "user", "value": "我好累"}, {"from": "assistant", "value": "主人辛苦了，萊拉幫您泡茶。"},
                                  {"from": "user", "value": "謝謝"}, {"from": "assistant", "value": "不客氣～"}]},
]


def test_evaluate_writes_metrics_json_and_prints_a_table(smoke_run, tmp_path, capsys):
    import torch

    from lyra.data.tokenization import encode_conversation
    from lyra.data.formats import load_conversations
    from lyra.runs import load_run

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in HELD_OUT), encoding="utf-8")
    output = tmp_path / "eval.json"
    results = evaluate(compose([f"run_dir={smoke_run}", f"eval_file={held_out}", "eval.num_probes=3",
                                "eval.generation.max_new_tokens=6", f"output_file={output}"], config_name="evaluate"))
    written = json.loads(output.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(results))
    for key in ("eval_loss", "perplexity", *PERSONA_METRICS):
        assert key in written
    for key in PERSONA_METRICS[:-1]:
        assert 0 <= written[key] <= 1 and (written[key] * 3).is_integer()  # a fraction of 3 probes
    assert written["num_probes"] == len(written["replies"]) == 3 and written["avg_reply_chars"] >= 0
    assert all("<think>" not in row["reply"] for row in written["replies"])
    assert written["perplexity"] == pytest.approx(math.exp(written["eval_loss"]))
    assert not (smoke_run / "evaluation.json").exists()  # output_file was honoured
    table = capsys.readouterr().out
    assert "eval_loss" in table and "simplified_rate" in table and str(output) in table

    # the loss is the mean NLL per supervised token, whatever the batching and padding
    run = load_run(smoke_run)
    total, tokens = 0.0, 0
    for conversation in load_conversations(held_out):
        for example in encode_conversation(conversation, run.tokenizer, 256, run.system_prompt):
            labels = torch.tensor([example["labels"]])
            with torch.inference_mode():
                loss = run.model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss
            n = int((labels[:, 1:] != -100).sum())
            total, tokens = total + float(loss) * n, tokens + n
    assert written["eval_examples"] == 3 and written["eval_tokens"] == tokens
    assert written["eval_loss"] == pytest.approx(total / tokens, rel=1e-4)


class RecordingRun:
    """Stands in for a wandb run: records what the callback logs."""

    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, data))


def test_probe_callback_logs_metrics_and_a_reply_table(smoke_run):
    import wandb
    from transformers import TrainerControl, TrainerState

    from lyra.runs import load_run

    run = load_run(smoke_run)
    eval_cfg = compose(["experiment=smoke", "eval.num_probes=2", "eval.probes_every=2",
                        "eval.generation.max_new_tokens=4"]).eval
    recorder = RecordingRun()
    callback = PersonaProbeCallback(eval_cfg, run.persona, run.system_prompt, recorder)
    state, control = TrainerState(global_step=4), TrainerControl()
    kwargs = {"model": run.model, "processing_class": run.tokenizer}
    callback.on_evaluate(None, state, control, **kwargs)  # 1st evaluation: skipped (every 2nd)
    assert recorder.logged == [] and callback.metrics == {}
    state.global_step = 8
    callback.on_evaluate(None, state, control, **kwargs)
    callback.on_train_end(None, state, control, **kwargs)  # step 8 already probed: no repeat
    assert len(recorder.logged) == 1
    step, data = recorder.logged[0]
    assert step == 8 and set(data) == {f"probe/{key}" for key in PERSONA_METRICS} | {"probe/replies"}
    table = data["probe/replies"]
    assert isinstance(table, wandb.Table) and table.columns == ["step", "id", "prompt", "reply", "ended_by_eos"]
    assert [row[2] for row in table.data] == [probe.prompt for probe in callback.probes] and len(table.data) == 2
    assert state.log_history[-1]["step"] == 8 and callback.metrics["eos_rate"] == data["probe/eos_rate"]
    assert not run.model.training


def test_compare_base_puts_the_bare_base_beside_the_adapter(smoke_run, tmp_path, capsys):
    """compare_base=true measures the same model with its adapter off; the base half equals adapter=none."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in HELD_OUT), encoding="utf-8")
    common = [f"run_dir={smoke_run}", f"eval_file={held_out}", "eval.num_probes=2", "eval.generation.max_new_tokens=4"]
    both = evaluate(compose([*common, "compare_base=true", f"output_file={tmp_path / 'both.json'}"],
                            config_name="evaluate"))
    table = capsys.readouterr().out
    bare = evaluate(compose([*common, "adapter=none", f"output_file={tmp_path / 'bare.json'}"], config_name="evaluate"))

    assert both["base"]["eval_loss"] == pytest.approx(bare["eval_loss"], rel=1e-5)
    assert [row["reply"] for row in both["base"]["replies"]] == [row["reply"] for row in bare["replies"]]
    assert both["eval_loss"] != both["base"]["eval_loss"]  # the adapter is back on after the comparison
    assert both["delta"]["eval_loss"] == pytest.approx(both["eval_loss"] - both["base"]["eval_loss"])
    assert set(both["delta"]) >= {"eval_loss", "perplexity", "eos_rate", "address_rate", "self_name_rate"}
    assert json.loads((tmp_path / "both.json").read_text(encoding="utf-8"))["base"]["eval_loss"] == both["base"]["eval_loss"]
    header = table.splitlines()[0].split()
    assert header == ["metric", "base", "trained", "delta"]


def test_compare_base_with_adapter_none_is_refused(smoke_run):
    with pytest.raises(UserError, match="^compare_base: adapter=none already evaluates the bare base"):
        evaluate(compose([f"run_dir={smoke_run}", "adapter=none", "compare_base=true"], config_name="evaluate"))
