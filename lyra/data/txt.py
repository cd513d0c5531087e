"""Plain-text transcripts -> seed-format JSONL.

    from lyra.data import convert_txt_to_jsonl
    convert_txt_to_jsonl("chats.txt", "chats.jsonl")             # returns the number of conversations
    python -m lyra.data convert chats.txt chats.jsonl --label Guest=user

The format (documented in docs/data.md):
- Conversations are separated by one or more blank lines.
- A message starts with a role label and `:` or the full-width `：`:
      system     system, 系統
      user       user, 使用者, 您
      assistant  assistant, 模型
  plus every shipped persona's labels (lyra/conf/persona/*.yaml): its user_label is a user label,
  its name and bot_label are assistant labels. ASCII labels match in any case; `labels=` /
  `--label LABEL=ROLE` adds more (e.g. your own persona's name).
- A line without a label continues the previous message, joined with a newline. A line that
  starts like a speaker label (`Name:` or `Name：` at the start of the line, a short name) that is
  not mapped is an error at its line, never glued onto the previous reply: map it with --label, or
  indent the line to keep it as a continuation.
- A `<START>` line (SillyTavern's example-dialogue separator) ends the conversation, like a blank line.
- Lines starting with `#` are comments; `# id: NAME` before a conversation sets its id, otherwise
  the id is `<file stem>-<conversation number>`.

Output is written atomically (temp file + os.replace): a failure never leaves a partial file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lyra.data.records import ROLES, Conversation, Problem, decode_text, format_problems
from lyra.errors import UserError
from lyra.paths import CONF_DIR

DEFAULT_LABELS = {
    "system": "system", "系統": "system",
    "user": "user", "使用者": "user", "您": "user",
    "assistant": "assistant", "模型": "assistant",
}
PERSONA_DIR = CONF_DIR / "persona"


@functools.cache
def shipped_persona_labels() -> dict[str, str]:
    """{label: role} from the shipped personas: user_label -> user; name and bot_label -> assistant."""
    from omegaconf import OmegaConf

    labels: dict[str, str] = {}
    for path in sorted(PERSONA_DIR.glob("*.yaml")):
        persona = OmegaConf.load(path)
        for key, role in (("user_label", "user"), ("bot_label", "assistant"), ("name", "assistant")):
            value = persona.get(key)
            label = str(value).strip().rstrip(":：").strip() if value else ""
            if label and not any(colon in label for colon in ":："):
                labels.setdefault(label.casefold(), role)
    return labels
_LABELLED_LINE = re.compile(r"^\s*([^:：]{1,40}?)\s*[:：]\s*(.*)$")
_SEPARATOR = "<start>"
_NOT_IN_A_NAME = set(".,!?;\"'()[]{}<>/\\|=+*#@`~，。！？；、「」『』（）【】《》")
MAX_SPEAKER_WORDS = 3  # "Captain Jack Sparrow:" is a speaker; "Note that the ratio is 3:1" is prose
_ID_COMMENT = re.compile(r"^\s*#\s*id\s*[:：]\s*(\S.*?)\s*$", re.IGNORECASE)


def label_table(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Default labels plus `extra` (label -> role); labels are matched case-insensitively."""
    table = {**shipped_persona_labels(), **DEFAULT_LABELS}
    for label, role in (extra or {}).items():
        if role not in ROLES:
            raise UserError("--label", f"{label}={role}: the role must be one of {', '.join(ROLES)}")
        if not label.strip() or any(colon in label for colon in ":："):
            raise UserError("--label", f"{label!r} is not a usable label (non-empty, without ':')")
        table[label.strip().casefold()] = role
    return table


def parse_label_options(options: Iterable[str]) -> dict[str, str]:
    """`["Guest=user", "Maid=assistant"]` -> {"Guest": "user", "Maid": "assistant"}."""
    labels = {}
    for option in options:
        label, sep, role = option.partition("=")
        if not sep:
            raise UserError("--label", f"{option!r} must look like LABEL=ROLE, e.g. Guest=user")
        labels[label.strip()] = role.strip()
    return labels


def _speaker_like(line: str, match: re.Match) -> bool:
    """Whether an unmapped `Label:` line reads as someone speaking rather than prose with a colon.

    At the start of the line (indented lines are continuations), a short name that starts with a
    letter and holds no sentence punctuation; after an ASCII ':' comes a space or the line's end.
    """
    label = match.group(1)
    if line[:1].isspace() or not label[:1].isalpha() or len(label.split()) > MAX_SPEAKER_WORDS:
        return False
    if any(character in _NOT_IN_A_NAME for character in label):
        return False
    colon = line.index(label) + len(label)
    colon += len(line[colon:]) - len(line[colon:].lstrip())
    return line[colon] == "：" or line[colon + 1:colon + 2] in ("", " ", "\t")


def _unmapped_speaker(label: str) -> str:
    return (f'"{label}:" starts like a speaker label that maps to no role; map it: --label {label}=user for '
            f"python -m lyra.data, data.labels='{{{label}: user}}' for training (or assistant, for the character "
            "to train), or indent the line if it continues the previous message")


def _unlabelled(match: re.Match | None) -> str:
    """Why a conversation's first line has no known label, and how to map the label it has."""
    if match is None:
        return ("text before any role label; start a message with a label such as user: or assistant: (or map your "
                "own label: --label LABEL=user for python -m lyra.data, data.labels='{LABEL: user}' for training)")
    label = match.group(1)
    return (f'unknown role label "{label}"; map it to user or assistant: --label {label}=user for '
            f"python -m lyra.data, data.labels='{{{label}: user}}' for training")


class _Block:
    """One conversation being read: its first line, id and messages with their start lines."""

    def __init__(self, line: int, conversation_id: str | None):
        self.line = line
        self.id = conversation_id
        self.messages: list[dict] = []  # {"role", "lines", "line"}
        self.broken = False  # a problem was reported inside it: the whole conversation is left out


def parse_txt(text: str, path: Path, labels: dict[str, str] | None = None
              ) -> tuple[list[Conversation], list[Problem]]:
    """Conversations of a transcript and every problem as FILE:LINE."""
    table = label_table(labels)
    blocks: list[_Block] = []
    problems: list[Problem] = []
    block: _Block | None = None
    pending_id: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line.strip() or line.strip().casefold() == _SEPARATOR:
            block = None
            continue
        if line.lstrip().startswith("#"):
            match = _ID_COMMENT.match(line)
            if match and block is not None:
                problems.append(Problem(path, number, "`# id:` must come before a conversation's first message "
                                                      "(leave a blank line above it)"))
            elif match:
                pending_id = (number, match.group(1))
            continue
        if block is None:
            block = _Block(number, pending_id[1] if pending_id else None)
            pending_id = None
            blocks.append(block)
        match = _LABELLED_LINE.match(line)
        role = table.get(match.group(1).casefold()) if match else None
        if role is not None:
            block.messages.append({"role": role, "lines": [match.group(2)] if match.group(2) else [], "line": number})
        elif match and (block.messages or block.broken) and _speaker_like(line, match):  # never glued on
            block.broken = True
            problems.append(Problem(path, number, _unmapped_speaker(match.group(1))))
        elif block.messages:
            block.messages[-1]["lines"].append(line)
        elif not block.broken:  # one problem per conversation: it costs one conversation
            block.broken = True
            problems.append(Problem(path, number, _unlabelled(match)))
    conversations, seen_ids = [], {}
    for index, block in enumerate(blocks, start=1):
        conversation_id = block.id or f"{path.stem}-{index:04d}"
        if conversation_id in seen_ids:
            problems.append(Problem(path, block.line, f"duplicate id {conversation_id!r} "
                                                      f"(first used on line {seen_ids[conversation_id]})"))
            continue
        seen_ids[conversation_id] = block.line
        if block.broken:
            continue  # already reported: text before any label
        messages = [{"role": m["role"], "content": "\n".join(m["lines"]).strip()} for m in block.messages]
        empty = [m for m, message in zip(block.messages, messages) if not message["content"]]
        if empty:
            problems.append(Problem(path, empty[0]["line"], f"empty {empty[0]['role']} message"))
        elif not any(message["role"] == "assistant" for message in messages):
            problems.append(Problem(path, block.line, "conversation has no assistant turn (nothing to learn from)"))
        else:
            conversations.append(Conversation(conversation_id, messages))
    problems.sort(key=lambda problem: problem.line)
    if not blocks and not problems:
        problems.append(Problem(path, 1, "empty file: no conversations"))
    return conversations, problems


def to_seed_record(conversation: Conversation) -> dict:
    """The seed format: {"id", "conversations": [{"from", "value"}]}."""
    return {"id": conversation.id,
            "conversations": [{"from": m["role"], "value": m["content"]} for m in conversation.messages]}


def write_jsonl_atomic(records: Iterable[dict], output: str | Path) -> int:
    """Write one JSON object per line through a temp file renamed into place; returns the line count."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.",
                                         suffix=".tmp", delete=False)
    count = 0
    try:
        with handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, output)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return count


def convert_txt_to_jsonl(input_txt: str | Path, output_jsonl: str | Path,
                         labels: dict[str, str] | None = None) -> int:
    """Convert a transcript to seed-format JSONL; any problem raises UserError and writes nothing."""
    input_txt = Path(input_txt)
    if not input_txt.is_file():
        raise UserError("input", f"file not found: {input_txt}")
    text, problems = decode_text(input_txt.read_bytes(), input_txt)
    conversations: list[Conversation] = []
    if text is not None:
        conversations, problems = parse_txt(text, input_txt, labels)
    if problems:
        raise UserError(None, f"{len(problems)} problem(s) in {input_txt}, nothing written:\n"
                              f"{format_problems(problems, limit=None)}")
    return write_jsonl_atomic((to_seed_record(c) for c in conversations), output_jsonl)
