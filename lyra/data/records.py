"""The data layer's types and the bytes -> text step: what every reader returns and how problems print.

    from lyra.data.records import Conversation, Problem, FileReport, decode_text, format_problems
    text, problems = decode_text(path.read_bytes(), path)   # UTF-8 (BOM dropped) or FILE:LINE problems
    print(format_problems(report.problems))                 # the same problem on many records: one line

`Conversation` is lyra's one internal dialogue type; `Problem` prints as `FILE:LINE: message`;
`FileReport` is one file read: usable conversations, problems, ignored fields and the counts of
what a dialect left out or added (skipped swipes, hidden system lines, ...), which every front end
prints (`FileReport.notes`). Nothing here knows a file format: the readers are `lyra.data.formats`
(dispatch and error policy), `lyra.data.dialects` (one module per family) and `lyra.data.txt`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 20  # lines of problems one file prints (grouped), in `validate` and in training's error
PROGRESS_BYTES = 4 * 1024 * 1024  # files above this show progress bars (reading, encoding, stats)
SHOWN_LINES_PER_GROUP = 3  # a problem repeated on many records names its first lines only


@dataclass
class Conversation:
    """One dialogue; messages are chat-template dicts {"role", "content"} (+ "tool_calls", "weight").

    `tools` are the function schemas given to the chat template (`tools=`); `line` is where the
    record starts in its file, for FILE:LINE problems found later (by the encoder). `no_system_prompt`
    marks a record that set an empty system prompt on purpose: data.system_prompt is not inserted.
    """

    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict] | None = None
    line: int = field(default=0, compare=False)
    no_system_prompt: bool = False

    @property
    def assistant_turns(self) -> int:
        return sum(message["role"] == "assistant" for message in self.messages)


@dataclass(frozen=True)
class Problem:
    """Why one conversation (or the whole file) cannot be used.

    `drops` is how many conversations it costs under data.on_invalid=skip: 1 for a bad record, 0 for a
    slip that loses nothing (a missing ',' between two intact array elements).
    """

    path: Path
    line: int
    message: str
    drops: int = field(default=1, compare=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


# What a dialect left out or added without it being a problem, as "count what" lines in notes().
COUNT_NOTES = {
    "swipes_skipped": "alternative swipes not trained (the chosen one, `mes`, is)",
    "hidden_system_skipped": "hidden (is_system) SillyTavern messages skipped, as SillyTavern keeps them out of the "
                             "prompt",
    "narrator_system_turns": "narrator messages kept as system turns",
    "empty_messages_skipped": "empty messages skipped",
    "greetings_kept": "greetings kept as an opening assistant turn",
    "alternatives_skipped": "alternative answers not trained (the first one of each list is)",
    "empty_system_kept": "conversations with an explicit empty system prompt, kept without one "
                         "(data.system_prompt is not inserted)",
    "names_prefixed": "messages prefixed with their speaker's name (several speakers share one role)",
}


@dataclass
class FileReport:
    """Everything read from one file: usable conversations, problems, the fields lyra ignored, the counts."""

    path: Path
    conversations: list[Conversation]
    problems: list[Problem]
    ignored_fields: Counter = field(default_factory=Counter)  # "field" or "message.field" -> records
    counts: Counter = field(default_factory=Counter)  # COUNT_NOTES key -> how many
    characters: Counter = field(default_factory=Counter)  # one-turn persona sets: character -> records

    @property
    def skipped(self) -> int:
        return sum(problem.drops for problem in self.problems)

    def ignored_note(self) -> str | None:
        """One line listing the fields lyra does not train on, or None."""
        if not self.ignored_fields:
            return None
        fields = ", ".join(f'"{name}" ({count})' for name, count in sorted(self.ignored_fields.items()))
        return f"{self.path}: ignored field(s), not used for training (records): {fields}"

    def count_notes(self) -> list[str]:
        """One line per thing left out or added (swipes, hidden system lines, empty system prompts, ...)."""
        lines = [f"{self.path}: {self.counts[key]} {what}" for key, what in COUNT_NOTES.items() if self.counts[key]]
        if len(self.characters) > 1:
            top = ", ".join(f"{name} ({count})" for name, count in self.characters.most_common(5))
            more = f" and {len(self.characters) - 5} more" if len(self.characters) > 5 else ""
            lines.append(f"{self.path}: answers of {len(self.characters)} different characters, all trained as one "
                         f"persona: {top}{more}; keep one character's records to train that character")
        return lines


class RecordError(Exception):
    """A record that cannot be used; the message says what is wrong and how to fix it."""


def shown(text: Any, limit: int = 40) -> str:
    """A value from a user's file as it may appear in a one-line problem: control characters escaped, cut short."""
    text = str(text)
    if any(character < " " or character in "\u2028\u2029" for character in text):
        text = json.dumps(text, ensure_ascii=False)[1:-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------------------------
# Problems -> lines: the same problem on many records is one line, and a file prints at most ~20.

def _problem_kind(problem: Problem) -> str:
    """What makes two problems 'the same': the message with its numbers (message 3, column 12) blanked."""
    return re.sub(r"\d+", "#", problem.message)


def group_problems(problems: list[Problem]) -> list[list[Problem]]:
    """Problems of one file grouped by kind, in order of first appearance."""
    groups: dict[tuple[Path, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.path, _problem_kind(problem)), []).append(problem)
    return list(groups.values())


def format_group(group: list[Problem]) -> str:
    first = group[0]
    if len(group) == 1:
        return str(first)
    lines = ", ".join(str(problem.line) for problem in group[:SHOWN_LINES_PER_GROUP])
    more = ", ..." if len(group) > SHOWN_LINES_PER_GROUP else ""
    return f"{first} ({len(group)} times: lines {lines}{more})"


def format_problems(problems: list[Problem], limit: int | None = MAX_REPORTED_PROBLEMS) -> str:
    """Problems as `FILE:LINE: message` lines, repeated ones grouped, at most `limit` lines (None: all groups)."""
    groups = group_problems(problems)
    shown = groups if limit is None or len(groups) <= limit else groups[:limit - 1]  # the summary is line `limit`
    lines = [format_group(group) for group in shown]
    if len(groups) > len(shown):
        hidden = sum(len(group) for group in groups[len(shown):])
        lines.append(f"... and {hidden} more problem(s) of {len(groups) - len(shown)} other kind(s) "
                     "(fix these first, then run `python -m lyra.data validate FILE` again)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Bytes -> text, one line at a time, with a hint naming the likely encoding.

# Frequent characters of Chinese prose (both scripts): text decoded with the right codec is full of
# them, text decoded with the wrong one is not.
_COMMON_HAN = set("的一是不了人我在有他這这個个們们來来說说為为中大上你到和地也子時时道出要就下得可那以生會会能"
                  "對对自之過过去還还多麼么心好看天都學学家裡里後后把您請请嗎吗呢吧今日")
_CANDIDATE_ENCODINGS = (("big5", "BIG5"), ("gbk", "GBK"), ("shift_jis", "SHIFT_JIS"), ("cp1252", "CP1252"))


def guess_encoding(data: bytes) -> str | None:
    """The likely encoding (iconv name) of bytes that are not UTF-8: Big5, GBK, Shift-JIS or cp1252."""
    scores = []
    for codec, name in _CANDIDATE_ENCODINGS:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if codec == "cp1252":  # decodes almost anything: only when no CJK codec reads familiar text
            return name if not scores or max(scores)[0] == 0 else max(scores)[1]
        scores.append((sum(character in _COMMON_HAN for character in text), name))
    return max(scores)[1] if scores and max(scores)[0] > 0 else None


def _encoding_hint(bad: list[bytes], path: Path) -> str:
    encoding = guess_encoding(b"\n".join(bad))
    if encoding is None:
        return "re-save the file as UTF-8"
    return (f"it looks like {encoding}: convert the file with "
            f"`iconv -f {encoding} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`")


def decode_lines(data: bytes, path: Path) -> tuple[str | None, list[Problem]]:
    """The file's text (BOM dropped); lines holding bytes that are not UTF-8 become problems and blank.

    None (with one problem) when most of the file is not UTF-8: the whole file is in another encoding.
    """
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    texts, bad = [], []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            bad.append((number, raw, error.start))
            texts.append("")
    hint = _encoding_hint([raw for _, raw, _ in bad], path)
    non_blank = sum(1 for raw in raw_lines if raw.strip())
    if len(bad) * 2 > non_blank:
        return None, [Problem(path, bad[0][0], f"the file is not UTF-8 ({len(bad)} of {non_blank} lines); {hint}",
                              drops=len(bad))]
    problems = [Problem(path, number, f"bytes that are not UTF-8 (0x{raw[start]:02x} at column {start + 1}); {hint}")
                for number, raw, start in bad]
    return "\n".join(texts), problems


def decode_text(data: bytes, path: Path) -> tuple[str | None, list[Problem]]:
    """The file's text (BOM dropped), or one problem per line holding bytes that are not UTF-8."""
    text, problems = decode_lines(data, path)
    return (None, problems) if problems else (text, [])
