"""Character cards in and out: a role-play card becomes a lyra persona, and a trained persona a card.

    from lyra.persona.cards import read_card, import_card, write_run_card
    card = read_card("Seraphina.png")                   # any format below -> one normalized Card
    result = import_card("Seraphina.png", "my_conf")    # my_conf/persona/<slug>.yaml + my_conf/data/<slug>_*.jsonl
    write_run_card(run_dir, output_dir)                 # <slug>.json + <slug>.png, a Character Card V2

The app is `python -m lyra.persona import CARD --out DIR` (lyra/persona/__main__.py) and
`python -m lyra.export run_dir=R output_dir=D format=card`; docs/cards.md is the user's guide.

Formats read (recognized by content, not by file name):
    Character Card V1   TavernAI {name, description, personality, scenario, first_mes, mes_example}, or
                        Pygmalion {char_name, char_persona, world_scenario, char_greeting, example_dialogue}
    Character Card V2   {"spec": "chara_card_v2", "data": {...}} (V1 fields at the top level are ignored)
    Character Card V3   {"spec": "chara_card_v3", "data": {...}}; `nickname` replaces the name in {{char}}
    each as JSON, or base64 in a PNG's text chunk `chara` (V2/V1) or `ccv3` (V3; preferred when both exist),
    CHARX               a zip holding card.json at its root (read in memory, nothing is extracted)
    text-generation-webui character YAML {name, context, greeting, example_dialogue}

The compiled system prompt, in this order, paragraphs separated by a blank line (SillyTavern's
default story string, without its chat-only parts):
    1. the card's system_prompt ({{original}}, the frontend's own prompt, is removed: lyra has none)
    2. constant lorebook entries placed before_char (position 0 in SillyTavern), by insertion_order
    3. description
    4. "<name>'s personality: <personality>"
    5. "Scenario: <scenario>"
    6. every other constant lorebook entry (after_char and the chat-depth positions), by insertion_order
Keyword-triggered lorebook entries are listed in the persona file's `card.lorebook` (lyra's prompt is
fixed, nothing scans the chat for keys); post_history_instructions, creator_notes, tags, creator and
character_version are kept there too, and `format=card` writes them back.

Macros: {{char}} / <BOT> / <CHAR> become the character's name (V3: its nickname), {{user}} / <USER>
become user_address, case-insensitively ({{Char}}, {{USER}}). Other {{macros}} stay as written and
are counted in one note.

Untrusted files: every size is checked before the bytes are parsed. A PNG is capped in bytes and in
pixels (Pillow's Image.MAX_IMAGE_PIXELS, read from its header; the pixels are never decoded: the text
chunks are read with Pillow's PNG chunk reader); a CHARX is refused when a member path escapes (..,
absolute, a drive, a symlink), when it holds too many members or too many uncompressed bytes, and its
card.json is read with a byte cap whatever the zip declares; every text field is capped in length.
Each refusal is one `UserError` line naming the limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import random
import re
import shlex
import shutil
import stat
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lyra.data.dialects.roleplay import NAME_MACRO, expand_names
from lyra.errors import UserError
from lyra.persona import LANGUAGES, has_simplified, is_english, is_traditional_chinese

# ---------------------------------------------------------------- limits (untrusted input)

MAX_CARD_BYTES = 16 * 2**20  # a card's JSON/YAML text (file, PNG chunk or card.json): big lorebooks are a few MB
MAX_PNG_BYTES = 64 * 2**20  # a PNG card on disk; real ones are under 10 MB
MAX_CHARX_BYTES = 256 * 2**20  # a CHARX on disk: it may carry images and audio, none of which are read
MAX_CHARX_MEMBERS = 2000  # entries in the zip's directory
MAX_CHARX_UNCOMPRESSED = 1024 * 2**20  # the declared total of all members, the classic zip-bomb sign
MAX_FIELD_CHARS = 200_000  # one text field (~50k tokens, far beyond what a small model's context holds)
MAX_LIST_ITEMS = 2000  # alternate greetings, tags, lorebook entries and their keys
MAX_YAML_FLOW_DEPTH = 64  # [ and { nesting a YAML card may have (pure-Python PyYAML only)

CARD_KEY = "card"  # the UserError key of every problem with the card file
ORIGINAL_MACRO = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)
OTHER_MACRO = re.compile(r"\{\{[^{}\n]{1,60}\}\}")
START = re.compile(r"^[ \t]*<START>[ \t]*$", re.IGNORECASE | re.MULTILINE)
SPEAKER = re.compile(r"^[ \t]*([^\s:：][^:：\n]{0,40})[:：][ \t]?(.*)$")
NAME_LIKE = re.compile(r"^[^\W\d_][\w'.-]*(?: [\w'.-]+){0,2}$")  # "Narrator", "Old Tom": a speaker, not prose
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"

# The user_address a card gets without --user-address: SillyTavern's default user name, so {{user}}
# reads as it does for a SillyTavern user who never set a persona name. address_rate then counts
# replies that say "User"; pass --user-address with the name you chat under to measure that instead.
DEFAULT_USER_ADDRESS = "User"
MIN_PROBES = 8  # eval.num_probes' default: the persona metrics need this many prompts
EVAL_SHARE = 0.1  # share of the --chats conversations held out as the eval split
GENERIC_PROBES = {
    "en": ["Hi! Who are you?", "Tell me a little about yourself.", "What are you doing right now?",
           "What do you like most about the place you live?", "I had a rough day. Can you cheer me up?",
           "What should we do together today?", "Is there anything you are afraid of?",
           "I have to go now. See you tomorrow!"],
    "zh-TW": ["嗨！你是誰？", "跟我說說你自己吧。", "你現在在做什麼？", "你最喜歡你住的地方的哪一點？",
              "我今天過得很糟，可以安慰我一下嗎？", "我們今天一起做什麼好呢？", "有什麼事情是你害怕的嗎？",
              "我得走了，明天見！"],
}


# ---------------------------------------------------------------- the normalized card

@dataclass
class BookEntry:
    """One lorebook (character_book) entry."""

    keys: list[str]
    content: str
    constant: bool = False
    enabled: bool = True
    insertion_order: float = 0
    before_char: bool = False
    name: str = ""


@dataclass
class Card:
    """A character card of any supported format, in V2 terms; `notes` say what was dropped or filled."""

    name: str
    source: str  # e.g. "Character Card V2 (PNG chara chunk)"
    description: str = ""
    personality: str = ""
    scenario: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    creator_notes: str = ""
    first_mes: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    mes_example: str = ""
    book: list[BookEntry] = field(default_factory=list)
    nickname: str = ""
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    lyra: dict[str, str] = field(default_factory=dict)  # extensions.lyra, written by lyra's own export
    notes: list[str] = field(default_factory=list)

    @property
    def char_name(self) -> str:
        """What {{char}} becomes: the V3 nickname when set, else the name."""
        return self.nickname or self.name


# ---------------------------------------------------------------- reading files

def read_card(path: str | Path) -> Card:
    """Any supported card file -> Card; one UserError line for anything unreadable, unsafe or too big."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(CARD_KEY, f"file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
    cap = MAX_PNG_BYTES if head.startswith(PNG_SIGNATURE) else (
        MAX_CHARX_BYTES if head.startswith(ZIP_SIGNATURE) else MAX_CARD_BYTES)
    if size > cap:
        raise UserError(CARD_KEY, f"{path} is {size:,} bytes, over the {cap:,}-byte limit for this kind of card")
    return read_card_bytes(path.read_bytes(), path.name)


def read_card_bytes(data: bytes, name: str = "card") -> Card:
    """The card in `data` (the bytes of a file called `name`); what `read_card` does after its size check."""
    suffix = Path(name).suffix.lower()
    if data.startswith(PNG_SIGNATURE):
        _check_size(len(data), MAX_PNG_BYTES, f"{name} (PNG)")
        return _card_from_png(data, name)
    if data.startswith(ZIP_SIGNATURE):
        _check_size(len(data), MAX_CHARX_BYTES, f"{name} (CHARX)")
        text = _text_of(_card_json_from_charx(data, name), f"{name}: card.json")
        return card_from_object(_parse_json(text, f"{name}: card.json"), "CHARX")
    _check_size(len(data), MAX_CARD_BYTES, name)
    if b"\0" in data[:4096]:
        raise UserError(CARD_KEY, f"{name}: a binary file, not a card; lyra reads cards as JSON, YAML, PNG or CHARX")
    text = _text_of(data, name)
    if suffix in (".yaml", ".yml") or not text.lstrip().startswith(("{", "[")):
        return card_from_object(_parse_yaml(text, name), "YAML")
    return card_from_object(_parse_json(text, name), "JSON")


def _check_size(size: int, cap: int, what: str) -> None:
    if size > cap:
        raise UserError(CARD_KEY, f"{what} is {size:,} bytes, over the {cap:,}-byte limit")


def _text_of(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(CARD_KEY, f"{what}: not UTF-8 text (byte {error.start}); a card is JSON, YAML, "
                                  "a PNG or a CHARX zip") from None


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(CARD_KEY, f"{what}: invalid JSON at line {error.lineno} column {error.colno}: "
                                  f"{error.msg}") from None
    except RecursionError:
        raise UserError(CARD_KEY, f"{what}: JSON nested too deeply to be a card") from None


def _parse_yaml(text: str, what: str) -> Any:
    import yaml

    # libyaml (C) bounds nesting itself; pure-Python PyYAML is quadratic on deep flow nesting, so the
    # fallback refuses it before parsing.
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is None:
        depth = deepest = 0
        for char in text:
            depth += char in "[{"
            depth -= char in "]}"
            deepest = max(deepest, depth)
        if deepest > MAX_YAML_FLOW_DEPTH:
            raise UserError(CARD_KEY, f"{what}: YAML nested too deeply to be a card")
        loader = yaml.SafeLoader
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as error:
        first = str(error).replace("\n", " ")[:200]
        raise UserError(CARD_KEY, f"{what}: neither a JSON card nor valid YAML ({first})") from None
    except RecursionError:
        raise UserError(CARD_KEY, f"{what}: YAML nested too deeply to be a card") from None


_PNG_ERRORS = (SyntaxError, ValueError, OSError, EOFError, struct.error, zlib.error, UnicodeError, KeyError,
               IndexError, AttributeError)


def _card_from_png(data: bytes, name: str) -> Card:
    """The `ccv3` (else `chara`) text chunk of a PNG, read with Pillow's chunk reader: no pixel is decoded."""
    from PIL import Image, PngImagePlugin

    texts: dict[str, str] = {}
    stream = PngImagePlugin.PngStream(io.BytesIO(data[len(PNG_SIGNATURE):]))
    try:
        while True:
            cid, pos, length = stream.read()
            if cid == b"IHDR":
                stream.crc(cid, stream.call(cid, pos, length))
                width, height = stream.im_size
                if width * height > Image.MAX_IMAGE_PIXELS:
                    raise UserError(CARD_KEY, f"{name}: a {width}x{height} PNG ({width * height:,} pixels) is over "
                                              f"the {Image.MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb?); "
                                              "a card's picture is a few megapixels")
            elif cid in (b"tEXt", b"zTXt", b"iTXt"):
                stream.crc(cid, stream.call(cid, pos, length))
                texts.update(stream.im_text)
            elif cid == b"IEND":
                break
            else:
                stream.fp.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC, unread
                if stream.fp.tell() > len(data):
                    raise EOFError("truncated chunk")
    except UserError:
        raise
    except _PNG_ERRORS as error:
        if not texts:
            raise UserError(CARD_KEY, f"{name}: a broken PNG ({type(error).__name__}: {error}), no card found "
                                      "before the damage") from None
    finally:
        stream.close()
    key = "ccv3" if "ccv3" in texts else "chara" if "chara" in texts else None
    if key is None:
        raise UserError(CARD_KEY, f"{name}: a PNG without a character card (no `chara` or `ccv3` text chunk)")
    encoded = texts[key]
    if len(encoded) > MAX_CARD_BYTES * 4 // 3 + 4:
        raise UserError(CARD_KEY, f"{name}: the `{key}` chunk holds {len(encoded):,} characters, over the "
                                  f"{MAX_CARD_BYTES:,}-byte card limit")
    try:
        raw = base64.b64decode(encoded.strip(), validate=False)
    except (binascii.Error, ValueError) as error:
        raise UserError(CARD_KEY, f"{name}: the `{key}` chunk is not base64 ({error})") from None
    text = _text_of(raw, f"{name}: the `{key}` chunk")
    return card_from_object(_parse_json(text, f"{name}: the `{key}` chunk"), f"PNG {key} chunk")


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError,
               ValueError, zlib.error, struct.error, OverflowError, KeyError, IndexError, UnicodeError)


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why extracting this member could write outside the target dir, or None."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    windows = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or windows.drive or PurePosixPath(name).is_absolute():
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a path that climbs out with .."
    return None


def _card_json_from_charx(data: bytes, name: str) -> bytes:
    """card.json of a CHARX zip, in memory, after the whole archive passed the safety checks."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > MAX_CHARX_MEMBERS:
                raise UserError(CARD_KEY, f"{name}: a CHARX with {len(members):,} members, over the "
                                          f"{MAX_CHARX_MEMBERS:,} limit")
            for info in members:
                problem = _unsafe_member(info)
                if problem is not None:
                    raise UserError(CARD_KEY, f"{name}: refused, member {info.filename[:120]!r} is {problem} "
                                              "(a zip-slip archive); nothing was read or extracted")
            total = sum(info.file_size for info in members)
            if total > MAX_CHARX_UNCOMPRESSED:
                raise UserError(CARD_KEY, f"{name}: a CHARX declaring {total:,} uncompressed bytes, over the "
                                          f"{MAX_CHARX_UNCOMPRESSED:,}-byte limit (a zip bomb?)")
            card = next((info for info in members if info.filename == "card.json"), None)
            if card is None:
                raise UserError(CARD_KEY, f"{name}: a zip without card.json at its root; a CHARX holds one")
            if card.file_size > MAX_CARD_BYTES:
                raise UserError(CARD_KEY, f"{name}: card.json declares {card.file_size:,} bytes, over the "
                                          f"{MAX_CARD_BYTES:,}-byte limit")
            with archive.open(card) as handle:
                text = handle.read(MAX_CARD_BYTES + 1)  # the declared size may lie: never read past the cap
            if len(text) > MAX_CARD_BYTES:
                raise UserError(CARD_KEY, f"{name}: card.json inflates past the {MAX_CARD_BYTES:,}-byte limit")
            return text
    except UserError:
        raise
    except _ZIP_ERRORS as error:
        raise UserError(CARD_KEY, f"{name}: not a readable CHARX zip ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------- parsing the card object

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _text(obj: dict, key: str, where: str) -> str:
    """A text field: absent or null is "", a number is its text, anything else is one line."""
    value = obj.get(key)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UserError(f"{CARD_KEY}.{where}{key}", f"must be a string, got {_type_name(value)}")
    if len(value) > MAX_FIELD_CHARS:
        raise UserError(f"{CARD_KEY}.{where}{key}", f"{len(value):,} characters, over the {MAX_FIELD_CHARS:,} limit "
                                                    "of a card field")
    return value.replace("\r\n", "\n")


def _text_list(obj: dict, key: str, where: str, notes: list[str]) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{CARD_KEY}.{where}{key}", f"must be an array of strings, got {_type_name(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise UserError(f"{CARD_KEY}.{where}{key}", f"{len(value):,} items, over the {MAX_LIST_ITEMS:,} limit")
    items = [_text({"item": item}, "item", f"{where}{key}.") for item in value if isinstance(item, (str, int, float))
             and not isinstance(item, bool)]
    if len(items) < len(value):
        notes.append(f"{where}{key}: {len(value) - len(items)} item(s) that are not text skipped")
    return items


V2_FIELDS = {"name", "description", "personality", "scenario", "first_mes", "mes_example", "creator_notes",
             "system_prompt", "post_history_instructions", "alternate_greetings", "character_book", "tags",
             "creator", "character_version", "extensions", "nickname"}
V3_METADATA = {"assets", "creator_notes_multilingual", "source", "group_only_greetings", "creation_date",
               "modification_date"}


def card_from_object(obj: Any, container: str) -> Card:
    """A parsed JSON/YAML value -> Card, whichever card format it is."""
    if not isinstance(obj, dict):
        raise UserError(CARD_KEY, f"a card is an object with a name, got {_type_name(obj)} ({container})")
    spec = obj.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data = obj.get("data")
        if not isinstance(data, dict):
            raise UserError(f"{CARD_KEY}.data", f"must be an object holding the card's fields, got {_type_name(data)}")
        version = "V2" if spec == "chara_card_v2" else "V3"
        return _card_from_v2(data, f"Character Card {version} ({container})", version)
    if spec is not None:
        raise UserError(f"{CARD_KEY}.spec", f"{str(spec)[:60]!r} is not a card spec lyra reads (chara_card_v2, "
                                            "chara_card_v3, or a V1 card without spec)")
    if "char_name" in obj:
        mapped = {"name": "char_name", "description": "char_persona", "scenario": "world_scenario",
                  "first_mes": "char_greeting", "mes_example": "example_dialogue"}
        return _card_from_mapping(obj, mapped, f"Character Card V1, Pygmalion fields ({container})")
    if "name" in obj and ({"context", "greeting", "example_dialogue"} & obj.keys()):
        mapped = {"name": "name", "description": "context", "first_mes": "greeting", "mes_example": "example_dialogue"}
        return _card_from_mapping(obj, mapped, f"text-generation-webui character ({container})")
    if "name" in obj and ({"description", "first_mes", "mes_example", "personality", "scenario"} & obj.keys()):
        mapped = {key: key for key in ("name", "description", "personality", "scenario", "first_mes", "mes_example")}
        return _card_from_mapping(obj, mapped, f"Character Card V1 ({container})")
    shown = ", ".join(sorted(str(key) for key in obj)[:8]) or "no keys"
    raise UserError(CARD_KEY, f"not a character card ({shown}); lyra reads Character Card V1/V2/V3 (JSON, PNG, "
                              "CHARX) and text-generation-webui character YAML (name, context, greeting); chat logs "
                              "go to --chats")


def _name(value: str, key: str) -> str:
    name = " ".join(value.split())
    if not name:
        raise UserError(f"{CARD_KEY}.{key}", "the card has no name; a persona needs one (edit the card and set it)")
    if len(name) > 200:
        raise UserError(f"{CARD_KEY}.{key}", f"a name of {len(name):,} characters; over the 200 a name may have")
    return name


def _card_from_mapping(obj: dict, mapped: dict[str, str], source: str) -> Card:
    card = Card(name=_name(_text(obj, mapped["name"], ""), mapped["name"]), source=source)
    for ours, theirs in mapped.items():
        if ours != "name":
            setattr(card, ours, _text(obj, theirs, ""))
    ignored = sorted(str(key) for key in obj if key not in mapped.values())
    if ignored:
        card.notes.append(f"ignored card field(s): {', '.join(ignored[:12])}{' ...' if len(ignored) > 12 else ''}")
    return card


def _card_from_v2(data: dict, source: str, version: str) -> Card:
    notes: list[str] = []
    card = Card(name=_name(_text(data, "name", "data."), "data.name"), source=source, notes=notes)
    for key in ("description", "personality", "scenario", "system_prompt", "post_history_instructions",
                "creator_notes", "first_mes", "mes_example", "creator", "character_version"):
        setattr(card, key, _text(data, key, "data."))
    card.nickname = " ".join(_text(data, "nickname", "data.").split()) if version == "V3" else ""
    card.alternate_greetings = _text_list(data, "alternate_greetings", "data.", notes)
    card.tags = _text_list(data, "tags", "data.", notes)
    card.book = _book(data.get("character_book"), notes)
    extensions = data.get("extensions")
    ignored = sorted(str(key) for key in data if key not in V2_FIELDS | V3_METADATA)
    if isinstance(extensions, dict):
        lyra = extensions.get("lyra")
        if isinstance(lyra, dict):
            card.lyra = {key: value for key in ("user_address", "language")
                         if isinstance(value := lyra.get(key), str) and 0 < len(value) <= 200}
        ignored += [f"extensions.{key}" for key in sorted(map(str, extensions)) if key != "lyra"]
    greetings = data.get("group_only_greetings")
    if isinstance(greetings, list) and greetings:
        notes.append(f"{len(greetings)} group_only_greetings not used (they open group chats, lyra trains one "
                     "character)")
    assets = data.get("assets")
    if isinstance(assets, list) and assets:
        notes.append(f"{len(assets)} asset(s) (images, sounds) not used: lyra trains text")
    if ignored:
        notes.append(f"ignored card field(s): {', '.join(ignored[:12])}{' ...' if len(ignored) > 12 else ''}")
    return card


def _entries(count: int) -> str:
    return "entry" if count == 1 else "entries"


def _book(book: Any, notes: list[str]) -> list[BookEntry]:
    if book is None:
        return []
    if not isinstance(book, dict):
        raise UserError(f"{CARD_KEY}.data.character_book", f"must be an object with entries, got {_type_name(book)}")
    entries = book.get("entries") or []
    if isinstance(entries, dict):  # SillyTavern's own world-info files key entries by uid
        entries = list(entries.values())
    if not isinstance(entries, list):
        raise UserError(f"{CARD_KEY}.data.character_book.entries", f"must be an array, got {_type_name(entries)}")
    if len(entries) > MAX_LIST_ITEMS:
        raise UserError(f"{CARD_KEY}.data.character_book.entries",
                        f"{len(entries):,} entries, over the {MAX_LIST_ITEMS:,} limit")
    result, skipped = [], 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped += 1
            continue
        where = f"data.character_book.entries[{index}]."
        content = _text(entry, "content", where)
        if not content.strip():
            skipped += 1
            continue
        order = entry.get("insertion_order", index)
        position = entry.get("position")
        result.append(BookEntry(
            keys=_text_list(entry, "keys", where, notes), content=content,
            constant=entry.get("constant") is True, enabled=entry.get("enabled", True) is not False,
            insertion_order=order if isinstance(order, (int, float)) and not isinstance(order, bool) else index,
            before_char=position in ("before_char", 0),
            name=_text(entry, "name", where) or _text(entry, "comment", where)))
    if skipped:
        notes.append(f"lorebook: {skipped} entries without text content skipped")
    return result


# ---------------------------------------------------------------- macros and example dialogue

def expand(text: str, char: str, user: str) -> str:
    """{{char}}/<BOT>/<CHAR> -> char and {{user}}/<USER> -> user, any case (the one rule of lyra.data)."""
    return expand_names(text, char, user)


@dataclass
class Examples:
    conversations: list[list[dict[str, str]]]
    dropped_lines: int = 0  # text before a block's first speaker label
    no_reply_blocks: int = 0  # blocks without a line of the character
    foreign_labels: dict[str, int] = field(default_factory=dict)  # "Name:" lines kept as continuation text


def parse_examples(mes_example: str, card: Card, user: str) -> Examples:
    """Each <START> block -> one conversation of user/assistant messages (V1 labels included)."""
    char_labels = {"{{char}}", "<bot>", "<char>", card.name.casefold(), card.char_name.casefold()}
    user_labels = {"{{user}}", "<user>", "you", user.casefold()}
    result = Examples([])
    for block in START.split(mes_example.replace("\r\n", "\n")):
        messages: list[dict[str, str]] = []
        for line in block.split("\n"):
            match = SPEAKER.match(line)
            label = re.sub(r"\s+", "", match.group(1)).casefold() if match else None
            role = "assistant" if label in {re.sub(r"\s+", "", x) for x in char_labels} else (
                "user" if label in {re.sub(r"\s+", "", x) for x in user_labels} else None)
            if role is not None:
                content = match.group(2)
                if messages and messages[-1]["role"] == role:  # one speaker's consecutive lines are one turn
                    messages[-1]["content"] += "\n" + content
                else:
                    messages.append({"role": role, "content": content})
            elif messages:
                if match and NAME_LIKE.match(match.group(1).strip()) and not match.group(2).startswith("//"):
                    name = match.group(1).strip()
                    result.foreign_labels[name] = result.foreign_labels.get(name, 0) + 1
                messages[-1]["content"] += "\n" + line
            elif line.strip():
                result.dropped_lines += 1
        messages = [{"role": m["role"], "content": expand(m["content"].strip(), card.char_name, user)}
                    for m in messages if m["content"].strip()]
        if not messages:
            continue
        if not any(m["role"] == "assistant" for m in messages):
            result.no_reply_blocks += 1
            continue
        result.conversations.append(messages)
    return result


# ---------------------------------------------------------------- compiling the persona

def compile_system_prompt(card: Card, user: str) -> tuple[str, list[str]]:
    """The persona's system prompt in the documented order (module docstring), and notes."""
    notes = []
    constant = sorted((entry for entry in card.book if entry.constant and entry.enabled),
                      key=lambda entry: entry.insertion_order)
    system = card.system_prompt
    if ORIGINAL_MACRO.search(system):
        system = ORIGINAL_MACRO.sub("", system)
        notes.append("system_prompt: {{original}} (the frontend's own system prompt) removed: lyra has none")
    parts = [system,
             *(entry.content for entry in constant if entry.before_char),
             card.description,
             f"{card.char_name}'s personality: {card.personality.strip()}" if card.personality.strip() else "",
             f"Scenario: {card.scenario.strip()}" if card.scenario.strip() else "",
             *(entry.content for entry in constant if not entry.before_char)]
    decorators = 0
    cleaned = []
    for part in parts:
        lines = part.split("\n")
        kept = [line for line in lines if not line.lstrip().startswith("@@")]
        decorators += len(lines) - len(kept)
        cleaned.append("\n".join(kept).strip())
    if decorators:
        notes.append(f"lorebook: {decorators} @@decorator line(s) removed from constant entries (they steer "
                     "a frontend's insertion, not the text)")
    prompt = expand("\n\n".join(part for part in cleaned if part), card.char_name, user)
    if constant:
        notes.append(f"lorebook: {len(constant)} constant {_entries(len(constant))} put into the system prompt")
    return prompt, notes


def detect_language(texts: list[str]) -> str | None:
    """zh-TW or en by lyra.persona's own checks on the card's text, or None when it is neither."""
    sample = "\n".join(texts)[:20_000]
    if is_traditional_chinese(sample):
        return "zh-TW"
    if is_english(sample):
        return "en"
    return None


def slugify(text: str) -> str:
    """A Hydra-safe option name: ASCII letters, digits and _ (accents folded), or "" when none are left."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", folded.lower())).strip("_")[:48]


SLUG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


@dataclass
class PersonaPlan:
    """Everything an import writes, computed without touching the disk (fuzzed as one unit)."""

    slug: str
    persona: dict[str, Any]  # name, user_address, system_prompt, language, labels, card metadata
    seed: list[dict]  # the card's greetings and examples, seed format
    train_chats: list[dict]
    eval_chats: list[dict]
    probes: list[dict]
    notes: list[str]


def plan_persona(card: Card, *, user_address: str | None = None, language: str | None = None,
                 slug: str | None = None, chats: list | None = None, eval_share: float = EVAL_SHARE,
                 seed: int = 0, fallback_slug: str = "") -> PersonaPlan:
    """The persona and its files from a Card (+ the user's chat conversations, lyra.data Conversations)."""
    notes = list(card.notes)
    if user_address is None:
        if card.lyra.get("user_address"):
            user_address = card.lyra["user_address"]
            notes.append(f"user_address {user_address!r} from the card's extensions.lyra (written by lyra's export)")
        else:
            user_address = DEFAULT_USER_ADDRESS
            notes.append(f"no --user-address: {{{{user}}}} becomes {DEFAULT_USER_ADDRESS!r} (SillyTavern's default "
                         f"user name) and address_rate counts replies that say it; pass --user-address NAME to "
                         "use the name you chat under")
    user_address = " ".join(str(user_address).split())
    if not user_address or any(colon in user_address for colon in ":："):
        raise UserError("--user-address", f"{user_address!r} must be a non-empty name without ':'")
    slug = slug if slug is not None else (slugify(card.name) or slugify(fallback_slug) or "character")
    if not SLUG.match(slug):
        raise UserError("--slug", f"{slug!r} must be letters, digits, _ or - (it becomes persona=<slug>)")

    system_prompt, prompt_notes = compile_system_prompt(card, user_address)
    notes += prompt_notes
    if not system_prompt.strip():
        system_prompt = f"You are {card.char_name}. Stay in character."
        notes.append(f"the card has no system_prompt, description, personality or scenario: the system prompt is "
                     f"{system_prompt!r}")

    greetings = [expand(text.strip(), card.char_name, user_address)
                 for text in [card.first_mes, *card.alternate_greetings] if text.strip()]
    examples = parse_examples(card.mes_example, card, user_address)
    if examples.dropped_lines:
        notes.append(f"mes_example: {examples.dropped_lines} line(s) before a block's first speaker label skipped")
    if examples.no_reply_blocks:
        notes.append(f"mes_example: {examples.no_reply_blocks} <START> block(s) without a line of "
                     f"{card.char_name} skipped (nothing to learn)")
    if examples.foreign_labels:
        shown = ", ".join(f"{name!r} ({count})" for name, count in sorted(examples.foreign_labels.items())[:5])
        notes.append(f"mes_example: line(s) starting like another speaker kept as part of the previous turn: {shown}")

    if language is None and card.lyra.get("language") in LANGUAGES:
        language = card.lyra["language"]
    if language is None:
        texts = [card.first_mes, card.description, card.personality, card.scenario, card.mes_example, *greetings]
        language = detect_language([text for text in texts if text])
        if language is None:
            simplified = has_simplified("".join(texts)[:20_000])
            raise UserError("--language", f"the card is written in neither {' nor '.join(LANGUAGES)}"
                                          f"{' (Simplified Chinese?)' if simplified else ''}; persona metrics "
                                          f"check replies in one of them: pass --language {'|'.join(LANGUAGES)}")
        notes.append(f"language {language} detected from the card's text (--language to override)")
    elif language not in LANGUAGES:
        raise UserError("--language", f"must be one of {', '.join(LANGUAGES)}, got {language!r}")

    leftovers = sorted({m.group(0) for text in [system_prompt, *greetings, card.mes_example]
                        for m in OTHER_MACRO.finditer(text) if not NAME_MACRO.fullmatch(m.group(0))})
    if leftovers:
        notes.append(f"{len(leftovers)} frontend macro(s) left as written: {', '.join(leftovers[:5])}")

    seed_records = [_seed_record(f"{slug}-greeting-{i}", [{"role": "assistant", "content": text}])
                    for i, text in enumerate(greetings, start=1)]
    seed_records += [_seed_record(f"{slug}-example-{i}", messages)
                     for i, messages in enumerate(examples.conversations, start=1)]
    if not seed_records and not chats:
        raise UserError(CARD_KEY, "the card has no greeting (first_mes) and no example dialogue (mes_example): "
                                  "nothing to train on; add your chats with --chats FILE")

    train_chats, eval_chats = split_chats(chats or [], eval_share, seed)
    if chats:
        notes.append(f"--chats: {len(chats)} conversation(s): {len(train_chats)} train, {len(eval_chats)} held out "
                     f"as the eval split (share {eval_share:g}, shuffled with seed {seed})")
    else:
        notes.append(f"no --chats: the training data is the card's {len(greetings)} greeting(s) and "
                     f"{len(examples.conversations)} example conversation(s) only, enough to run the pipeline but "
                     "not to learn a character; add your own logs with --chats FILE ...")
    if not eval_chats:
        notes.append("no eval split: eval_file is null (held-out conversations come from --chats, 2 or more)")

    prompts = []
    for record in eval_chats:
        first = next((m["content"] for m in record["messages"] if m["role"] == "user"), None)
        if first and first.strip() and first not in prompts:
            prompts.append(first.strip())
    probes = [{"id": f"{slug}-probe-{i}", "prompt": prompt} for i, prompt in enumerate(prompts, start=1)]
    if len(probes) < MIN_PROBES:
        generic = [p for p in GENERIC_PROBES[language] if p not in prompts][: MIN_PROBES - len(probes)]
        probes += [{"id": f"{slug}-generic-{i}", "prompt": p} for i, p in enumerate(generic, start=1)]
        notes.append(f"probes: {len(prompts)} held-out prompt(s) from your chats + {len(generic)} generic "
                     f"in-character probe(s) in {language} (the persona metrics need {MIN_PROBES})")

    lorebook = [{"keys": entry.keys, "content": entry.content, **({"name": entry.name} if entry.name else {}),
                 **({"enabled": False} if not entry.enabled else {})}
                for entry in sorted(card.book, key=lambda e: e.insertion_order) if not entry.constant]
    if lorebook:
        notes.append(f"lorebook: {len(lorebook)} keyword {_entries(len(lorebook))} listed in the persona file's card.lorebook, not "
                     "in the prompt (lyra's prompt is fixed; nothing scans the chat for keys)")
    metadata = {"source": card.source,
                **{key: value for key in ("creator_notes", "post_history_instructions", "creator",
                                          "character_version") if (value := getattr(card, key).strip())},
                **({"tags": card.tags} if card.tags else {}),
                **({"lorebook": lorebook} if lorebook else {})}
    if card.post_history_instructions.strip():
        notes.append("post_history_instructions kept in the persona file as metadata (lyra trains no jailbreak slot)")
    persona = {"name": card.char_name, "user_address": user_address, "system_prompt": system_prompt,
               "language": language, "user_label": f"{user_address}: ", "bot_label": f"{card.char_name}: ",
               "card": metadata}
    return PersonaPlan(slug, persona, seed_records, train_chats, eval_chats, probes, notes)


def _seed_record(record_id: str, messages: list[dict[str, str]]) -> dict:
    return {"id": record_id, "conversations": [{"from": m["role"], "value": m["content"]} for m in messages]}


def split_chats(conversations: list, eval_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """lyra.data Conversations -> (train, eval) OpenAI-format records; a seeded shuffle picks the held-out share.

    At least one conversation is held out when there are two or more, and at least one stays in train.
    """
    if not 0 <= eval_share < 1:
        raise UserError("--eval-share", f"must be in [0, 1), got {eval_share}")
    records = [{"id": c.id, "messages": c.messages, **({"tools": c.tools} if c.tools else {})} for c in conversations]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if len(records) >= 2 and eval_share > 0:
        n_eval = min(len(records) - 1, max(1, round(eval_share * len(records))))
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---------------------------------------------------------------- writing the persona

@dataclass
class ImportResult:
    slug: str
    persona_file: Path
    files: list[Path]
    notes: list[str]
    commands: list[str]


def import_card(card_path: str | Path, out_dir: str | Path, *, user_address: str | None = None,
                chats: list[str | Path] = (), language: str | None = None, slug: str | None = None,
                eval_share: float = EVAL_SHARE, seed: int = 0, overwrite: bool = False) -> ImportResult:
    """Read a card (and chat logs), write <out>/persona/<slug>.yaml and <out>/data/<slug>_*.jsonl.

    Paths inside the persona file are relative to the current directory when `out_dir` is relative (the
    printed train command runs from here, like every relative path in lyra), else absolute.
    """
    card_path = Path(card_path).expanduser()
    card = read_card(card_path)
    conversations = _load_chats(chats, card, user_address)
    plan = plan_persona(card, user_address=user_address, language=language, slug=slug, chats=conversations,
                        eval_share=eval_share, seed=seed, fallback_slug=card_path.stem)
    return write_plan(plan, Path(out_dir).expanduser(), overwrite)


def _load_chats(chats, card: Card, user_address: str | None) -> list:
    if not chats:
        return []
    from lyra.data import load_conversations  # the one reader of training, validate and stats

    labels = {label: role for label, role in ((card.char_name, "assistant"), (user_address, "user"))
              if label and not any(colon in label for colon in ":：")}
    conversations = []
    for path in chats:
        conversations += load_conversations(Path(path).expanduser(), key="--chats", labels=labels)
    return conversations


def _escape(value: Any) -> Any:
    """OmegaConf reads ${...} as an interpolation: a card's literal ${ is written as \\${."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_escape(item) for item in value]
    if isinstance(value, dict):
        return {key: _escape(item) for key, item in value.items()}
    return value


def _scalar(value: Any) -> str:
    """A YAML scalar: JSON strings are valid YAML double-quoted scalars."""
    return "null" if value is None else json.dumps(_escape(value), ensure_ascii=False)


def persona_yaml(plan: PersonaPlan, files: dict[str, str | None]) -> str:
    """The persona file, with a comment on every key (the model: conf/persona/lyra_en.yaml)."""
    import yaml

    p = plan.persona
    card_block = yaml.safe_dump({"card": _escape(p["card"])}, allow_unicode=True, sort_keys=False, width=100)
    return "\n".join([
        f"# {p['name']}: imported from a character card by `python -m lyra.persona import` ({p['card']['source']}).",
        "# Relative paths resolve against the directory you launch from: train from where you imported.",
        f"name: {_scalar(p['name'])}  # how the character refers to itself; self_name_rate counts it in probe replies",
        f"user_address: {_scalar(p['user_address'])}  # what {{{{user}}}} became; address_rate counts it in replies",
        f"system_prompt: {_scalar(p['system_prompt'])}  # compiled from the card (docs/cards.md: the order); used "
        "when a conversation has none, and by chat, web, evaluate and export",
        f"language: {p['language']}  # language_rate: en = English replies, zh-TW = Traditional Chinese",
        f"train_file: {_scalar(files['train_file'])}  # the card's greetings and examples (+ --chats' train share)",
        f"eval_file: {_scalar(files['eval_file'])}  # held-out --chats conversations; null = no eval split",
        f"probes_file: {_scalar(files['probes_file'])}  # {{\"id\", \"prompt\"}} lines the persona metrics use",
        f"user_label: {_scalar(p['user_label'])}  # chat transcript label of your lines",
        f"bot_label: {_scalar(p['bot_label'])}  # chat transcript label of the character's replies",
        "# The card's own metadata: not used in training; `python -m lyra.export format=card` writes it back.",
        card_block.rstrip(), ""])


def write_plan(plan: PersonaPlan, out_dir: Path, overwrite: bool = False) -> ImportResult:
    from lyra.data.txt import write_jsonl_atomic

    persona_file = out_dir / "persona" / f"{plan.slug}.yaml"
    data_dir = out_dir / "data"
    paths = {"seed": data_dir / f"{plan.slug}_seed.jsonl", "train": data_dir / f"{plan.slug}_train.jsonl",
             "eval": data_dir / f"{plan.slug}_eval.jsonl", "probes": data_dir / f"{plan.slug}_probes.jsonl"}
    targets = [persona_file, *paths.values()]
    existing = [path for path in targets if path.exists()]
    if existing and not overwrite:
        raise UserError("--out", f"{existing[0]} exists; pass --overwrite to replace the persona {plan.slug!r}, or "
                                 "--slug NAME for a new one")
    for path in existing:
        if path.is_dir():
            raise UserError("--out", f"{path} is a directory")
        path.unlink()

    def shown(path: Path) -> str:
        return str(path) if out_dir.is_absolute() else os.path.relpath(path.absolute(), Path.cwd())

    written = [paths["seed"], paths["probes"]]
    write_jsonl_atomic(plan.seed, paths["seed"])
    write_jsonl_atomic(plan.probes, paths["probes"])
    train = paths["seed"]
    if plan.train_chats:
        write_jsonl_atomic([*plan.seed, *plan.train_chats], paths["train"])
        train = paths["train"]
        written.append(train)
    eval_file = None
    if plan.eval_chats:
        write_jsonl_atomic(plan.eval_chats, paths["eval"])
        eval_file = paths["eval"]
        written.append(eval_file)
    files = {"train_file": shown(train), "eval_file": shown(eval_file) if eval_file else None,
             "probes_file": shown(paths["probes"])}
    text = persona_yaml(plan, files)
    persona_file.parent.mkdir(parents=True, exist_ok=True)
    staging = persona_file.with_name(f".{persona_file.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, persona_file)
    base = f"python -m lyra.train --config-dir {shlex.quote(shown(out_dir))} persona={plan.slug}"
    commands = [f"{base} experiment=smoke", f"{base} experiment=cpu_real", base]
    return ImportResult(plan.slug, persona_file, [persona_file, *written], plan.notes, commands)


# ---------------------------------------------------------------- writing a card (export format=card)

MAX_EXPORT_EXAMPLES = 3  # <START> blocks in an exported card: frontends put them in every prompt
MAX_EXPORT_GREETINGS = 6  # first_mes + alternate_greetings (swipes)
EXAMPLE_TURNS = 4  # messages per exported example (two exchanges)


def card_from_persona(persona: dict, conversations: list) -> tuple[dict, list[str]]:
    """A Character Card V2 object from a persona and its training conversations (lyra.data Conversations).

    Greetings are the conversations that open with the character (the imported first_mes and
    alternate_greetings come back as they went in); examples are the first conversations with a user
    turn and a reply, as <START> blocks. The persona's system prompt goes into `system_prompt` alone,
    so importing the card compiles exactly that prompt back.
    """
    name, user = str(persona["name"]), str(persona["user_address"])
    metadata = dict(persona.get("card") or {})
    notes = []
    greetings, examples = [], []
    for conversation in conversations:
        messages = [m for m in conversation.messages if m["role"] != "system"]
        if any(m["role"] not in ("user", "assistant") or "\n<START>" in f"\n{m['content']}" for m in messages):
            continue
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            if len(greetings) < MAX_EXPORT_GREETINGS and messages[0]["content"] not in greetings:
                greetings.append(messages[0]["content"])
        elif messages and messages[0]["role"] == "user" and len(examples) < MAX_EXPORT_EXAMPLES:
            turns = messages[:EXAMPLE_TURNS]
            while turns and turns[-1]["role"] != "assistant":
                turns.pop()
            if turns:
                label = {"user": "{{user}}", "assistant": "{{char}}"}
                examples.append("<START>\n" + "\n".join(f"{label[m['role']]}: {m['content']}" for m in turns))
    if not greetings:
        notes.append("no conversation in the run's data opens with the character: the card has no greeting "
                     "(first_mes is empty; SillyTavern then waits for you to speak first)")
    mes_example = "\n".join(examples)
    book = [{"keys": list(entry.get("keys") or []), "content": entry["content"], "extensions": {},
             "enabled": entry.get("enabled", True), "insertion_order": index, "constant": False,
             **({"name": entry["name"]} if entry.get("name") else {})}
            for index, entry in enumerate(metadata.get("lorebook") or [])]
    creator_notes = metadata.get("creator_notes") or (
        f"{name}, trained with lyra. The system prompt is the one the model was trained with; use it with the "
        "lyra server or the model's export as the backend.")
    data = {"name": name, "description": "", "personality": "", "scenario": "",
            "first_mes": greetings[0] if greetings else "", "mes_example": mes_example,
            "creator_notes": creator_notes, "system_prompt": str(persona["system_prompt"]),
            "post_history_instructions": metadata.get("post_history_instructions", ""),
            "alternate_greetings": greetings[1:], "tags": list(metadata.get("tags") or ["lyra"]),
            "creator": metadata.get("creator", ""), "character_version": metadata.get("character_version", ""),
            "extensions": {"lyra": {"user_address": user, "language": str(persona["language"])}}}
    if book:
        data["character_book"] = {"name": f"{name} lore", "extensions": {}, "entries": book}
    # Most V2 writers repeat the V1 fields at the top level, for readers that only know V1.
    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            **{key: data[key] for key in ("name", "description", "personality", "scenario", "first_mes",
                                          "mes_example")},
            "data": data}
    return card, notes


def card_png(card: dict) -> bytes:
    """A small generated picture (a colour from the name, its initial) carrying the card in a `chara` chunk."""
    import hashlib

    from PIL import Image, ImageDraw, PngImagePlugin

    digest = hashlib.sha256(card["data"]["name"].encode("utf-8")).digest()
    background = tuple(64 + byte % 128 for byte in digest[:3])
    image = Image.new("RGB", (256, 256), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((48, 48, 208, 208), fill=tuple(255 - channel // 2 for channel in background))
    initial = next((char for char in card["data"]["name"] if char.isascii() and char.isalnum()), "")
    if initial:
        draw.text((128, 128), initial.upper(), fill=background, anchor="mm", font_size=96)
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8")).decode("ascii"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_card_files(card: dict, output_dir: Path, stem: str) -> list[Path]:
    """<stem>.json and <stem>.png into output_dir, staged beside it and renamed into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        (staging / f"{stem}.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (staging / f"{stem}.png").write_bytes(card_png(card))
        staging.chmod(0o755)
        if output_dir.exists():
            shutil.rmtree(output_dir)  # the caller checked it is empty or overwrite=true
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [output_dir / f"{stem}.json", output_dir / f"{stem}.png"]


def write_run_card(run_dir: Path, output_dir: Path) -> tuple[list[Path], list[str]]:
    """A trained run's persona as a Character Card V2 (JSON + PNG) in output_dir; returns (files, notes)."""
    from omegaconf import OmegaConf

    from lyra.data import load_conversations
    from lyra.runs import launch_dir, load_run_config, run_persona

    cfg = load_run_config(run_dir)
    persona = OmegaConf.to_container(run_persona(cfg, run_dir), resolve=True)
    train_file = cfg.data.get("train_file") or persona.get("train_file")
    path = Path(str(train_file)).expanduser()
    if not path.is_absolute():
        path = (launch_dir(run_dir) or Path.cwd()) / path
    conversations = load_conversations(path, key="data.train_file", on_invalid="skip")
    card, notes = card_from_persona(persona, conversations)
    stem = slugify(str(persona["name"])) or "character"
    return write_card_files(card, output_dir, stem), notes
