"""Reading conversation files: every malformed input is reported at its exact FILE:LINE, and the
seed, ShareGPT and OpenAI formats (.jsonl and .json) all normalise to the same conversations.

    python -m pytest tests/test_data_formats.py -q
"""

from __future__ import annotations

import json
import logging

import pytest

from lyra.data import Conversation, load_conversations, read_conversations
from lyra.data.__main__ import main as data_cli
from lyra.data.records import MAX_REPORTED_PROBLEMS
from lyra.data.txt import to_seed_record
from lyra.errors import UserError

GOOD = '{"id": "ok", "conversations": [{"from": "user", "value": "嗨"}, {"from": "assistant", "value": "主人好！"}]}'


def write_lines(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problem_lines(path) -> list[str]:
    return [str(problem) for problem in read_conversations(path)[1]]


MALFORMED = {
    "invalid_json": ('{"conversations": [{"from": "user", "value": "嗨"}',
                     "invalid JSON at column 50: Expecting ',' delimiter"),
    "not_an_object": ('["user", "嗨"]', "expected a JSON object, got an array"),
    "missing_conversations": ('{"id": 7, "dialog": []}', 'not a conversation shape lyra reads (keys: "dialog", "id"); '
                              'closest known format: seed/ShareGPT {"conversations": [{"from": "user"|"assistant"|"system", '
                              '"value": "..."}]}: put the turns in "conversations" as {"from": "user"|"assistant", '
                              '"value": TEXT}'),
    "conversation_not_a_list": ('{"conversations": {"from": "user", "value": "嗨"}}',
                                '"conversations" must be a list of messages, got an object'),
    "message_without_role": ('{"conversations": [{"value": "嗨"}, {"from": "assistant", "value": "好"}]}',
                             'message 1 has no role ("from" or "role")'),
    "message_without_value": ('{"conversations": [{"from": "user", "value": "嗨"}, {"from": "assistant"}]}',
                              'message 2 has no text ("value" or "content")'),
    "non_string_value": ('{"conversations": [{"from": "user", "value": 42}, {"from": "assistant", "value": "好"}]}',
                         'message 1 (user): "value" must be a string, got a number'),
    "unknown_role": ('{"conversations": [{"from": "bot", "value": "嗨"}, {"from": "assistant", "value": "好"}]}',
                     'message 1 has unknown role "bot" (expected one of system, user, assistant, human, gpt, tool, observation, '
                     'function, function_call)'),
    "empty_value": ('{"conversations": [{"from": "user", "value": "嗨"}, {"from": "assistant", "value": " \\t "}]}',
                    "message 2 (assistant) is empty"),
    "no_assistant_turn": ('{"conversations": [{"from": "system", "value": "你是萊拉"}, {"from": "user", "value": "嗨"}]}',
                          "conversation has no assistant turn (nothing to learn from)"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_line_is_reported_at_its_line(tmp_path, case):
    bad, message = MALFORMED[case]
    path = write_lines(tmp_path / "chats.jsonl", GOOD, "", GOOD, bad, GOOD)  # the bad record is line 4
    conversations, problems = read_conversations(path)
    assert [str(problem) for problem in problems] == [f"{path}:4: {message}"]
    assert len(conversations) == 3


def test_bytes_that_are_not_utf8_are_reported_at_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b'\n{"x": "caf\xe9"}\n')
    assert problem_lines(path) == [f"{path}:3: bytes that are not UTF-8 (0xe9 at column 11); it looks like CP1252: "
                                 "convert the file with `iconv -f CP1252 -t UTF-8 latin1.jsonl > latin1.utf8.jsonl`"]


@pytest.mark.parametrize("content", [b"", b"\n  \r\n\n", b"\xef\xbb\xbf"])
def test_an_empty_file_is_one_problem_at_line_1(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert problem_lines(path) == [f"{path}:1: empty file: no conversations"]


def test_bom_crlf_and_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\r\n\r\n{GOOD}\r\n[]\r\n".encode())
    conversations, problems = read_conversations(path)
    assert [c.messages for c in conversations] == [[{"role": "user", "content": "嗨"},
                                                    {"role": "assistant", "content": "主人好！"}]] * 2
    assert [str(p) for p in problems] == [f"{path}:4: expected a JSON object, got an array"]


def test_json_array_problems_point_at_the_element_line(tmp_path):
    path = write_lines(tmp_path / "chats.json", "[", f"  {GOOD},", '  {"conversations": [',
                       '    {"from": "user", "value": "嗨"}', "  ]}", "]")
    assert problem_lines(path) == [f"{path}:3: conversation has no assistant turn (nothing to learn from)"]
    broken = write_lines(tmp_path / "broken.json", "[", f"  {GOOD}", f"  {GOOD}", "]")
    assert problem_lines(broken) == [f"{broken}:3: invalid JSON at column 3: expected ',' or ']' between conversations"]


def test_a_pretty_printed_json_object_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(json.loads(GOOD), indent=2, ensure_ascii=False), encoding="utf-8")
    assert [c.id for c in load_conversations(path)] == ["ok"]
    saved_as = tmp_path / "one.jsonl"
    saved_as.write_text(json.dumps(json.loads(GOOD), indent=2), encoding="utf-8")
    assert problem_lines(saved_as) == [f"{saved_as}:1: this .jsonl holds one JSON object spanning 13 lines, not one "
                                       "object per line: rename it to one.json"]


MESSAGES = [{"role": "system", "content": "你是萊拉"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "主人好！"}, {"role": "user", "content": "再見"},
            {"role": "assistant", "content": "主人慢走～"}]
FORMATS = {
    "seed": lambda m: {"id": "c1", "conversations": [{"from": x["role"], "value": x["content"]} for x in m]},
    "sharegpt": lambda m: {"id": "c1", "conversations": [
        {"from": {"user": "human", "assistant": "gpt"}.get(x["role"], x["role"]), "value": x["content"]} for x in m]},
    "openai": lambda m: {"id": "c1", "messages": [{"role": x["role"], "content": x["content"]} for x in m]},
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_formats_round_trip_through_the_seed_format(tmp_path, name, suffix):
    record = FORMATS[name](MESSAGES)
    path = tmp_path / f"{name}{suffix}"
    path.write_text(json.dumps([record, record], ensure_ascii=False, indent=1) if suffix == ".json"
                    else f"{json.dumps(record, ensure_ascii=False)}\n" * 2, encoding="utf-8")
    conversations = load_conversations(path)
    assert conversations == [Conversation("c1", MESSAGES)] * 2
    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps(to_seed_record(c), ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    assert load_conversations(seed) == conversations


def test_openai_text_parts_are_joined(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]},
                           {"role": "assistant", "content": "主人好"}]}
    path = write_lines(tmp_path / "parts.jsonl", json.dumps(record, ensure_ascii=False))
    assert load_conversations(path)[0].messages[0] == {"role": "user", "content": "你好"}


def test_the_same_problem_on_many_records_is_one_line_with_a_count(tmp_path):
    bad = MALFORMED["unknown_role"][0]
    path = write_lines(tmp_path / "mixed.jsonl", GOOD, *[bad] * 25)
    with pytest.raises(UserError) as raised:
        load_conversations(path, key="data.train_file")
    lines = raised.value.message.splitlines()
    assert raised.value.key == "data.train_file"
    assert lines[0] == f"25 problem(s) in {path} (fix them or set data.on_invalid=skip):"
    assert lines[1].startswith(f"{path}:2: message 1 has unknown role")
    assert lines[1].endswith("(25 times: lines 2, 3, 4, ...)")
    assert len(lines) == 2


def test_on_invalid_error_lists_at_most_20_kinds_of_problem(tmp_path):
    kinds = [f'{{"conversations": [{{"from": "bot{"x" * n}", "value": "a"}}]}}' for n in range(25)]
    path = write_lines(tmp_path / "mixed.jsonl", GOOD, *kinds, *kinds)
    with pytest.raises(UserError) as raised:
        load_conversations(path, key="data.train_file")
    lines = raised.value.message.splitlines()
    assert len(lines) == 1 + MAX_REPORTED_PROBLEMS
    assert lines[1].endswith("(2 times: lines 2, 27)")
    assert lines[-1].startswith("... and 12 more problem(s) of 6 other kind(s)")


def test_on_invalid_skip_keeps_the_rest_and_reports_the_count(tmp_path, caplog):
    path = write_lines(tmp_path / "mixed.jsonl", GOOD, MALFORMED["empty_value"][0], GOOD, "{oops")
    with caplog.at_level(logging.WARNING, logger="lyra.data.formats"):
        conversations = load_conversations(path, on_invalid="skip")
    assert len(conversations) == 2
    assert f"skipped 2 invalid conversation(s) (data.on_invalid=skip), kept 2; first: {path}:2:" in caplog.text
    with pytest.raises(UserError, match="data.on_invalid: must be one of error, skip, got 'ignore'"):
        load_conversations(path, on_invalid="ignore")


def test_skip_with_nothing_usable_still_stops(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", "{oops")
    with pytest.raises(UserError, match="1 problem\\(s\\) in .* \\(no usable conversation\\)"):
        load_conversations(path, on_invalid="skip")


def test_training_counts_skipped_conversations(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from lyra.data import build_datasets

    path = write_lines(tmp_path / "mixed.jsonl", GOOD, "[]", GOOD)
    data_cfg = OmegaConf.create({"train_file": str(path), "eval_file": None, "on_invalid": "skip",
                                 "max_length": 128, "system_prompt": "你是萊拉"})
    splits = build_datasets(data_cfg, tokenizer)
    assert (len(splits.train), splits.eval, splits.skipped) == (2, None, 1)
    data_cfg.on_invalid = "error"
    with pytest.raises(UserError, match=f"{path}:2: expected a JSON object, got an array"):
        build_datasets(data_cfg, tokenizer)


def test_config_rejects_an_unknown_on_invalid():
    from conftest import compose

    from lyra.config import validate

    with pytest.raises(UserError, match="must be error or skip, got maybe"):
        validate(compose(["experiment=smoke", "data.on_invalid=maybe"]))


def test_validate_command_prints_every_problem_and_exits_1(tmp_path, capsys):
    good = write_lines(tmp_path / "good.jsonl", GOOD, GOOD)
    bad = write_lines(tmp_path / "bad.jsonl", GOOD, "{oops", MALFORMED["unknown_role"][0])
    assert data_cli(["validate", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok, 2 conversations, 2 assistant turns\n"
    assert data_cli(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{bad}:2: invalid JSON at column 2: Expecting property name enclosed in double quotes"
    assert out[1].startswith(f"{bad}:3: message 1 has unknown role")


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        data_cli(["validate", str(tmp_path / "missing.jsonl")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"lyra: error: file not found: {tmp_path / 'missing.jsonl'}\n"
    with pytest.raises(SystemExit) as exited:
        data_cli(["stats", str(write_lines(tmp_path / "a.jsonl", GOOD)), "--split", "eval"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("lyra: error: --split: selects a split of the embedded corpus; "
                                       "drop it when giving FILE\n")


def test_an_explicit_empty_system_prompt_trains_without_one(tmp_path, tokenizer, capsys):
    from omegaconf import OmegaConf

    from lyra.data import build_datasets

    turns = [{"from": "user", "value": "嗨"}, {"from": "assistant", "value": "主人好！"}]
    path = write_lines(tmp_path / "empty_system.jsonl",
                       json.dumps({"id": "top", "system": "", "conversations": turns}, ensure_ascii=False),
                       json.dumps({"id": "message", "messages": [{"role": "system", "content": ""},
                                                                 {"role": "user", "content": "嗨"},
                                                                 {"role": "assistant", "content": "主人好！"}]},
                                  ensure_ascii=False),
                       json.dumps({"id": "none", "conversations": turns}, ensure_ascii=False))
    conversations = load_conversations(path)
    assert [(c.id, c.no_system_prompt, c.messages[0]["role"]) for c in conversations] == [
        ("top", True, "user"), ("message", True, "user"), ("none", False, "user")]
    data_cfg = OmegaConf.create({"train_file": str(path), "eval_file": None, "on_invalid": "error",
                                 "max_length": 256, "system_prompt": "你是萊拉"})
    splits = build_datasets(data_cfg, tokenizer)
    assert splits.system_prompt_inserted == 1
    prompts = [tokenizer.decode(example["input_ids"]) for example in splits.train]
    assert ["你是萊拉" in prompt for prompt in prompts] == [False, False, True]
    assert data_cli(["validate", str(path), "--system-prompt", "你是萊拉"]) == 0
    err = capsys.readouterr().err
    assert "2 conversations with an explicit empty system prompt, kept without one" in err
    assert "data.system_prompt inserted into 1 of 3 conversation(s)" in err
