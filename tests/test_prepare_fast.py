"""The first pass's encoder against the per-turn template path, record by record.

`encode_all` (what validate, stats and training use) renders the chat template once per shape and
fills the contents in (`TurnRenderer`), and tokenizes each piece between added tokens once
(`ChunkTokenizer`). `encode_conversation` is the reference: two template renders and two whole-text
tokenizations per turn (`encode_turn`). Both must give the same input ids and labels after the same
truncation, and fail on the same records, for Qwen3 and SmolLM2 (ChatML) alike: on the embedded
corpora, the fixtures (tools, odd orders, weight 0), and seeded random conversations with a system
prompt, an explicit empty one, none, and contents made to trip a template (padding whitespace,
think tags, special tokens, quotes, placeholders' own characters).

    python -m pytest -q tests/test_prepare_fast.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lyra.data import corpus_file
from lyra.data.formats import read_file
from lyra.data.prepare import Prepared, encode_all
from lyra.data.records import Conversation, FileReport
from lyra.data.tokenization import encode_conversation

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SYSTEM = "你是萊拉，主人的女僕。"
SEED = 20261207
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
CONTENTS = [
    "主人早安！今天想吃什麼呢？", "Hello, Master.", "好的", "Good night.",
    "一、洗衣服\n二、買菜",
    "  padded on both sides  ", "trailing newline\n", "\nleading newline", "I <3 you", "a > b", "x < y",
    "<think>\nhm\n</think>\n\nSure.", "</think>after", "<tool_response>\n{}\n</tool_response>",
    "ends with <|im_end|> inside", 'quote " and \\ backslash', "tab\there", "&amp; 'single'", "emoji 😀",
    "Q: starts with Q", "{{ not jinja }} {% raw %}", "\ue000 0 \ue001 placeholder characters", "",
]


def _random_conversation(rng: random.Random, number: int) -> Conversation:
    messages, tools = [], None
    opening = rng.random()
    if opening < 0.3:
        messages.append({"role": "system", "content": rng.choice(CONTENTS[:6] + [SYSTEM])})
    if rng.random() < 0.15:
        tools = TOOLS
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.05:
            messages.append({"role": "assistant", "content": rng.choice(CONTENTS)})  # an assistant turn opening
        elif kind < 0.1:
            messages.append({"role": "system", "content": rng.choice(CONTENTS)})  # a system turn in the middle
        elif kind < 0.2 and tools:
            messages += [{"role": "user", "content": rng.choice(CONTENTS)},
                         {"role": "assistant", "content": rng.choice(["", "Let me check."]),
                          "tool_calls": [{"type": "function", "function": {
                              "name": "get_weather", "arguments": {"city": rng.choice(["Taipei", "台北"])}}}]},
                         {"role": "tool", "content": rng.choice(['{"rain": true}', "晴", "<b>hot</b>"])}]
        else:
            messages.append({"role": "user", "content": rng.choice(CONTENTS)})
        reply = {"role": "assistant", "content": rng.choice(CONTENTS)}
        if rng.random() < 0.1:
            reply["weight"] = 0
        messages.append(reply)
        if rng.random() < 0.05:
            messages.append({"role": "assistant", "content": rng.choice(CONTENTS)})  # right after another reply
    return Conversation(f"random-{number}", messages, tools, no_system_prompt=opening > 0.85)


def random_conversations(count: int, seed: int = SEED) -> list[Conversation]:
    rng = random.Random(seed)
    return [_random_conversation(rng, number) for number in range(count)]


def assert_same_as_reference(conversations: list[Conversation], tokenizer, system_prompt: str | None,
                             max_lengths=(4096,)):
    """encode_all's examples (through Prepared.examples, what training gets) equal encode_conversation's."""
    turns, errors, counts = encode_all(conversations, tokenizer, system_prompt)
    failing = set()
    for index, conversation in enumerate(conversations):
        try:
            encode_conversation(conversation, tokenizer, 4096, system_prompt)
        except Exception:  # the reference raises where the first pass reports a problem
            failing.add(index)
    assert set(errors) == failing, {conversations[i].id: errors.get(i) for i in set(errors) ^ failing}
    kept = [index for index in range(len(conversations)) if index not in failing]
    prepared = Prepared(FileReport(Path(""), [conversations[i] for i in kept], []), [turns[i] for i in kept])
    for max_length in max_lengths:
        examples, stats = prepared.examples(max_length)
        reference = [example for index in kept
                     for example in encode_conversation(conversations[index], tokenizer, max_length, system_prompt)]
        assert len(examples) == len(reference) == stats.examples
        for example, expected in zip(examples, reference):
            assert example == expected
    return counts, len(kept)


def _lengths(conversations, tokenizer, system_prompt) -> list[int]:
    turns, _, _ = encode_all(conversations, tokenizer, system_prompt)
    return sorted(len(ids) for conversation in turns for ids, _ in conversation)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_the_chinese_corpus_encodes_as_turn_by_turn(tokenizer, split):
    conversations = read_file(corpus_file(split)).conversations
    lengths = _lengths(conversations, tokenizer, SYSTEM)
    truncating = (4096, lengths[len(lengths) // 2], lengths[len(lengths) // 10])  # none, half, most turns cut
    counts, _ = assert_same_as_reference(conversations, tokenizer, SYSTEM, truncating)
    assert counts.filled > 10 * counts.rendered and counts.refused == 0  # the fast path did the work


def test_the_english_corpus_encodes_as_turn_by_turn(tokenizer):
    path = Path(str(corpus_file("train"))).with_name("lyra_en_train.jsonl")
    counts, _ = assert_same_as_reference(read_file(path).conversations, tokenizer, "You are Lyra.", (4096, 100))
    assert counts.filled > 10 * counts.rendered


@pytest.mark.parametrize("name", ["openai_tools.jsonl", "sharegpt_toolcall.json", "odd_orders.jsonl",
                                  "openai_chat.jsonl", "alpaca_demo.json", "firefly.jsonl", "maid_labels.txt"])
def test_fixtures_encode_as_turn_by_turn(tokenizer, name):
    labels = {"主人": "user", "女僕": "assistant"} if name.endswith(".txt") else None
    conversations = read_file(FIXTURES / name, labels).conversations
    for system_prompt in (SYSTEM, None):
        assert_same_as_reference(conversations, tokenizer, system_prompt, (4096, 64))


@pytest.mark.parametrize("system_prompt", [SYSTEM, None, "  <b>padded</b> prompt\n"])
def test_random_conversations_encode_as_turn_by_turn(tokenizer, system_prompt):
    conversations = random_conversations(400)
    counts, kept = assert_same_as_reference(conversations, tokenizer, system_prompt, (4096, 80, 30))
    assert kept > 300 and counts.filled > counts.rendered > 0


def test_smollm2_chatml_encodes_as_turn_by_turn(smollm2_tokenizer):
    english = Path(str(corpus_file("train"))).with_name("lyra_en_train.jsonl")
    counts, _ = assert_same_as_reference(read_file(english).conversations, smollm2_tokenizer, "You are Lyra.",
                                         (4096, 100))
    assert counts.filled > 10 * counts.rendered
    for system_prompt in ("You are Lyra.", None):  # None: SmolLM2's template adds its own default system prompt
        assert_same_as_reference(random_conversations(200), smollm2_tokenizer, system_prompt, (4096, 60))
    assert_same_as_reference(read_file(FIXTURES / "odd_orders.jsonl").conversations, smollm2_tokenizer, SYSTEM)


def _with_template(template: str):
    from transformers import AutoTokenizer

    from lyra.modeling import qwen3_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())  # a fresh object: headers are cached per tokenizer
    tokenizer.chat_template = template
    return tokenizer


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + CONTENT + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_that_escapes_contents_is_rendered_whole():
    tokenizer = _with_template(CHATML.replace("CONTENT", "(message['content'] | tojson)"))
    counts, _ = assert_same_as_reference(random_conversations(150), tokenizer, SYSTEM)
    assert counts.refused > 0  # the probe's quotes and newlines come out escaped (shapes without contents still fill)


def test_a_template_that_reads_contents_is_caught_and_rendered_whole(monkeypatch, caplog):
    from lyra.data import tokenization

    # Only contents starting with "Q" render differently: the first conversation of a shape passes its checks.
    content = "message['content']"
    tokenizer = _with_template(CHATML.replace(
        "CONTENT", f"(('[question] ' + {content}) if {content}.startswith('Q') else {content})"))
    monkeypatch.setattr(tokenization, "FILL_CHECK_EVERY", 1)  # every filled text is checked
    counts, _ = assert_same_as_reference(random_conversations(150), tokenizer, SYSTEM)
    assert counts.filled == 0 and "renders a turn differently from the other turns of its shape" in caplog.text
