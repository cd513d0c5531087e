"""lyra.export: the merged model loads without peft and computes what base + adapter computed.

One extra tiny training run with `quantization=none` (the smoke run is 4-bit, whose merge into the
unquantized base is deliberately not logit-identical). The same run checks that training-time
persona probes land in trainer_state.json and metrics.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, smoke_overrides
from lyra.generation import build_prompt_ids
from lyra.errors import UserError
from lyra.persona import PERSONA_METRICS
from lyra.export import export

# fp32 on CPU: merging reorders W x + s B A x into (W + s B A) x, a few ulps of difference
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """2 steps on a full-precision base, a high learning rate so the adapter visibly changes logits."""
    from lyra.data import corpus_file
    from lyra.train import train

    run_dir = tmp_path_factory.mktemp("plain-run")
    eval_file = tmp_path_factory.mktemp("plain-data") / "eval.jsonl"  # 2 conversations keep evaluation quick
    eval_file.write_text("".join(corpus_file("eval").read_text(encoding="utf-8").splitlines(True)[:2]), encoding="utf-8")
    train(compose(smoke_overrides(run_dir, "quantization=none", "trainer.max_steps=2", "trainer.eval_steps=2",
                                  "trainer.save_steps=2", "trainer.learning_rate=0.05", "eval.probes_every=1",
                                  f"data.eval_file={eval_file}")))
    return run_dir


@pytest.fixture(scope="module")
def merged(plain_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("export") / "lyra-merged"
    # fp32 on CPU even where a GPU would pick bf16: the comparison below is exact to LOGIT_ATOL
    export(compose([f"run_dir={plain_run}", f"output_dir={output_dir}", "dtype=float32", "device=cpu"],
                   config_name="export"))
    return output_dir


def test_training_probes_are_logged_at_evaluation_and_in_metrics(plain_run):
    history = json.loads((plain_run / "trainer_state.json").read_text())["log_history"]
    probes = [entry for entry in history if "probe/eos_rate" in entry]
    assert [entry["step"] for entry in probes] == [2]  # at the step-2 evaluation, not again at the end
    metrics = json.loads((plain_run / "metrics.json").read_text())
    assert all(0 <= metrics[key] <= 1 for key in PERSONA_METRICS if key != "avg_reply_chars")
    assert metrics["eos_rate"] == probes[0]["probe/eos_rate"]


def test_merged_model_loads_without_peft_and_matches_base_plus_adapter(plain_run, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lyra.runs import load_run

    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert not isinstance(model, PeftModel) and not hasattr(model, "peft_config")
    assert model.generation_config.eos_token_id == [151645, 151643] and model.config.use_cache is True

    run = load_run(plain_run, device="cpu", merge=False)
    assert isinstance(run.model, PeftModel)
    ids = torch.tensor([build_prompt_ids("我今天有點累", run.tokenizer, [("你好", "主人好")], run.system_prompt)])
    with torch.inference_mode():
        unmerged = run.model(input_ids=ids).logits
        standalone = model(input_ids=ids).logits
        with run.model.disable_adapter():
            base = run.model(input_ids=ids).logits
    assert (unmerged - standalone).abs().max() < LOGIT_ATOL
    assert (unmerged - base).abs().max() > 100 * LOGIT_ATOL  # the adapter matters, so equality means something

    tokenizer = AutoTokenizer.from_pretrained(merged)  # the run's system prompt is in the chat template
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True, return_dict=True,
                                          add_generation_prompt=True, enable_thinking=False)["input_ids"]
    assert list(plain) == build_prompt_ids("你好", run.tokenizer, system_prompt=run.system_prompt)
    own = [{"role": "system", "content": "別的角色"}, {"role": "user", "content": "你好"}]
    assert "萊拉" not in tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
    provenance = json.loads((merged / "lyra_export.json").read_text())
    assert provenance["run_dir"] == str(plain_run) and provenance["dtype"] == "float32"


def test_export_refuses_to_overwrite_or_to_merge_nothing(plain_run, merged):
    cases = [([f"output_dir={merged}"], f"output_dir: {merged} is not empty; choose another or pass overwrite=true"),
             ([f"output_dir={plain_run}"], f"output_dir: {plain_run} would overwrite the training run; choose a new directory"),
             ([f"output_dir={merged.parent / 'other'}", "adapter=none"],
              "adapter: export merges an adapter; adapter=none would only copy the base model")]
    for overrides, message in cases:
        with pytest.raises(UserError) as error:
            export(compose([f"run_dir={plain_run}", *overrides], config_name="export"))
        assert str(error.value) == message


def test_chat_serves_a_merged_model_with_the_exact_base_one_swap_away(plain_run):
    """A full-precision run is merged in memory for speed: same logits as PEFT, and adapter_disabled()
    gives back the base bit for bit (the saved weights, not W + BA - BA), again and again."""
    from peft import PeftModel

    from lyra.runs import load_run

    merged, peft = load_run(plain_run, device="cpu"), load_run(plain_run, device="cpu", merge=False)
    assert merged.merged and not isinstance(merged.model, PeftModel) and not peft.merged
    assert all(name.endswith("_proj.weight") for name in merged.base_weights)
    ids = torch.tensor([build_prompt_ids("我今天有點累", merged.tokenizer, None, merged.system_prompt)])
    with torch.inference_mode():
        adapted = merged.model(input_ids=ids).logits
        assert (adapted - peft.model(input_ids=ids).logits).abs().max() < LOGIT_ATOL
        with peft.model.disable_adapter():
            base = peft.model(input_ids=ids).logits
        for _ in range(2):
            with merged.adapter_disabled():
                assert torch.equal(merged.model(input_ids=ids).logits, base)
            assert torch.equal(merged.model(input_ids=ids).logits, adapted)


def test_web_compares_a_merged_run_with_the_exact_base(plain_run):
    """The web page's "adapter off" pane on a merged run answers exactly as the bare base run does."""
    from lyra.generation import generate_response
    from lyra.runs import load_run
    from lyra.web import Limits, WebChat

    greedy = {"do_sample": False, "repetition_penalty": 3.0, "max_new_tokens": 12}
    run, base = load_run(plain_run, device="cpu"), load_run(plain_run, adapter="none", device="cpu")
    chat = WebChat(run, greedy, Limits(max_input_chars=200, max_prompt_tokens=512, max_new_tokens_limit=64,
                                       max_queue_size=4))
    assert run.merged and chat.has_adapter
    base_reply = generate_response("你好", base.model, base.tokenizer, system_prompt=base.system_prompt, **greedy)
    adapted = generate_response("你好", run.model, run.tokenizer, system_prompt=run.system_prompt, **greedy)
    assert chat.reply("你好", adapter=False) == base_reply != adapted
    assert chat.reply("你好") == adapted  # the merged weights are back
