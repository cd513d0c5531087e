"""`python -m lyra.data stats` and truncation: counts, duplicates, token lengths, and proof that
truncation drops whole trailing turns and never cuts inside an assistant reply.

    python -m pytest tests/test_data_stats.py -q
"""

from __future__ import annotations

import json

from lyra.data import Conversation, corpus_file, load_conversations
from lyra.data.__main__ import main as data_cli
from lyra.data.stats import corpus_stats, example_lengths, training_defaults
from lyra.data.tokenization import IGNORE_INDEX, encode_conversation

SYSTEM = "你是萊拉"
LONG_REPLY = "萊拉把整理房間的步驟一項一項說清楚：" + "先把地上的東西收進籃子，再擦桌子，最後吸地。" * 8


def conversation() -> Conversation:
    return Conversation("c", [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "主人好！"},
                              {"role": "user", "content": "教我整理房間"}, {"role": "assistant", "content": LONG_REPLY},
                              {"role": "user", "content": "謝謝"}, {"role": "assistant", "content": "不客氣～"}])


def supervised_text(example: dict, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_truncation_drops_whole_trailing_turns(tokenizer):
    first, second, third = example_lengths(conversation(), tokenizer, SYSTEM)
    assert first < second < third
    max_length = second - 1  # the long second reply does not fit, so it and everything after go
    examples = encode_conversation(conversation(), tokenizer, max_length, SYSTEM)
    assert [supervised_text(e, tokenizer) for e in examples] == ["主人好！<|im_end|>"]
    stats = corpus_stats([conversation()], tokenizer, max_length, SYSTEM)
    assert stats["over_max_length"] == {"conversations": 1, "dropped_assistant_turns": 2, "kept_assistant_turns": 1,
                                        "conversations_dropped_entirely": 0}
    assert stats["example_tokens"]["max"] == third
    nothing_fits = corpus_stats([conversation()], tokenizer, first - 1, SYSTEM)["over_max_length"]
    assert (nothing_fits["dropped_assistant_turns"], nothing_fits["conversations_dropped_entirely"]) == (3, 1)
    assert corpus_stats([conversation()], tokenizer, third, SYSTEM)["over_max_length"]["conversations"] == 0


def test_truncation_never_splits_a_reply_of_the_eval_corpus(tokenizer):
    max_length = 160  # below the corpus p95, so many turns are dropped
    for item in load_conversations(corpus_file("eval")):
        replies = [m["content"] for m in item.messages if m["role"] == "assistant"]
        examples = encode_conversation(item, tokenizer, max_length, SYSTEM)
        assert all(len(e["input_ids"]) <= max_length for e in examples)
        assert [supervised_text(e, tokenizer) for e in examples] == [r + "<|im_end|>" for r in replies[: len(examples)]]


def test_stats_command_json(tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"from": "user", "value": "嗨"}, {"from": "assistant", "value": "主人好！"},
                               {"from": "user", "value": "再一次"}, {"from": "assistant", "value": "主人好！"}]},
            {"messages": [{"role": "system", "content": "你是萊拉"}, {"role": "user", "content": "嗨"},
                          {"role": "assistant", "content": "萊拉在這裡。"}]},
            {"conversations": "broken"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert data_cli(["stats", str(path), "--json", "--max-length", "4096"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: stats[k] for k in ("conversations", "assistant_turns", "multi_turn", "roles",
                                  "duplicate_assistant_replies", "duplicate_user_messages", "skipped_invalid")} == {
        "conversations": 2, "assistant_turns": 3, "multi_turn": 1,
        "roles": {"system": 1, "user": 3, "assistant": 3},
        "duplicate_assistant_replies": 1, "duplicate_user_messages": 1, "skipped_invalid": 1}
    assert stats["max_length"] == 4096 and stats["over_max_length"]["conversations"] == 0
    assert 0 < stats["example_tokens"]["p50"] <= stats["example_tokens"]["p95"] <= stats["example_tokens"]["max"]


def test_stats_command_reports_the_embedded_eval_split(capsys):
    assert data_cli(["stats", "--split", "eval", "--max-length", "150"]) == 0
    out = capsys.readouterr().out
    conversations = load_conversations(corpus_file("eval"))
    assert out.startswith("lyra_eval.jsonl (embedded default-persona corpus, eval split)\n")
    assert f"conversations            {len(conversations)}\n" in out
    assert "  over max_length=150     " in out and "whole trailing assistant turn(s), never cutting inside a reply" in out
    assert training_defaults()[0] == 1024  # the default matches conf/data/jsonl.yaml (data=persona extends it)
