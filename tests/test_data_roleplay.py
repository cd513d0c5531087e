"""Role-play chat logs train as they are: SillyTavern, PIPPA, text-generation-webui, ChatHaruhi, RoleBench,
speaker dialogues and OpenAI names, each through `validate` => `stats` => a 2-step training; and files
that are not conversations (cards, images, archives, near-miss shapes) are refused in a few lines that
name the closest format.

The fixtures in tests/fixtures/roleplay/ are written for lyra, shaped after the public files (a
SillyTavern chat export, PygmalionAI's PIPPA, a text-generation-webui log, ChatHaruhi, RoleLLM's RoleBench).

    python -m pytest tests/test_data_roleplay.py -q
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

import pytest

from conftest import compose, smoke_overrides
from lyra.data.__main__ import main as data_cli
from lyra.data.dialects import RECORD_DIALECTS
from lyra.data.formats import read_file
from lyra.data.records import MAX_REPORTED_PROBLEMS

FIXTURES = Path(__file__).parent / "fixtures" / "roleplay"
SYSTEM = "You are a character in a story."
LABELS = {
    "chatharuhi_dialogue.jsonl": {"春日": "assistant", "阿虛": "user", "長門": "user", "旁白": "system"},
    "speaker_dialogue.jsonl": {"Detective Hale": "user", "Rook": "assistant"},
    "sillytavern_group.jsonl": {"Tomas": "user"},
    "openai_names.jsonl": {"Wren": "user", "Tomas": "user", "Mira": "assistant"},
}
# fixture -> (conversations, trained assistant turns, what validate must say it left out or added)
EXPECTED = {
    "sillytavern_chat.jsonl": (1, 3, ["3 alternative swipes not trained", "1 hidden (is_system) SillyTavern messages "
                                      "skipped", "1 narrator messages kept as system turns",
                                      '"message.extra.reasoning" (1)']),
    "sillytavern_unused.jsonl": (1, 2, ["2 alternative swipes not trained", "1 greetings kept"]),
    "sillytavern_group.jsonl": (1, 2, ["2 messages prefixed with their speaker's name"]),
    "pippa.jsonl": (2, 5, ["1 empty messages skipped", '"bot_greeting" (2)']),
    "webui_history.json": (1, 3, ["1 greetings kept as an opening assistant turn", '"visible" (1)']),
    "webui_history_old.json": (1, 3, ["1 greetings kept", '"data_visible" (1)']),
    "chatharuhi_dialogue.jsonl": (2, 3, ["2 messages prefixed with their speaker's name"]),
    "speaker_dialogue.jsonl": (1, 1, []),
    "rolebench.jsonl": (2, 2, ["2 alternative answers not trained"]),
    "chatharuhi_pairs.jsonl": (2, 2, []),
    "openai_names.jsonl": (1, 1, ["2 messages prefixed with their speaker's name"]),
}


def test_every_fixture_is_listed():
    assert {path.name for path in FIXTURES.iterdir()} == set(EXPECTED)


def _label_options(name: str) -> list[str]:
    return [option for label, role in LABELS.get(name, {}).items() for option in ("--label", f"{label}={role}")]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_roleplay_log_validates_gives_stats_and_trains_two_steps(name, tmp_path, capsys):
    from lyra.train import train

    path = FIXTURES / name
    conversations, turns, notes = EXPECTED[name]
    assert data_cli(["validate", str(path), "--system-prompt", SYSTEM, *_label_options(name)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok, {conversations} conversations, {turns} assistant turns\n"
    for note in notes:
        assert note in captured.err
    with capsys.disabled():  # the kept turns and what was skipped, in the test log (pytest -s)
        print(captured.out + captured.err)
    assert data_cli(["stats", str(path), "--json", "--system-prompt", SYSTEM, "--max-length", "1024",
                     *_label_options(name)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["conversations"], stats["skipped_invalid"]) == (conversations, 0)
    assert sum(stats["left_out_or_added"].values()) == sum(read_file(path, LABELS.get(name)).counts.values())
    cfg = compose(smoke_overrides(tmp_path, "data=jsonl", f"data.train_file={path}", "trainer.max_steps=2",
                                  "eval=none", "trainer.save_strategy=no", "trainer.eval_strategy=no"))
    cfg.data.labels = LABELS.get(name, {})
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and metrics["skipped_conversations"] == 0
    assert metrics["train_examples"] == turns


@pytest.mark.parametrize("name", sorted(LABELS))
def test_unmapped_speakers_are_one_error_listing_every_name_never_a_guess(name, capsys):
    path = FIXTURES / name
    report = read_file(path)
    assert not report.conversations and len(report.problems) == 1
    message = report.problems[0].message
    for label in LABELS[name]:  # every name with its count (in a SillyTavern chat the header names the character)
        assert f"{label} (" in message
    first = next(iter(LABELS[name]))
    assert f"--label '{first}=user'" in message and f"data.labels='{{{first}: user" in message
    assert data_cli(["validate", str(path)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_the_sillytavern_chosen_swipe_is_trained_and_hidden_lines_are_not():
    conversation = read_file(FIXTURES / "sillytavern_chat.jsonl").conversations[0]
    texts = [m["content"] for m in conversation.messages]
    assert "The coast north of Harrow Point" in texts[2]  # swipe_id 1, not swipes[0]
    assert not any("OOC" in text for text in texts)  # is_system: hidden from the model in SillyTavern
    assert {"role": "system", "content": "A gust rattles the shutters; somewhere below, a bell rings twice."} \
        in conversation.messages


def test_pippa_definitions_become_the_system_prompt_with_names_expanded():
    first, second = read_file(FIXTURES / "pippa.jsonl").conversations
    system = first.messages[0]
    assert system["role"] == "system" and system["content"].startswith("Ilsa keeps a roadside tea house")
    assert "Ilsa: I brew tea" in system["content"] and "User: Is the tea any good?" in system["content"]
    assert "{{" not in json.dumps([m["content"] for m in first.messages])
    assert first.messages[3]["content"] == "It is, User. Drink first, then tell me where you came from."
    assert second.messages[0]["role"] == "assistant"  # no definitions: no system prompt of its own


# ---------------------------------------------------------------------------------------------- refusals

def _png(text_chunks: dict[str, str]) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "white").save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _lines(*records) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


CARD_V2 = {"spec": "chara_card_v2", "spec_version": "2.0",
           "data": {"name": "Mira", "description": "{{char}} is a cartographer.", "personality": "curious",
                    "scenario": "", "first_mes": "Mind the ink.", "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello",
                    "creator_notes": "", "system_prompt": "", "post_history_instructions": "",
                    "alternate_greetings": [], "tags": [], "creator": "lyra tests", "character_version": "1",
                    "extensions": {}}}


def refused_files(directory: Path) -> dict[str, Path]:
    """Twenty files a role-player might hand to a trainer, none of them trainable as they are."""
    import base64

    files = {
        "card_v2.png": _png({"chara": base64.b64encode(json.dumps(CARD_V2).encode()).decode()}),
        "avatar.png": _png({"Software": "an image editor"}),
        "Mira.yaml": "name: Mira\ngreeting: Mind the ink.\ncontext: Mira is a cartographer.\n",
        "settings.yml": "temperature: 0.7\ntop_p: 0.9\n",
        "Mira.charx": _zip({"card.json": json.dumps({**CARD_V2, "spec": "chara_card_v3", "spec_version": "3.0"}),
                            "assets/icon/main.png": "png"}),
        "card_v2.json": json.dumps(CARD_V2, indent=2),
        "card_v1.json": json.dumps({"char_name": "Mira", "char_persona": "a cartographer", "world_scenario": "",
                                    "char_greeting": "Mind the ink.", "example_dialogue": ""}),
        "chats.jsonl.gz": gzip.compress(b'{"messages": []}\n'),
        "export.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        "train.parquet": b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00" + bytes(64),
        "pippa_strings.jsonl": _lines(*[{"bot_name": "Ilsa", "bot_definitions": "", "conversation": [
            {"message": "Tea?", "is_human": "false"}, {"message": "Yes", "is_human": "true"}]}] * 30),
        "firefly_like.jsonl": _lines({"conversation": [{"question": "Tea?", "answer": "Yes"}]}),
        "webui_triples.json": json.dumps({"internal": [["hi", "hello", "extra"]], "visible": []}, indent=4),
        "haruhi_content.jsonl": _lines({"dialogue": [{"role": "春日", "content": "出發！"}]}),
        "rolebench_string.jsonl": _lines({"role": "Osei", "question": "Seasick?", "generated": "Only on land."}),
        "haruhi_pair_no_response.jsonl": _lines({"role_A": "阿虛", "role_B": "春日", "query": "走嗎？"}),
        "sillytavern_null_mes.jsonl": _lines({"user_name": "Wren", "character_name": "Mira", "chat_metadata": {}},
                                             {"name": "Mira", "is_user": False, "is_system": False, "mes": None}),
        "characterai_dump.json": json.dumps({"info": {"character": {"name": "Mira"}}, "histories": {"histories": [
            {"msgs": [{"src": {"name": "Mira", "is_human": False}, "text": "Mind the ink."}]}]}}, indent=2),
        "kobold_story.json": json.dumps({"gamestarted": True, "prompt": "Mira looks up.", "memory": "",
                                         "authorsnote": "", "actions": ["She waves."]}, indent=2),
        "alpaca_list_output.jsonl": _lines(*[{"instruction": f"Question {n}", "output": ["a", "b"]} for n in range(3)],
                                           *[{f"field_{n}": "x", "turns": []} for n in range(40)]),
    }
    paths = {}
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        paths[name] = path
    return paths


FORMAT_NAMES = [dialect.name for dialect in RECORD_DIALECTS] + [
    "SillyTavern chat", "this is a character card, not a conversation file: `python -m lyra.persona import",
    "not a conversation file"]


def test_twenty_refused_files_print_at_most_20_lines_each_naming_the_nearest_format(tmp_path, capsys):
    files = refused_files(tmp_path)
    assert len(files) == 20
    for name, path in files.items():
        assert data_cli(["validate", str(path)]) == 1, name
        lines = capsys.readouterr().out.splitlines()
        assert 1 <= len(lines) <= MAX_REPORTED_PROBLEMS, (name, lines)
        for line in lines:
            if line.startswith("... and"):
                continue
            assert line.startswith(f"{path}:"), line
            assert any(format_name in line for format_name in FORMAT_NAMES), line
    cards = ["card_v2.png", "Mira.yaml", "Mira.charx", "card_v2.json", "card_v1.json"]
    for name in cards:
        assert [str(p) for p in read_file(files[name]).problems] == [
            f"{files[name]}:1: this is a character card, not a conversation file: "
            f"`python -m lyra.persona import {files[name]}`"]
    assert "not a conversation file: a PNG image" in str(read_file(files["avatar.png"]).problems[0])
    assert "UTF-8" not in "".join(str(p) for name in ("chats.jsonl.gz", "export.pdf", "train.parquet")
                                  for p in read_file(files[name]).problems)
    pippa = read_file(files["pippa_strings.jsonl"]).problems
    assert len(pippa) == 30 and len(pippa[0].message) < 200  # one line when printed: grouped with the count


def test_a_near_miss_record_is_told_its_closest_format_and_how_to_convert():
    from lyra.data.dialects import normalize_record

    _, error = normalize_record({"bot_name": "Ilsa", "chat": [{"text": "Tea?", "human": True}]}, "x")
    assert error.startswith("PIPPA: ")
    _, error = normalize_record({"char": "Ilsa", "conversation_log": [{"message": "Tea?", "is_human": True}]}, "x")
    assert "closest known format: PIPPA" in error and "is_human" in error
    _, error = normalize_record({"histories": []}, "x")
    assert "no known format shares its keys; the simplest is seed/ShareGPT" in error
