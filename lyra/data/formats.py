"""Reading conversation files into one internal type, `Conversation`, with exact problem locations.

    from lyra.data.formats import load_conversations, read_conversations
    conversations = load_conversations("my_dialogues.jsonl")             # UserError on any problem
    conversations, problems = read_conversations("my_dialogues.jsonl")  # everything, for `validate`

Accepted, in `.jsonl` (one object per line) or `.json` (a top-level array), UTF-8 with or without
a BOM, LF or CRLF, blank lines ignored:
    seed      {"id": ..., "conversations": [{"from": "system"|"user"|"assistant", "value": "..."}]}
    ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
and the plain-text transcript format of `lyra.data.txt` (`.txt` files).

Every problem is a `Problem` that prints as `FILE:LINE: message`, LINE being the line where the
offending conversation starts (for a `.json` array: where its element starts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.errors import UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
ON_INVALID = ("error", "skip")
MAX_REPORTED_PROBLEMS = 20  # data.on_invalid=error shows this many; `validate` shows all


@dataclass
class Conversation:
    """One dialogue; messages are chat-template dicts {"role", "content"}."""

    id: str
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def assistant_turns(self) -> int:
        return sum(message["role"] == "assistant" for message in self.messages)


@dataclass(frozen=True)
class Problem:
    """Why one conversation (or the whole file) cannot be used."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _message_text(value: Any) -> str | None:
    """A message's text; OpenAI content parts ([{"type": "text", "text": ...}]) are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(part, dict) and part.get("type") == "text"
                                                 and isinstance(part.get("text"), str) for part in value):
        return "".join(part["text"] for part in value)
    return None


def normalize_record(record: Any, default_id: str) -> tuple[Conversation | None, str | None]:
    """(conversation, None) for a usable record in any accepted format, else (None, why not)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {_type_name(record)}"
    list_key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
    if list_key is None:
        return None, 'missing "conversations" (or OpenAI-style "messages")'
    turns = record[list_key]
    if not isinstance(turns, list):
        return None, f'"{list_key}" must be a list of messages, got {_type_name(turns)}'
    if not turns:
        return None, f'"{list_key}" is empty'
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            return None, f"message {number} must be an object, got {_type_name(turn)}"
        role_key = "from" if "from" in turn else "role" if "role" in turn else None
        text_key = "value" if "value" in turn else "content" if "content" in turn else None
        if role_key is None:
            return None, f'message {number} has no role ("from" or "role")'
        if text_key is None:
            return None, f'message {number} has no text ("value" or "content")'
        role = ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            return None, (f'message {number} has unknown role {json.dumps(turn[role_key], ensure_ascii=False)} '
                          f"(expected one of {', '.join(ROLE_ALIASES)})")
        text = _message_text(turn[text_key])
        if text is None:
            return None, f'message {number} ({role}): "{text_key}" must be a string, got {_type_name(turn[text_key])}'
        if not text.strip():
            return None, f"message {number} ({role}) is empty"
        messages.append({"role": role, "content": text})
    if not any(message["role"] == "assistant" for message in messages):
        return None, "conversation has no assistant turn (nothing to learn from)"
    record_id = record.get("id")
    conversation_id = default_id if record_id is None or isinstance(record_id, (dict, list)) else str(record_id)
    return Conversation(conversation_id, messages), None


def decode_text(data: bytes, path: Path) -> tuple[str | None, list[Problem]]:
    """The file's text (BOM dropped), or one problem per line holding bytes that are not UTF-8."""
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    problems = []
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(Problem(path, line_number, f"bytes that are not UTF-8 (0x{raw[error.start]:02x} at "
                                                       f"column {error.start + 1}); re-save the file as UTF-8"))
    return None, problems


def _jsonl_records(text: str, path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    records, problems = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(Problem(path, line_number, f"invalid JSON at column {error.colno}: {error.msg}"))
    return records, problems


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _json_array_records(text: str, path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Elements of a top-level array, each with the line where it starts."""
    decoder = json.JSONDecoder()

    def problem_at(index: int, message: str) -> Problem:
        line = text.count("\n", 0, index) + 1
        return Problem(path, line, f"invalid JSON at column {index - (text.rfind(chr(10), 0, index) + 1) + 1}: {message}")

    records: list[tuple[int, Any]] = []
    index = _skip_whitespace(text, text.index("[") + 1)
    if index < len(text) and text[index] == "]":
        return [], []
    while True:
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            return records, [Problem(path, error.lineno, f"invalid JSON at column {error.colno}: {error.msg}")]
        records.append((text.count("\n", 0, index) + 1, value))
        index = _skip_whitespace(text, end)
        if index >= len(text):
            return records, [problem_at(index, "the array is not closed with ']'")]
        if text[index] == "]":
            trailing = _skip_whitespace(text, index + 1)
            if trailing < len(text):
                return records, [problem_at(trailing, "extra data after the array")]
            return records, []
        if text[index] != ",":
            return records, [problem_at(index, "expected ',' or ']' between conversations")]
        index = _skip_whitespace(text, index + 1)


def _is_multiline_document(text: str) -> bool:
    """A pretty-printed single JSON value, which JSON Lines parsing would report line by line."""
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def read_conversations(path: str | Path, labels: dict[str, str] | None = None
                       ) -> tuple[list[Conversation], list[Problem]]:
    """Every usable conversation of `path` and every problem, in file order.

    `labels` adds role labels for `.txt` transcripts (label -> system|user|assistant).
    """
    path = Path(path)
    data = path.read_bytes()
    text, problems = decode_text(data, path)
    if text is None:
        return [], problems
    if not text.strip():
        return [], [Problem(path, 1, "empty file: no conversations")]
    if path.suffix.lower() == ".txt":
        from lyra.data.txt import parse_txt

        return parse_txt(text, path, labels)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records, problems = _json_array_records(text, path)
    elif path.suffix.lower() == ".json" and _is_multiline_document(text):
        return [], [Problem(path, 1, "a .json file must hold an array of conversations (or JSON Lines), "
                                     f"got {_type_name(json.loads(text))} spanning several lines")]
    else:
        records, problems = _jsonl_records(text, path)
    conversations = []
    for line_number, record in records:
        conversation, error = normalize_record(record, default_id=f"{path.stem}-{line_number}")
        if conversation is None:
            problems.append(Problem(path, line_number, error))
        else:
            conversations.append(conversation)
    problems.sort(key=lambda problem: problem.line)
    if not conversations and not problems:
        problems.append(Problem(path, 1, "empty file: no conversations"))
    return conversations, problems


def format_problems(problems: list[Problem], limit: int | None = MAX_REPORTED_PROBLEMS) -> str:
    shown = problems if limit is None else problems[:limit]
    lines = [str(problem) for problem in shown]
    if len(problems) > len(shown):
        lines.append(f"... and {len(problems) - len(shown)} more (run `python -m lyra.data validate FILE` for all)")
    return "\n".join(lines)


def load_conversations(path: str | Path, key: str = "data.train_file", on_invalid: str = "error",
                       labels: dict[str, str] | None = None) -> list[Conversation]:
    """Usable conversations of `path`; problems stop the run (`error`) or are skipped (`skip`).

    With `error` the UserError lists the first 20 problems as `FILE:LINE: message`.
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
    conversations, problems = read_conversations(path, labels)
    if problems and (on_invalid == "error" or not conversations):
        hint = "fix them or set data.on_invalid=skip" if conversations else "no usable conversation"
        raise UserError(key, f"{len(problems)} problem(s) in {path} ({hint}):\n{format_problems(problems)}")
    if problems:
        log.warning("%s: skipped %d invalid conversation(s) (data.on_invalid=skip), kept %d; first: %s",
                    path, len(problems), len(conversations), problems[0])
    return conversations, problems
