"""The txt transcript format and `convert_txt_to_jsonl`: labels, continuation lines, comments,
ids, problems at exact lines, and atomic output.

    python -m pytest tests/test_data_txt.py -q
"""

from __future__ import annotations

import json

import pytest

from lyra.data import convert_txt_to_jsonl, read_conversations
from lyra.data.__main__ import main as data_cli
from lyra.errors import UserError

# A transcript as the seed project kept it: 您 for the user, 模型 for the model, full-width colons.
SEED_TRANSCRIPT = """\
您：你好
模型：主人您好～萊拉今天也精神飽滿地在這裡等您喔！

您：我今天好累
模型：主人辛苦了……先坐下來喝杯溫水吧。
萊拉陪著您，想說說今天發生什麼事嗎？
您：工作做不完
模型：做不完的工作明天還會在，但主人的身體只有一個呢。
"""
SEED_EXPECTED = [
    {"id": "seed-0001", "conversations": [
        {"from": "user", "value": "你好"},
        {"from": "assistant", "value": "主人您好～萊拉今天也精神飽滿地在這裡等您喔！"}]},
    {"id": "seed-0002", "conversations": [
        {"from": "user", "value": "我今天好累"},
        {"from": "assistant", "value": "主人辛苦了……先坐下來喝杯溫水吧。\n萊拉陪著您，想說說今天發生什麼事嗎？"},
        {"from": "user", "value": "工作做不完"},
        {"from": "assistant", "value": "做不完的工作明天還會在，但主人的身體只有一個呢。"}]},
]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_seed_transcript_converts_exactly(tmp_path):
    source = tmp_path / "seed.txt"
    source.write_text(SEED_TRANSCRIPT, encoding="utf-8")
    assert convert_txt_to_jsonl(source, tmp_path / "seed.jsonl") == 2
    assert read_jsonl(tmp_path / "seed.jsonl") == SEED_EXPECTED
    assert (tmp_path / "seed.jsonl").read_text(encoding="utf-8").count("\n") == 2  # one line per conversation


def test_every_label_colon_comment_and_id(tmp_path):
    source = tmp_path / "labels.txt"
    source.write_bytes("\ufeff# a comment before anything\r\n"
                       "# id: greeting\r\n"
                       "系統：你是萊拉\r\n"
                       "使用者: 早安\r\n"
                       "# a comment inside a conversation does not split it\r\n"
                       "LYRA : 主人早安！\r\n"
                       "  \r\n\r\n"
                       "System: be kind\r\n"
                       "USER：hi\r\n"
                       "Assistant:\r\n"
                       "第一行\r\n"
                       "  注意：這行不是標籤（縮排：接續上一句）\r\n"
                       "\r\n"
                       "user: 你是誰\r\n"
                       "萊拉：萊拉是女僕助理。\r\n".encode())
    convert_txt_to_jsonl(source, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": "greeting", "conversations": [{"from": "system", "value": "你是萊拉"},
                                             {"from": "user", "value": "早安"},
                                             {"from": "assistant", "value": "主人早安！"}]},
        {"id": "labels-0002", "conversations": [{"from": "system", "value": "be kind"},
                                                {"from": "user", "value": "hi"},
                                                {"from": "assistant", "value": "第一行\n  注意：這行不是標籤（縮排：接續上一句）"}]},
        {"id": "labels-0003", "conversations": [{"from": "user", "value": "你是誰"},
                                                {"from": "assistant", "value": "萊拉是女僕助理。"}]},
    ]


def test_extra_labels_from_the_cli(tmp_path, capsys):
    source = tmp_path / "maid.txt"
    source.write_text("主人：泡茶\n女僕：馬上來！\n", encoding="utf-8")
    assert data_cli(["convert", str(source), str(tmp_path / "maid.jsonl"),
                     "--label", "主人=user", "--label", "女僕=assistant"]) == 0
    assert capsys.readouterr().out == f"wrote 1 conversations to {tmp_path / 'maid.jsonl'}\n"
    assert read_jsonl(tmp_path / "maid.jsonl")[0]["conversations"] == [{"from": "user", "value": "泡茶"},
                                                                       {"from": "assistant", "value": "馬上來！"}]
    with pytest.raises(UserError, match="女僕=maid: the role must be one of system, user, assistant"):
        convert_txt_to_jsonl(source, tmp_path / "x.jsonl", labels={"女僕": "maid"})


def test_problems_are_listed_at_their_lines_and_nothing_is_written(tmp_path):
    source = tmp_path / "broken.txt"
    source.write_text("您：嗨\n萊拉：主人好\n\n"           # 1-2 fine
                      "沒有標籤的一行\n萊拉：好\n\n"       # 4: text before any label
                      "您：只有問題\n\n"                   # 7: no assistant turn
                      "您：空的回覆\n萊拉：\n\n"           # 10: empty assistant message
                      "# id: twice\n您：a\n萊拉：b\n\n# id: twice\n您：c\n萊拉：d\n",  # 17: duplicate id
                      encoding="utf-8")
    target = tmp_path / "out.jsonl"
    target.write_text("previous content\n", encoding="utf-8")
    with pytest.raises(UserError) as raised:
        convert_txt_to_jsonl(source, target)
    assert raised.value.message.splitlines() == [
        f"4 problem(s) in {source}, nothing written:",
        f"{source}:4: text before any role label; start a message with a label such as user: or assistant: "
        "(or map your own label: --label LABEL=user for python -m lyra.data, data.labels='{LABEL: user}' for training)",
        f"{source}:7: conversation has no assistant turn (nothing to learn from)",
        f"{source}:10: empty assistant message",
        f"{source}:17: duplicate id 'twice' (first used on line 13)",
    ]
    assert target.read_text(encoding="utf-8") == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.txt", "out.jsonl"]


def test_a_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    source = tmp_path / "seed.txt"
    source.write_text(SEED_TRANSCRIPT, encoding="utf-8")
    target = tmp_path / "out.jsonl"
    target.write_text("previous content\n", encoding="utf-8")
    real_dumps, calls = json.dumps, []

    def dumps_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first line is already in the temp file
            raise OSError("disk full")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr("lyra.data.txt.json.dumps", dumps_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert_txt_to_jsonl(source, target)
    assert target.read_text(encoding="utf-8") == "previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "seed.txt"]


def test_txt_files_are_read_and_validated_like_jsonl(tmp_path, capsys):
    source = tmp_path / "chat.txt"
    source.write_text(SEED_TRANSCRIPT + "\n您：最後一句沒有回覆\n", encoding="utf-8")
    conversations, problems = read_conversations(source)
    assert [c.assistant_turns for c in conversations] == [1, 2]
    assert [str(p) for p in problems] == [f"{source}:10: conversation has no assistant turn (nothing to learn from)"]
    broken = tmp_path / "broken.txt"
    broken.write_text("前言\n萊拉：好\n\n您：嗨\n萊拉：主人好\n", encoding="utf-8")
    assert [c.id for c in read_conversations(broken)[0]] == ["broken-0002"]  # the broken one is left out
    assert data_cli(["validate", str(source)]) == 1
    assert capsys.readouterr().out.startswith(f"{source}:10: ")


def test_an_unmapped_speaker_in_the_middle_of_a_conversation_is_an_error_at_its_line(tmp_path, capsys):
    source = tmp_path / "intruder.txt"
    source.write_text("user: 早安\n"
                      "assistant: 主人早安！\n"
                      "user: 今天要做什麼？\n"
                      "Bob: I am an intruder\n"                  # 4: glued onto nothing, reported here
                      "assistant: 先喝茶吧。\n"
                      "  Note: an indented line continues the reply\n"
                      "\n"
                      "user: 再見\n"
                      "assistant: 主人慢走～\n", encoding="utf-8")
    conversations, problems = read_conversations(source)
    assert [str(p) for p in problems] == [
        f'{source}:4: "Bob:" starts like a speaker label that maps to no role; map it: --label Bob=user for '
        "python -m lyra.data, data.labels='{Bob: user}' for training (or assistant, for the character to train), "
        "or indent the line if it continues the previous message"]
    assert [c.messages[-1]["content"] for c in conversations] == ["主人慢走～"]  # the damaged one is left out
    assert data_cli(["validate", str(source)]) == 1
    assert capsys.readouterr().out.startswith(f"{source}:4: ")
    conversations, problems = read_conversations(source, labels={"Bob": "user"})
    assert not problems and conversations[0].messages[3] == {"role": "user", "content": "I am an intruder"}
    assert conversations[0].messages[4]["content"] == "先喝茶吧。\n  Note: an indented line continues the reply"


def test_prose_with_a_colon_is_not_a_speaker(tmp_path):
    source = tmp_path / "prose.txt"
    source.write_text("user: 幾點了？\n"
                      "assistant: 比例是 3:1，網址是\n"
                      "https://example.com/a:b\n"
                      "Note that the ratio is 3:1.\n"
                      "If you can, try this: breathe.\n", encoding="utf-8")
    conversations, problems = read_conversations(source)
    assert not problems and conversations[0].assistant_turns == 1


def test_start_separators_begin_a_new_conversation(tmp_path):
    source = tmp_path / "examples.txt"
    source.write_text("<START>\nuser: 嗨\nassistant: 主人好\n<START>\nuser: 再見\nassistant: 慢走\n", encoding="utf-8")
    conversations, problems = read_conversations(source)
    assert not problems
    assert [[m["content"] for m in c.messages] for c in conversations] == [["嗨", "主人好"], ["再見", "慢走"]]
