"""Character cards in (`python -m lyra.persona import`) and out (`python -m lyra.export format=card`).

The cards in tests/fixtures/cards/ are original characters written in the shapes of real files:
text-generation-webui's characters/Example.json (Pygmalion V1) and Example.yaml, a SillyTavern V2
export (V1 fields repeated at the top level, ST extensions), the V2/V3 specs
(malfoyslastname/character-card-spec-v2, kwaroran/character-card-spec-v3). PNG and CHARX
containers are built here with Pillow and zipfile, the `chara` chunk placed after IDAT as
SillyTavern writes it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shlex
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lyra.errors import UserError
from lyra.persona import cards
from lyra.persona.cards import import_card, plan_persona, read_card, read_card_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "cards"
REAL = REPO_ROOT / "tests" / "fixtures" / "real"  # public files, byte for byte (README there)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def png_bytes(chunks: dict[str, dict], *, after_idat: bool = True, size=(8, 8)) -> bytes:
    """A PNG with each card base64 in a tEXt chunk; after IDAT (SillyTavern's place) or before it (Pillow's)."""
    from PIL import Image, PngImagePlugin

    texts = {key: base64.b64encode(json.dumps(card).encode("utf-8")).decode("ascii") for key, card in chunks.items()}
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    if not after_idat:
        for key, value in texts.items():
            info.add_text(key, value)
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    if after_idat:
        iend = data.rindex(b"IEND") - 4
        extra = b"".join(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("ascii"))
                         for key, value in texts.items())
        data = data[:iend] + extra + data[iend:]
    return data


def _chunk(cid: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + cid + payload + zlib.crc32(cid + payload).to_bytes(4, "big")


def charx_bytes(card: dict, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("card.json", json.dumps(card))
        archive.writestr("assets/icon/images/main.png", png_bytes({}))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def seed(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def turns(record: dict) -> list[tuple[str, str]]:
    return [(turn["from"], turn["value"]) for turn in record["conversations"]]


def validated(persona_file: Path) -> OmegaConf:
    """The persona file as training reads it, through the persona group's own validator."""
    from lyra.config import validate_persona

    persona = OmegaConf.load(persona_file)
    validate_persona(persona)
    return persona


# ---------------------------------------------------------------- formats -> persona files


def test_v1_pygmalion_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odile.json").write_text((FIXTURES / "v1_pygmalion.json").read_text(encoding="utf-8"), encoding="utf-8")
    result = import_card("odile.json", "my_conf", user_address="Sam")
    persona = validated(tmp_path / "my_conf" / "persona" / "odile_marchetti.yaml")
    assert result.slug == "odile_marchetti"
    assert persona.name == "Odile Marchetti" and persona.user_address == "Sam" and persona.language == "en"
    assert persona.system_prompt.startswith("Odile Marchetti runs a tiny bakery")
    assert persona.train_file == "my_conf/data/odile_marchetti_seed.jsonl" and persona.eval_file is None
    records = seed(tmp_path / persona.train_file)
    assert turns(records[0]) == [("assistant", fixture("v1_pygmalion.json")["char_greeting"])]
    # "You:" and the character's own name are the V1 speaker labels; the one block is one conversation
    assert turns(records[1]) == [
        ("user", "What's the secret to a good croissant?"),
        ("assistant", "Cold butter, warm hands, and patience. Mostly patience."),
        ("user", "Do you ever sleep in?"),
        ("assistant", "*She laughs* On Mondays. The oven sleeps too.")]
    assert len(records) == 2
    assert "Character Card V1, Pygmalion" in persona.card.source


def test_v1_tavern_bot_user_macros_and_start_blocks(tmp_path):
    plan = plan_persona(read_card(FIXTURES / "v1_tavern.json"), user_address="Ana")
    assert plan.persona["system_prompt"] == (
        "Bram is a retired ferryman who tells long stories to Ana.\n\nBram's personality: slow, kind, fond of "
        "riddles\n\nScenario: Ana sits beside Bram on the old pier.")
    assert [turns(record) for record in plan.seed] == [
        [("assistant", "Sit down, Ana. The tide won't wait, but I will.")],
        [("user", "How long did you run the ferry?"), ("assistant", "Forty-one years, give or take a storm.")],
        [("user", "Tell me a riddle."), ("assistant", "What runs but never walks? The river, Ana. Always the river.")]]


def test_v2_png_sillytavern_shape_compiles_the_prompt_in_order(tmp_path, monkeypatch, capsys):
    from lyra.persona.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Yusra.png").write_bytes(png_bytes({"chara": fixture("v2_tavern.json")}))
    assert main(["import", "Yusra.png", "--out", "my_conf"]) == 0
    out = capsys.readouterr().out
    persona = validated(tmp_path / "my_conf" / "persona" / "yusra.yaml")
    assert persona.user_address == "User"  # the documented default, said in one line
    assert "no --user-address" in out and "no --chats" in out and "eval_file is null" in out
    # system_prompt ({{original}} removed), constant before_char, description, personality, scenario, after_char
    assert persona.system_prompt == (
        "Write Yusra's next reply in a slow, gentle style.\n\nThe town is called Saltmere.\n\n"
        "Yusra owns a tea shop in an old harbour town. She remembers every regular's order.\n\n"
        "Yusra's personality: calm, observant, generous\n\n"
        "Scenario: User steps in from the rain on a grey afternoon.\n\n"
        "Teas are never served boiling at Yusra's shop.")
    assert "disabled entry" not in persona.system_prompt and "froze" not in persona.system_prompt
    assert OmegaConf.to_container(persona.card.lorebook) == [
        {"keys": ["harbour", "docks"], "content": "The harbour froze over once, in the winter of the long fog.",
         "name": "harbour"}]
    assert persona.card.post_history_instructions == "Stay in character as {{char}}."
    assert persona.card.creator_notes == "An original character made for lyra's tests."
    assert "extensions.depth_prompt" in out  # ignored fields are named
    records = seed(tmp_path / persona.train_file)
    assert [turns(r)[0] for r in records[:2]] == [
        ("assistant", "*The bell over the door rings.* Welcome in, User. Sit anywhere that is dry."),
        ("assistant", "Back again, User? Your usual is already steeping.")]
    assert turns(records[2])[-1] == ("assistant", "Then jasmine. Nobody leaves here unhappy, User.")
    assert len(records) == 4
    probes = [json.loads(line) for line in (tmp_path / persona.probes_file).read_text().splitlines()]
    assert len(probes) == cards.MIN_PROBES and probes[0]["prompt"] == cards.GENERIC_PROBES["en"][0]
    # the printed commands name this config dir and persona
    assert "python -m lyra.train --config-dir my_conf persona=yusra experiment=smoke" in out


def test_png_chunk_before_idat_is_read_too():
    card = read_card_bytes(png_bytes({"chara": fixture("v2_tavern.json")}, after_idat=False), "yusra.png")
    assert card.name == "Yusra" and card.source == "Character Card V2 (PNG chara chunk)"


def test_v3_json_nickname_case_variants_and_decorators():
    card = read_card(FIXTURES / "v3_card.json")
    plan = plan_persona(card, user_address="Navigator")
    assert plan.persona["name"] == "Ilse"  # V3: the nickname replaces {{char}}
    assert plan.persona["system_prompt"] == (
        "Ilse commands a small cargo airship. She trusts Navigator with the charts.\n\n"
        "Ilse's personality: decisive, dry, loyal\n\nThe Heron flies under a neutral flag.")
    assert [turns(r) for r in plan.seed] == [
        [("assistant", "Charts are on the table, Navigator. Where are we headed?")],
        [("user", "Is the weather holding?"), ("assistant", "For now. Keep an eye on the western clouds.")]]
    assert any("group_only_greetings" in note for note in plan.notes)
    assert any("@@decorator" in note for note in plan.notes)


def test_v3_png_ccv3_wins_over_the_v2_backfill():
    v2 = {"spec": "chara_card_v2", "data": {"name": "Backfill", "first_mes": "old"}}
    card = read_card_bytes(png_bytes({"chara": v2, "ccv3": fixture("v3_card.json")}), "ilse.png")
    assert card.char_name == "Ilse" and card.source == "Character Card V3 (PNG ccv3 chunk)"


def test_charx_is_read_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ilse.charx").write_bytes(charx_bytes(fixture("v3_card.json")))
    import_card("ilse.charx", "conf", user_address="Navigator", slug="ilse")
    persona = validated(tmp_path / "conf" / "persona" / "ilse.yaml")
    assert persona.name == "Ilse" and "CHARX" in persona.card.source
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf", "ilse.charx"]  # nothing extracted
    assert not list(tmp_path.rglob("main.png"))


def test_text_generation_webui_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Tomas.yaml").write_text((FIXTURES / "tgw_character.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    import_card("Tomas.yaml", "my_conf")
    persona = validated(tmp_path / "my_conf" / "persona" / "tomas_reyes.yaml")
    assert persona.system_prompt.startswith("Tomas Reyes's Persona: Tomas Reyes is a night-shift radio host")
    records = seed(tmp_path / persona.train_file)
    assert turns(records[0]) == [("assistant", "*The ON AIR light flickers on.*\nYou're on the air, caller. "
                                               "What's keeping you up tonight?")]
    assert [role for role, _ in turns(records[1])] == ["user", "assistant", "user", "assistant"]
    assert "text-generation-webui" in persona.card.source


def test_zh_tw_card_language_probes_and_slug(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    card = {"spec": "chara_card_v2", "data": {
        "name": "阿茶", "description": "{{char}}是一間老茶行的老闆娘，說話溫柔，總是請{{user}}喝茶。",
        "first_mes": "歡迎光臨！今天想喝點什麼呢？", "mes_example": "<START>\n{{user}}：有什麼推薦的嗎？\n{{char}}：今天的凍頂烏龍很香喔。",
        "extensions": {}}}
    (tmp_path / "阿茶.json").write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    result = import_card("阿茶.json", "my_conf", user_address="客人")
    assert result.slug == "character"  # no ASCII in the name or file name: --slug picks a better one
    persona = validated(tmp_path / "my_conf" / "persona" / "character.yaml")
    assert persona.language == "zh-TW" and persona.name == "阿茶"
    assert seed(tmp_path / persona.train_file)[1]["conversations"][1]["value"] == "今天的凍頂烏龍很香喔。"
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / persona.probes_file).read_text().splitlines()]
    assert prompts == cards.GENERIC_PROBES["zh-TW"]
    from lyra.persona import is_traditional_chinese

    assert all(is_traditional_chinese(prompt) for prompt in prompts)


def test_chats_are_split_seeded_and_give_the_probes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chats = tmp_path / "my_chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question number {i}?"},
        {"role": "assistant", "content": f"Answer {i}, friend."}]}) + "\n" for i in range(20)), encoding="utf-8")
    result = import_card(FIXTURES / "v1_tavern.json", "conf", chats=[chats], user_address="Ana")
    persona = validated(tmp_path / "conf" / "persona" / "bram.yaml")
    train, held = seed(tmp_path / persona.train_file), seed(tmp_path / persona.eval_file)
    assert len(held) == 2 and len(train) == 3 + 18  # 10% held out; the card's 3 records stay in train
    again = plan_persona(read_card(FIXTURES / "v1_tavern.json"), user_address="Ana",
                         chats=_conversations(chats), seed=0)
    assert again.eval_chats == held  # seeded: the same split every time
    other = plan_persona(read_card(FIXTURES / "v1_tavern.json"), user_address="Ana", chats=_conversations(chats), seed=1)
    assert other.eval_chats != held
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / persona.probes_file).read_text().splitlines()]
    assert prompts[:2] == [record["messages"][0]["content"] for record in held]
    assert len(prompts) == cards.MIN_PROBES
    assert any("2 held-out prompt(s)" in note for note in result.notes)


def _conversations(path):
    from lyra.data import load_conversations

    return load_conversations(path)


def test_dollar_braces_in_a_card_stay_literal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    card = {"name": "Pip", "description": "Pip writes shell scripts: echo ${HOME} and ${oc.env:USER}.",
            "first_mes": "Hello! Which script today?"}
    (tmp_path / "pip.json").write_text(json.dumps(card), encoding="utf-8")
    import_card("pip.json", "conf")
    assert validated(tmp_path / "conf" / "persona" / "pip.yaml").system_prompt == card["description"]


def test_existing_persona_needs_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import_card(FIXTURES / "v1_tavern.json", "conf")
    with pytest.raises(UserError, match="--overwrite"):
        import_card(FIXTURES / "v1_tavern.json", "conf")
    import_card(FIXTURES / "v1_tavern.json", "conf", overwrite=True)


@pytest.mark.parametrize("content, message", [
    (b'{"chat_history": []}', "not a character card"),
    (b'{"spec": "chara_card_v9", "data": {}}', "chara_card_v9"),
    (b'{"spec": "chara_card_v2", "data": {"name": "", "first_mes": "hi"}}', "no name"),
    (b'{"spec": "chara_card_v2", "data": {"name": "X", "description": ["a"]}}', "card.data.description: must be a string"),
    (b'{"name": "X", "description": "', "invalid JSON"),
    (b"\x00\x01\x02binary", "a binary file, not a card"),
    (b"caf\xe9: 1", "not UTF-8"),
])
def test_refusals_are_one_line(tmp_path, capsys, content, message):
    from lyra.persona.__main__ import main

    path = tmp_path / "card.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(path), "--out", str(tmp_path / "conf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("lyra: error: ") and message in err


# ---------------------------------------------------------------- safety (untrusted cards)


def _refused(data: bytes, name: str, match: str) -> str:
    with pytest.raises(UserError, match=match) as error:
        read_card_bytes(data, name)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_decompression_bomb_png_is_refused_before_decoding():
    data = bytearray(png_bytes({"chara": fixture("v2_tavern.json")}))
    ihdr = data.index(b"IHDR")  # claim 100000 x 100000 pixels: a bomb's header
    data[ihdr + 4:ihdr + 12] = (100_000).to_bytes(4, "big") * 2
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    _refused(bytes(data), "bomb.png", "10,000,000,000 pixels\\) is over the .*-pixel limit")


def test_png_over_the_byte_cap_is_refused_before_opening(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes({"chara": fixture("v2_tavern.json")}))
    monkeypatch.setattr(cards, "MAX_PNG_BYTES", 100)
    with pytest.raises(UserError, match="over the 100-byte limit"):
        read_card(path)


def test_png_without_a_card_or_broken():
    _refused(png_bytes({}), "plain.png", "without a character card")
    _refused(png_bytes({"chara": fixture("v2_tavern.json")})[:40], "cut.png", "broken PNG")


@pytest.mark.parametrize("member, problem", [
    ("../../evil.sh", "climbs out"), ("/etc/cron.d/evil", "absolute path"), ("C:/evil.bat", "absolute path")])
def test_zip_slip_charx_is_refused(member, problem):
    message = _refused(charx_bytes(fixture("v3_card.json"), {member: b"x"}), "evil.charx", problem)
    assert "zip-slip" in message


def test_symlink_member_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("card.json", json.dumps(fixture("v3_card.json")))
        link = zipfile.ZipInfo("assets/link")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    _refused(buffer.getvalue(), "link.charx", "symbolic link")


def test_charx_member_count_size_and_inflation_caps(monkeypatch):
    data = charx_bytes(fixture("v3_card.json"), {f"assets/other/f{i}.txt": b"x" for i in range(5)})
    monkeypatch.setattr(cards, "MAX_CHARX_MEMBERS", 4)
    _refused(data, "many.charx", "7 members, over the 4 limit")
    monkeypatch.setattr(cards, "MAX_CHARX_MEMBERS", 100)
    monkeypatch.setattr(cards, "MAX_CHARX_UNCOMPRESSED", 1000)
    _refused(data, "bomb.charx", "uncompressed bytes, over the 1,000-byte limit")
    monkeypatch.setattr(cards, "MAX_CHARX_UNCOMPRESSED", 10**9)
    padded = dict(fixture("v3_card.json"), padding=" " * 50_000)  # compresses to almost nothing
    monkeypatch.setattr(cards, "MAX_CARD_BYTES", 20_000)
    _refused(charx_bytes(padded), "deflated.charx", "card.json declares")


def test_oversized_field_is_refused_naming_it():
    card = fixture("v2_tavern.json")
    card["data"]["description"] = "x" * (cards.MAX_FIELD_CHARS + 1)
    _refused(json.dumps(card).encode(), "huge.json", "^card.data.description: 200,001 characters, over the")


def _mutations(rng: random.Random, seeds: list[tuple[str, bytes]]):
    """Mutated cards: byte flips, truncations, splices, deep nesting, huge strings, wrong types."""
    base_card = fixture("v2_tavern.json")
    values = [None, 0, -1, 1e308, True, [], {}, [[[]]], "", "x" * 70_000, {"a": [1, {"b": None}]}, "{{char}}" * 500]
    while True:
        kind = rng.randrange(7)
        name, data = seeds[rng.randrange(len(seeds))]
        if kind == 0:  # random byte flips
            data = bytearray(data)
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield name, bytes(data)
        elif kind == 1:  # truncation
            yield name, data[:rng.randrange(len(data))]
        elif kind == 2:  # random bytes
            yield name, rng.randbytes(rng.randint(0, 4000))
        elif kind == 3:  # deep nesting
            depth = rng.choice([100, 5000, 200_000])
            opener = rng.choice(["[", '{"a":', "- "])
            yield rng.choice(["deep.json", "deep.yaml"]), (opener * depth).encode()
        elif kind == 4:  # wrong types in card fields, V2 or V1 shape
            card = json.loads(json.dumps(base_card))
            target = card["data"] if rng.random() < 0.7 else card
            for _ in range(rng.randint(1, 4)):
                key = rng.choice([*target.keys(), "character_book", "alternate_greetings", "extensions"])
                target[key] = rng.choice(values)
            if rng.random() < 0.2:
                card["data"] = rng.choice(values)
            yield "typed.json", json.dumps(card).encode()
        elif kind == 5:  # a mutated card inside a PNG or a CHARX
            card = json.loads(json.dumps(base_card))
            card["data"][rng.choice(list(card["data"]))] = rng.choice(values)
            yield ("m.png", png_bytes({"chara": card})) if rng.random() < 0.5 else ("m.charx", charx_bytes(card))
        else:  # huge strings
            card = json.loads(json.dumps(base_card))
            card["data"][rng.choice(["description", "first_mes", "mes_example", "name"])] = "ab\n" * rng.choice(
                [10, 70_000, 300_000])
            yield "huge.json", json.dumps(card).encode()


FUZZ_CASES = 3000


@pytest.mark.parametrize("count", [FUZZ_CASES], ids=[f"{FUZZ_CASES}-mutated-cards"])
def test_fuzz_card_import(count, capsys):
    rng = random.Random(1234)
    seeds = [("v2.json", (FIXTURES / "v2_tavern.json").read_bytes()), ("v1.json", (FIXTURES / "v1_tavern.json").read_bytes()),
             ("v3.json", (FIXTURES / "v3_card.json").read_bytes()), ("tgw.yaml", (FIXTURES / "tgw_character.yaml").read_bytes()),
             ("v2.png", png_bytes({"chara": fixture("v2_tavern.json")})),
             ("v3.charx", charx_bytes(fixture("v3_card.json")))]
    outcomes = {"imported": 0, "refused": 0}
    total_bytes, worst_rate = 0, 0.0
    for _, (name, data) in zip(range(count), _mutations(rng, seeds)):
        start = time.perf_counter()
        try:
            card = read_card_bytes(data, name)
            plan_persona(card, language=rng.choice([None, "en"]), user_address=rng.choice([None, "Sam"]))
            outcomes["imported"] += 1
        except UserError as error:
            assert "\n" not in str(error), str(error)[:300]
            outcomes["refused"] += 1
        elapsed = time.perf_counter() - start
        total_bytes += len(data)
        worst_rate = max(worst_rate, elapsed / max(len(data) / 2**20, 0.1))  # seconds per MB, 100 kB floor
    with capsys.disabled():
        print(f"\nfuzz: {count} mutated cards, {outcomes['imported']} imported, {outcomes['refused']} refused in one "
              f"line, {total_bytes / 2**20:.1f} MB, worst {worst_rate:.2f} s/MB")
    assert sum(outcomes.values()) == count and outcomes["imported"] > count // 10 and outcomes["refused"] > count // 10
    assert worst_rate < 20  # seconds per MB, generous: 2 contended cores; typical is far below


# ---------------------------------------------------------------- the printed command trains; export round-trips


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _seed_fields(persona_file: Path, cwd: Path) -> dict:
    persona = OmegaConf.load(persona_file)
    return {"name": persona.name, "system_prompt": persona.system_prompt, "user_address": persona.user_address,
            "language": persona.language, "seed": [turns(r) for r in seed(cwd / persona.train_file)]}


def _docs_commands() -> list[str]:
    """The three commands of docs/cards.md's "From a character card to a trained persona"."""
    text = (REPO_ROOT / "docs" / "cards.md").read_text(encoding="utf-8")
    section = text.split("## From a character card to a trained persona", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_example_card_png_holds_the_json():
    png, js = read_card(REPO_ROOT / "examples" / "cards" / "wren.png"), read_card(REPO_ROOT / "examples" / "cards" / "wren.json")
    assert png.name == js.name == "Wren" and png.system_prompt == js.system_prompt and png.mes_example == js.mes_example
    assert png.book == js.book and png.first_mes == js.first_mes


@pytest.mark.slow
def test_docs_commands_and_printed_command_train_and_the_card_export_round_trips(tmp_path):
    import shutil

    (tmp_path / "examples" / "cards").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "examples" / "cards" / "wren.png", tmp_path / "examples" / "cards" / "wren.png")
    import_cmd, train_cmd, chat_cmd = _docs_commands()
    assert import_cmd.startswith("python -m lyra.persona import examples/cards/wren.png --out my_conf")
    imported = _run([sys.executable, *shlex.split(import_cmd)[1:]], tmp_path)
    assert imported.returncode == 0, imported.stderr
    printed = next(line.split("#")[0].strip() for line in imported.stdout.splitlines() if "experiment=smoke" in line)
    assert printed == "python -m lyra.train --config-dir my_conf persona=wren experiment=smoke"
    assert train_cmd.startswith(printed.removesuffix(" experiment=smoke"))
    # the printed command, with the docs' run dir; the last extras only keep the test short
    trained = _run([sys.executable, *shlex.split(printed)[1:], "hydra.run.dir=runs/wren", "trainer.max_steps=2",
                    "logger=none"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "runs" / "wren" / "adapter" / "adapter_config.json").is_file()
    chatted = _run([sys.executable, *shlex.split(chat_cmd)[1:], "prompt=Hello", "generation.max_new_tokens=4"],
                   tmp_path)
    assert chatted.returncode == 0, chatted.stderr[-3000:]

    exported = _run([sys.executable, "-m", "lyra.export", "run_dir=runs/wren", "output_dir=card", "format=card"],
                    tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["wren.json", "wren.png"]
    again = _run([sys.executable, "-m", "lyra.persona", "import", "card/wren.png", "--out", "again"], tmp_path)
    assert again.returncode == 0, again.stderr
    first = _seed_fields(tmp_path / "my_conf" / "persona" / "wren.yaml", tmp_path)
    second = _seed_fields(tmp_path / "again" / "persona" / "wren.yaml", tmp_path)
    assert second == first  # name, prompt, address, language, greetings and examples: the same persona
    assert first["user_address"] == "Traveller" and len(first["seed"]) == 2 + 3
    meta = OmegaConf.load(tmp_path / "again" / "persona" / "wren.yaml").card
    assert list(meta.lorebook[0]["keys"]) == ["Morag", "supply boat"]
    assert meta.creator_notes.startswith("An original character made for lyra's documentation")


def test_export_card_of_the_smoke_run_round_trips(smoke_run, tmp_path):
    from lyra.export import export
    from lyra.paths import compose_config

    output = tmp_path / "card"
    export(compose_config("export", [f"run_dir={smoke_run}", f"output_dir={output}", "format=card"]))
    written = json.loads(next(output.glob("*.json")).read_text(encoding="utf-8"))
    png = next(output.glob("*.png"))
    card = read_card(png)
    assert card.source == "Character Card V2 (PNG chara chunk)"
    run_persona = OmegaConf.load(smoke_run / "resolved_config.yaml").persona
    plan = plan_persona(card)
    assert plan.persona["name"] == run_persona.name
    assert plan.persona["system_prompt"] == run_persona.system_prompt
    assert plan.persona["user_address"] == run_persona.user_address  # through extensions.lyra
    assert plan.persona["language"] == run_persona.language
    examples = [record for record in plan.seed if "-example-" in record["id"]]
    assert len(examples) == cards.MAX_EXPORT_EXAMPLES
    from lyra.data import load_conversations

    chats = [[m for m in c.messages if m["role"] != "system"] for c in load_conversations(run_persona.train_file)]
    first = next(messages for messages in chats if messages and messages[0]["role"] == "user")
    assert turns(examples[0])[:2] == [(m["role"], m["content"].strip()) for m in first[:2]]
    assert written["data"]["mes_example"].count("<START>") == cards.MAX_EXPORT_EXAMPLES


def test_the_real_text_generation_webui_example_character(tmp_path, monkeypatch):
    """tests/fixtures/real/tgw_Example.yaml is text-generation-webui's own characters/Example.yaml, as
    published (oobabooga/text-generation-webui): a real file, not one shaped after it."""
    monkeypatch.chdir(tmp_path)
    result = import_card(str(REAL / "tgw_Example.yaml"), "my_conf", user_address="Sam")
    persona = validated(tmp_path / "my_conf" / "persona" / f"{result.slug}.yaml")
    assert persona.name == "Chiharu Yamada" and persona.language == "en"
    assert persona.system_prompt.startswith("Chiharu Yamada's Persona: Chiharu Yamada is a young, computer engineer")
    greeting, example = seed(tmp_path / persona.train_file)
    assert turns(greeting)[0][0] == "assistant" and turns(greeting)[0][1].startswith("*Chiharu strides into the room")
    assert turns(example)[:2] == [("user", "So how did you get into computer engineering?"),
                                  ("assistant", "I've always loved tinkering with technology since I was a kid.")]
    assert len(turns(example)) == 10 and "{{" not in json.dumps(example)
