"""Label masks, token by token, against the tokenizer's own chat template."""

from __future__ import annotations

from conftest import template_ids
from lyra.data.records import Conversation
from lyra.data.tokenization import IGNORE_INDEX, chat_prompt_ids, encode_conversation, with_system_prompt

SYSTEM = "你是萊拉。"
CHAT = Conversation("c1", [
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "主人您好！"},
    {"role": "user", "content": "我好累"},
    {"role": "assistant", "content": "主人辛苦了，萊拉陪您。"},
])



def test_one_example_per_assistant_turn_with_assistant_only_labels(tokenizer):
    examples = encode_conversation(CHAT, tokenizer, max_length=512, system_prompt=SYSTEM)
    assert len(examples) == 2
    messages = with_system_prompt(CHAT.messages, SYSTEM)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example, last in zip(examples, (2, 4)):
        # The sequence is exactly the template's rendering up to this turn's <|im_end|>.
        rendered = template_ids(tokenizer, messages[: last + 1])
        assert example["input_ids"] == rendered[: len(example["input_ids"])]
        assert example["input_ids"][-1] == im_end
        prompt = template_ids(tokenizer, messages[:last], add_generation_prompt=True)
        for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
            if position < len(prompt):
                assert label == IGNORE_INDEX, f"prompt token {tokenizer.decode([token])!r} is supervised"
            else:
                assert label == token
        reply = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        assert reply == messages[last]["content"] + "<|im_end|>"


def test_system_and_user_tokens_are_never_supervised(tokenizer):
    examples = encode_conversation(CHAT, tokenizer, max_length=512, system_prompt=SYSTEM)
    supervised = tokenizer.decode([t for t in examples[1]["labels"] if t != IGNORE_INDEX])
    assert "萊拉。" not in supervised.replace("萊拉陪您。", "")
    assert "我好累" not in supervised and "<think>" not in supervised and "<|im_start|>" not in supervised


def test_prompt_is_what_chat_feeds_the_model(tokenizer):
    examples = encode_conversation(CHAT, tokenizer, max_length=512, system_prompt=SYSTEM)
    messages = with_system_prompt(CHAT.messages, SYSTEM)
    prompt = chat_prompt_ids(messages[:4], tokenizer)
    assert examples[1]["input_ids"][: len(prompt)] == prompt
    assert examples[1]["labels"][len(prompt) - 1] == IGNORE_INDEX
    assert examples[1]["labels"][len(prompt)] != IGNORE_INDEX
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_conversation_system_message_wins_over_default(tokenizer):
    own = Conversation("c2", [{"role": "system", "content": "自訂"}, *CHAT.messages[:2]])
    example = encode_conversation(own, tokenizer, max_length=512, system_prompt=SYSTEM)[0]
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\n自訂<|im_end|>") and SYSTEM not in text


def test_turns_that_do_not_fit_are_dropped_whole(tokenizer):
    long_chat = Conversation("c3", [*CHAT.messages[:2], {"role": "user", "content": "再說一次"},
                                    {"role": "assistant", "content": "好" * 400}])
    from lyra.data.tokenization import EncodeStats

    stats = EncodeStats()
    examples = encode_conversation(long_chat, tokenizer, max_length=120, system_prompt=SYSTEM, stats=stats)
    assert len(examples) == 1 and stats.dropped_turns == 1 and stats.truncated_conversations == 1
    assert all(len(e["input_ids"]) <= 120 for e in examples)


def test_pad_and_eos_are_the_models_own(tokenizer):
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert len(tokenizer) == 151669  # no token was added
