"""Real-world chat/SFT files: each trains as it is, or gets one clear FILE:LINE line, and nothing is lost silently.

The fixtures in tests/fixtures/data/ are shaped like public files (LLaMA-Factory's alpaca and glaive
tool-call demos, FastChat's dummy conversations, the OpenAI fine-tuning chat format, Firefly) but
written for lyra. For every fixture: if `validate` passes, `stats` and a 2-step smoke training pass;
if it fails, training (data.on_invalid=error) stops before loading the model, with the same lines.

    python -m pytest tests/test_data_realworld.py -q
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose, smoke_overrides
from lyra.data import build_datasets
from lyra.data.__main__ import main as data_cli
from lyra.data.formats import read_conversations, read_file
from lyra.data.prepare import prepare_file
from lyra.data.tokenization import IGNORE_INDEX, ChunkTokenizer, chat_prompt_ids, supervised_prefixes
from lyra.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SYSTEM = "You are helpful."

# fixture -> (conversations, supervised assistant turns)
VALID = {
    "alpaca_demo.json": (4, 6),
    "sharegpt_toolcall.json": (3, 5),
    "fastchat_dummy.json": (8, 12),
    "openai_chat.jsonl": (3, 3),
    "openai_tools.jsonl": (2, 4),
    "firefly.jsonl": (2, 3),
    "odd_orders.jsonl": (3, 5),
}
# fixture -> every line `validate` prints (FILE:LINE: message)
INVALID = {
    "broken_array.json": ["28: invalid JSON in this element (line 30, column 5: Expecting ',' delimiter); "
                          "the element is skipped, reading goes on after it"],
    "cp1252_line.jsonl": ["3: bytes that are not UTF-8 (0xe9 at column 50); it looks like CP1252: convert the file "
                          "with `iconv -f CP1252 -t UTF-8 cp1252_line.jsonl > cp1252_line.utf8.jsonl`"],
    "array_saved_as.jsonl": ["1: this .jsonl holds one JSON array spanning 28 lines, not one object per line: "
                             "rename it to array_saved_as.json"],
    "big5.jsonl": ["1: the file is not UTF-8 (2 of 2 lines); it looks like BIG5: convert the file with "
                   "`iconv -f BIG5 -t UTF-8 big5.jsonl > big5.utf8.jsonl`"],
    "gbk.jsonl": ["1: the file is not UTF-8 (2 of 2 lines); it looks like GBK: convert the file with "
                  "`iconv -f GBK -t UTF-8 gbk.jsonl > gbk.utf8.jsonl`"],
    "unsupported.jsonl": [
        '1: "images": images are not supported (lyra trains text-only chat); drop the field or the record',
        '2: message 1 (user): content part of type "image_url" is not supported (text only); remove the part or '
        "the record",
        '3: message 2 (assistant) has "reasoning_content": lyra trains replies without reasoning '
        "(enable_thinking=False); remove the field, or move what should be said into the reply"],
    "maid_labels.txt": [
        "1: unknown role label \"主人\"; map it to user or assistant: --label 主人=user for python -m lyra.data, "
        "data.labels='{主人: user}' for training (2 times: lines 1, 4)",
        "2: \"女僕:\" starts like a speaker label that maps to no role; map it: --label 女僕=user for python -m "
        "lyra.data, data.labels='{女僕: user}' for training (or assistant, for the character to train), or indent "
        "the line if it continues the previous message (2 times: lines 2, 5)"],
}


def test_every_fixture_is_listed():
    assert not set(VALID) & set(INVALID)
    assert {p.name for p in FIXTURES.iterdir()} == set(VALID) | set(INVALID)


def _data_cfg(path: Path, on_invalid: str = "error", **extra) -> OmegaConf:
    return OmegaConf.create({"train_file": str(path), "eval_file": None, "on_invalid": on_invalid,
                             "max_length": 1024, "system_prompt": SYSTEM, "labels": {}, **extra})


def _supervised(example: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_valid_fixture_validates_gives_stats_and_trains_two_steps(name, tmp_path, capsys):
    from lyra.train import train

    path = FIXTURES / name
    conversations, turns = VALID[name]
    assert data_cli(["validate", str(path), "--system-prompt", SYSTEM]) == 0
    assert capsys.readouterr().out == f"{path}: ok, {conversations} conversations, {turns} assistant turns\n"
    assert data_cli(["stats", str(path), "--json", "--system-prompt", SYSTEM, "--max-length", "1024"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["conversations"], stats["skipped_invalid"]) == (conversations, 0)
    assert stats["example_tokens"]["max"] > 0
    metrics = train(compose(smoke_overrides(
        tmp_path, "data=jsonl", f"data.train_file={path}", "data.max_length=1024", "trainer.max_steps=2",
        "eval=none", "trainer.save_strategy=no", "trainer.eval_strategy=no")))
    assert metrics["global_step"] == 2 and metrics["skipped_conversations"] == 0
    assert metrics["train_examples"] == turns


@pytest.mark.parametrize("name", sorted(INVALID))
def test_an_invalid_fixture_stops_training_before_the_model_with_the_validate_lines(name, tmp_path, capsys,
                                                                                  monkeypatch):
    import lyra.train as train_module

    path = FIXTURES / name
    expected = [f"{path}:{line}" for line in INVALID[name]]
    assert data_cli(["validate", str(path), "--system-prompt", SYSTEM]) == 1
    assert capsys.readouterr().out.splitlines() == expected

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the data is invalid")

    monkeypatch.setattr(train_module, "build_model", no_model)
    with pytest.raises(UserError) as raised:
        train_module.train(compose(smoke_overrides(tmp_path, "data=jsonl", f"data.train_file={path}")))
    assert raised.value.key == "data.train_file"
    assert raised.value.message.splitlines()[1:] == expected


@pytest.mark.parametrize(("name", "kept", "skipped"), [("broken_array.json", 5, 1), ("cp1252_line.jsonl", 4, 1),
                                                       ("unsupported.jsonl", 1, 3)])
def test_damage_costs_only_the_damaged_record_and_counts_are_true(name, kept, skipped, tokenizer):
    splits = build_datasets(_data_cfg(FIXTURES / name, on_invalid="skip"), tokenizer)
    assert (splits.train_stats.conversations, splits.skipped) == (kept, skipped)


def test_a_broken_element_of_a_one_line_array_costs_that_element_only(tmp_path):
    good = '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}'
    path = tmp_path / "one_line.json"
    broken = '{"conversations": [{"from": "human" "value": "x"}, {"from": "gpt", "value": "y"}]}'
    path.write_text(f"[{good}, {broken}, {good}, {good}]")
    conversations, problems = read_conversations(path)
    assert len(conversations) == 3 and len(problems) == 1 and problems[0].drops == 1


def test_a_missing_comma_between_elements_is_reported_and_loses_nothing(tmp_path):
    good = '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}'
    path = tmp_path / "slip.json"
    path.write_text(f"[\n  {good},\n  {good}\n  {good}\n]\n")
    report = read_file(path)
    assert len(report.conversations) == 3
    assert [str(p) for p in report.problems] == [f"{path}:4: invalid JSON at column 3: expected ',' or ']' "
                                                 "between conversations"]
    assert report.skipped == 0


def test_tool_calls_are_supervised_and_tool_results_are_not(tokenizer):
    prepared = prepare_file(FIXTURES / "openai_tools.jsonl", tokenizer, SYSTEM)
    examples, _ = prepared.examples(4096)
    supervised = [_supervised(example, tokenizer) for example in examples]
    assert supervised == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Taipei"}}\n</tool_call><|im_end|>',
        "Yes, it is raining in Taipei, about 24°C.<|im_end|>",
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "Paris is dry; Rome is rainy.<|im_end|>"]
    prompt = tokenizer.decode(examples[1]["input_ids"])
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt  # tools= reached the template
    assert "<tool_response>\n{\"rain\": true, \"temp_c\": 24}\n</tool_response>" in prompt


def test_sharegpt_function_call_and_top_level_system(tokenizer):
    conversations, problems = read_conversations(FIXTURES / "sharegpt_toolcall.json")
    assert problems == []
    first, no_tools, with_system = conversations
    assert [m["role"] for m in first.messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert first.messages[1]["tool_calls"] == [{"type": "function", "function": {
        "name": "get_area", "arguments": {"width": 3, "height": 4}}}]
    assert first.tools[0]["function"]["name"] == "get_area" and no_tools.tools is None
    assert with_system.messages[0] == {"role": "system", "content": "You are a geometry helper. Answer briefly."}
    examples, _ = prepare_file(FIXTURES / "sharegpt_toolcall.json", tokenizer, SYSTEM).examples(4096)
    assert "You are a geometry helper." in tokenizer.decode(examples[-1]["input_ids"])
    assert SYSTEM not in tokenizer.decode(examples[-1]["input_ids"])  # the file's own system wins


def test_alpaca_history_input_and_system():
    conversations, _ = read_conversations(FIXTURES / "alpaca_demo.json")
    assert conversations[1].messages == [{"role": "user", "content": "Rewrite the sentence in the past tense.\n"
                                                                     "She walks to the market."},
                                         {"role": "assistant", "content": "She walked to the market."}]
    assert [m["role"] for m in conversations[3].messages] == ["system"] + ["user", "assistant"] * 3


def test_weight_zero_turns_are_context_only(tokenizer):
    prepared = prepare_file(FIXTURES / "openai_chat.jsonl", tokenizer, SYSTEM)
    examples, _ = prepared.examples(4096)
    assert [_supervised(e, tokenizer) for e in examples] == [
        "Tokyo! Big, bright and full of trains.<|im_end|>", "Eight wonderful wiggly legs!<|im_end|>",
        "Honey never spoils.<|im_end|>"]
    assert "Eight<|im_end|>" in tokenizer.decode(examples[1]["input_ids"])  # still in the context


def test_the_three_odd_orders_train_on_the_prompt_chat_feeds(tokenizer):
    prepared = prepare_file(FIXTURES / "odd_orders.jsonl", tokenizer, SYSTEM)
    assert prepared.problems == []
    for conversation, turns in zip(prepared.conversations, prepared.turns):
        for history, (input_ids, prompt_length) in zip(supervised_prefixes(conversation, SYSTEM), turns):
            assert input_ids[:prompt_length] == chat_prompt_ids(history[:-1], tokenizer)
            assert tokenizer.decode(input_ids[prompt_length:]) == history[-1]["content"] + "<|im_end|>"


def test_an_opening_assistant_turn_without_any_system_prompt_is_one_line(tokenizer, tmp_path):
    path = tmp_path / "opening.jsonl"
    path.write_text('{"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "yo"}, '
                    '{"from": "gpt", "value": "hey"}]}\n')
    problems = [str(p) for p in prepare_file(path, tokenizer, None).problems]
    assert problems == [f"{path}:1: message 1 (assistant): the conversation opens with an assistant turn and has no "
                        "system prompt, so there is no prompt to answer: add the user turn it answers, or set a "
                        "system prompt"]


def test_system_prompt_ignored_fields_and_duplicates_are_said(tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lyra.data"):
        splits = build_datasets(_data_cfg(FIXTURES / "firefly.jsonl"), tokenizer)
    assert splits.system_prompt_inserted == 2
    assert caplog.text.count("ignored field(s)") == 1  # once per file
    assert '"category" (2), "conversation_id" (2), "dataset" (2)' in caplog.text
    assert "data.system_prompt inserted into 2 of 2 conversation(s)" in caplog.text
    assert "repeat another reply" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lyra.data"):
        build_datasets(_data_cfg(FIXTURES / "fastchat_dummy.json"), tokenizer)
    assert "fastchat_dummy.json: 9 of 12 assistant replies (75%) repeat another reply" in caplog.text


def test_txt_labels_are_mapped_by_data_labels(tokenizer):
    cfg = _data_cfg(FIXTURES / "maid_labels.txt", labels={"主人": "user", "女僕": "assistant"})
    assert build_datasets(cfg, tokenizer).train_stats.conversations == 2
    with pytest.raises(UserError, match="data.labels: 主人=boss: the role must be one of system, user, assistant"):
        build_datasets(_data_cfg(FIXTURES / "maid_labels.txt", labels={"主人": "boss"}), tokenizer)


def test_tokenized_data_is_cached_per_file_tokenizer_and_system_prompt(tokenizer, tmp_path):
    path = FIXTURES / "openai_tools.jsonl"
    first = prepare_file(path, tokenizer, SYSTEM, cache_dir=tmp_path)
    again = prepare_file(path, tokenizer, SYSTEM, cache_dir=tmp_path)
    other_prompt = prepare_file(path, tokenizer, "Another prompt.", cache_dir=tmp_path)
    assert (first.from_cache, again.from_cache, other_prompt.from_cache) == (False, True, False)
    assert again.turns == first.turns and again.problems == first.problems
    assert len(list((tmp_path / "tokenized").glob("*.npz"))) == 2
    copy = tmp_path / "edited.jsonl"
    copy.write_bytes(path.read_bytes().replace(b"Taipei?", b"Tainan?"))
    assert not prepare_file(copy, tokenizer, SYSTEM, cache_dir=tmp_path).from_cache  # contents, not the name


def test_chunk_tokenizer_matches_whole_text_tokenization(tokenizer):
    from lyra.data import corpus_file
    from lyra.data.tokenization import turn_texts

    conversations, _ = read_conversations(corpus_file("eval"))
    texts = [text for c in conversations[:40] for history in supervised_prefixes(c, SYSTEM)
             for text in turn_texts(history, tokenizer)]
    chunks = ChunkTokenizer(tokenizer)
    assert chunks.encode(texts) == [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert chunks.exact is True


def test_the_training_dataset_is_the_examples(tokenizer):
    from datasets import Dataset

    prepared = prepare_file(FIXTURES / "alpaca_demo.json", tokenizer, SYSTEM)
    longest = max(len(ids) for turns in prepared.turns for ids, _ in turns)
    for max_length in (4096, longest - 1, 8):
        dataset, stats = prepared.dataset(max_length)
        examples, expected_stats = prepared.examples(max_length)
        assert stats == expected_stats
        assert [dict(row) for row in dataset] == [dict(row) for row in Dataset.from_list(examples)] if examples \
            else len(dataset) == 0
