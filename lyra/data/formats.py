"""Reading conversation files: which reader a file goes to, and what a problem costs (the error policy).

    from lyra.data.formats import load_conversations, read_conversations, read_file
    conversations = load_conversations("my_dialogues.jsonl")             # UserError on any problem
    conversations, problems = read_conversations("my_dialogues.jsonl")  # everything, for `validate`
    report = read_file("chat.jsonl", labels={"Kyon": "user"})  # + ignored fields and counts, for every front end

Accepted, in `.jsonl` (one object per line) or `.json` (a top-level array, or one object), UTF-8
with or without a BOM, LF or CRLF, blank lines ignored:
- the chat family (`lyra.data.dialects.chat`): seed, ShareGPT, OpenAI `messages`, alpaca, Firefly;
- role-play records (`lyra.data.dialects.roleplay`): PIPPA, text-generation-webui history,
  ChatHaruhi dialogues and pairs, speaker dialogues, RoleBench;
- SillyTavern chats (`lyra.data.dialects.sillytavern`): a whole `.jsonl` file is one conversation;
- plain-text transcripts (`lyra.data.dialects.transcript`, `.txt` files).
docs/roleplay-data.md and the README's Data section show each shape.

Every problem is a `Problem` that prints as `FILE:LINE: message`, LINE being the line where the
offending conversation starts (for a `.json` array: where its element starts). Damage costs only
the damaged record: a bad line of a `.jsonl` (broken JSON or bytes that are not UTF-8) or a broken
element of a `.json` array is one problem, and reading goes on after it. A record of no known
shape is told the closest one and how to convert it; a file that is not conversations at all (a
character card, an image, an archive) is told so in one line, before any decoding.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lyra.data.dialects import ReadContext, normalize_record, sillytavern
from lyra.data.dialects.roleplay import is_character_card
from lyra.data.jsontext import is_multiline_document, json_array_records, jsonl_records, progress_bar
from lyra.data.records import (MAX_REPORTED_PROBLEMS, Conversation, FileReport, Problem, decode_lines,
                               format_problems)
from lyra.data.dialects.transcript import parse_txt
from lyra.errors import UserError

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")

__all__ = ["read_file", "read_conversations", "load_conversations", "load_checked", "check_problems",
           "file_type_problem", "ON_INVALID"]

# Magic numbers of files people hand to a data loader by mistake: (prefix, what it is).
_BINARY_KINDS = ((b"\x1f\x8b", "a gzip archive"), (b"%PDF", "a PDF document"), (b"\xff\xd8\xff", "a JPEG image"),
                 (b"GIF8", "a GIF image"), (b"PAR1", "a Parquet table"), (b"SQLite format 3\x00", "an SQLite database"),
                 (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ\x00", "an xz archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
                 (b"ARROW1", "an Arrow table"), (b"\x93NUMPY", "a NumPy array"))
_CARD_TEXT_CHUNKS = (b"tEXtchara\x00", b"tEXtccv3\x00")  # V2 and V3 cards embedded in a PNG
_YAML_CHARACTER = re.compile(r"^(name|char_name|context|greeting|char_persona|description|first_mes)\s*:",
                             re.MULTILINE)


def card_refusal(path: Path) -> str:
    return f"this is a character card, not a conversation file: `python -m lyra.persona import {path}`"


def _not_conversations(what: str) -> str:
    return f"not a conversation file: {what} (lyra reads conversations from .jsonl, .json and .txt)"


def file_type_problem(data: bytes, path: Path) -> Problem | None:
    """One problem for a file that holds no conversations by its type (card, image, archive), else None."""
    suffix = path.suffix.lower()
    head = data[:4096]
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        is_card = any(chunk in data for chunk in _CARD_TEXT_CHUNKS)
        return Problem(path, 1, card_refusal(path) if is_card else _not_conversations("a PNG image"))
    if data.startswith(b"PK\x03\x04"):
        if suffix == ".charx" or b"card.json" in data[:65536]:
            return Problem(path, 1, card_refusal(path))
        return Problem(path, 1, _not_conversations("a zip archive; unpack it and give the conversation file inside"))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return Problem(path, 1, f"UTF-16 text; convert it with `iconv -f UTF-16 -t UTF-8 {path.name} > "
                                f"{path.stem}.utf8{path.suffix}`")
    for magic, what in _BINARY_KINDS:
        if data.startswith(magic):
            return Problem(path, 1, _not_conversations(what))
    if suffix in (".yaml", ".yml"):
        text = head.decode("utf-8", errors="replace")
        if len(set(_YAML_CHARACTER.findall(text))) >= 2:
            return Problem(path, 1, card_refusal(path))
        return Problem(path, 1, _not_conversations("a YAML file"))
    if b"\x00" in head:
        return Problem(path, 1, _not_conversations("binary data"))
    return None


def read_file(path: str | Path, labels: dict[str, str] | None = None, normalize=None) -> FileReport:
    """Every usable conversation of `path`, every problem in file order, the ignored fields and the counts.

    `labels` maps speaker names and `.txt` labels to roles (label -> system|user|assistant). `normalize`
    reads another kind of record with the same file handling (lyra.data.preference: pairs); it has
    `normalize_record`'s signature.
    """
    path = Path(path)
    data = path.read_bytes()
    refused = file_type_problem(data, path)
    if refused is not None:
        return FileReport(path, [], [refused])
    text, problems = decode_lines(data, path)
    if text is None:
        return FileReport(path, [], problems)
    if not text.strip():
        return FileReport(path, [], problems or [Problem(path, 1, "empty file: no conversations")])
    if path.suffix.lower() == ".txt":
        if problems:  # a blanked line would split a transcript's conversation in two: fix the bytes first
            return FileReport(path, [], problems)
        conversations, txt_problems = parse_txt(text, path, labels)
        return FileReport(path, conversations, txt_problems)
    stripped = text.lstrip()
    is_json = path.suffix.lower() == ".json"
    if not is_json and stripped[:1] in "[{" and "\n" in stripped.strip() and is_multiline_document(text):
        rows = len(text.splitlines())
        what = "one JSON array" if stripped.startswith("[") else "one JSON object"
        return FileReport(path, [], [Problem(path, 1, f"this {path.suffix or 'file'} holds {what} spanning "
                                                      f"{rows} lines, not one object per line: rename it to "
                                                      f"{path.stem}.json", drops=0)])
    progress = progress_bar(path, len(text), "reading")
    try:
        if is_json and stripped.startswith("["):
            records, parse_problems = json_array_records(text, path, progress)
        elif is_json and is_multiline_document(text):  # one object: a webui history, one PIPPA record
            first_line = text[: len(text) - len(stripped)].count("\n") + 1
            records, parse_problems = [(first_line, json.loads(text))], []
        else:
            records, parse_problems = jsonl_records(text, path, progress)
    finally:
        if progress is not None:
            progress.close()
    context = ReadContext(labels)
    if normalize is not None:
        problems += parse_problems
        conversations = _read_records(records, path, context, problems, normalize)
    elif sillytavern.claims(records):
        conversations, record_problems = sillytavern.read(records, problems + parse_problems, path, context)
        problems = record_problems
    else:
        problems += parse_problems
        conversations = _read_records(records, path, context, problems)
    unmapped = context.unmapped_problem(path)
    if unmapped is not None:
        problems.append(unmapped)
    problems.sort(key=lambda problem: problem.line)
    if not conversations and not problems:
        problems.append(Problem(path, 1, "empty file: no conversations"))
    return FileReport(path, conversations, problems, context.ignored, context.counts, context.characters)


def _read_records(records: list, path: Path, context: ReadContext, problems: list[Problem],
                  normalize=normalize_record) -> list[Conversation]:
    conversations = []
    for line_number, record in records:
        if is_character_card(record):
            problems.append(Problem(path, line_number, card_refusal(path)))
            continue
        context.line = line_number
        conversation, error = normalize(record, f"{path.stem}-{line_number}", context)
        if conversation is not None:
            conversation.line = line_number
            conversations.append(conversation)
        elif error is not None:
            problems.append(Problem(path, line_number, error))
    return conversations


def read_conversations(path: str | Path, labels: dict[str, str] | None = None
                       ) -> tuple[list[Conversation], list[Problem]]:
    """Every usable conversation of `path` and every problem, in file order."""
    report = read_file(path, labels)
    return report.conversations, report.problems


def load_conversations(path: str | Path, key: str = "data.train_file", on_invalid: str = "error",
                       labels: dict[str, str] | None = None) -> list[Conversation]:
    """Usable conversations of `path`; problems stop the run (`error`) or are skipped (`skip`).

    With `error` the UserError lists the problems as `FILE:LINE: message`, repeated ones grouped,
    at most MAX_REPORTED_PROBLEMS lines.
    """
    return load_checked(path, key, on_invalid, labels)[0]


def load_checked(path: str | Path, key: str = "data.train_file", on_invalid: str = "error",
                 labels: dict[str, str] | None = None) -> tuple[list[Conversation], list[Problem]]:
    """Like `load_conversations`, also returning the problems skipped under `on_invalid=skip`."""
    if on_invalid not in ON_INVALID:
        raise UserError("data.on_invalid", f"must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    path = Path(path)
    if not path.is_file():
        raise UserError(key, f"file not found: {path}")
    report = read_file(path, labels)
    check_problems(report.problems, report.conversations, path, key, on_invalid)
    return report.conversations, report.problems


def check_problems(problems: list[Problem], conversations: list, path: Path, key: str, on_invalid: str) -> None:
    """Stop on problems (`error`, or nothing usable left), or log what `skip` costs."""
    if problems and (on_invalid == "error" or not conversations):
        hint = "fix them or set data.on_invalid=skip" if conversations else "no usable conversation"
        raise UserError(key, f"{len(problems)} problem(s) in {path} ({hint}):\n"
                             f"{format_problems(problems, MAX_REPORTED_PROBLEMS)}")
    if problems:
        log.warning("%s: skipped %d invalid conversation(s) (data.on_invalid=skip), kept %d; first: %s",
                    path, sum(p.drops for p in problems), len(conversations), problems[0])


