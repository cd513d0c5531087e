"""Reading conversation files into one internal type, `Conversation`, with exact problem locations.

    from lyra.data.formats import load_conversations, read_conversations, read_file
    conversations = load_conversations("my_dialogues.jsonl")             # UserError on any problem
    conversations, problems = read_conversations("my_dialogues.jsonl")  # everything, for `validate`
    report = read_file("my_dialogues.json")     # + ignored fields, for `validate`, `stats` and training

Accepted, in `.jsonl` (one object per line) or `.json` (a top-level array), UTF-8 with or without
a BOM, LF or CRLF, blank lines ignored (the README's Data section has a one-line example of each):
    seed      {"id": ..., "conversations": [{"from": "system"|"user"|"assistant", "value": "..."}]}
    ShareGPT  {"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", "value": ...}],
               "system": "...", "tools": [...] or "[...]"}
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..." or text parts,
               "tool_calls": [...], "weight": 0|1}], "tools": [...]}
    alpaca    {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}
    Firefly   {"conversation": [{"human": ..., "assistant": ...}], "system": ...}
and the plain-text transcript format of `lyra.data.txt` (`.txt` files).

Every problem is a `Problem` that prints as `FILE:LINE: message`, LINE being the line where the
offending conversation starts (for a `.json` array: where its element starts). Damage costs only
the damaged record: a bad line of a `.jsonl` (broken JSON or bytes that are not UTF-8) or a broken
element of a `.json` array is one problem, and reading goes on after it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.errors import UserError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
                "tool": "tool", "observation": "tool", "function": "tool", "function_call": "assistant"}
ON_INVALID = ("error", "skip")
MAX_REPORTED_PROBLEMS = 20  # data.on_invalid=error shows this many; `validate` shows all
PROGRESS_BYTES = 4 * 1024 * 1024  # files above this show progress bars (reading, encoding, stats)

# Fields lyra reads; anything else is listed once per file as ignored.
RECORD_FIELDS = {"id", "conversations", "messages", "conversation", "system", "tools",
                 "instruction", "input", "output", "history"}
MESSAGE_FIELDS = {"from", "role", "value", "content", "tool_calls", "function_call", "weight",
                  "human", "assistant"}
# Fields that change what a record means; training on the rest of the record would be wrong.
UNSUPPORTED_RECORD_FIELDS = {
    "images": "images are not supported (lyra trains text-only chat); drop the field or the record",
    "image": "images are not supported (lyra trains text-only chat); drop the field or the record",
    "videos": "videos are not supported (lyra trains text-only chat); drop the field or the record",
    "audios": "audio is not supported (lyra trains text-only chat); drop the field or the record",
    "chosen": "a preference pair (chosen/rejected) is not supervised chat: train pairs with objective=dpo or "
              "objective=orpo (objective.train_file=FILE, docs/preference.md)",
    "rejected": "a preference pair (chosen/rejected) is not supervised chat: train pairs with objective=dpo or "
                "objective=orpo (objective.train_file=FILE, docs/preference.md)",
}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


@dataclass
class Conversation:
    """One dialogue; messages are chat-template dicts {"role", "content"} (+ "tool_calls", "weight").

    `tools` are the function schemas given to the chat template (`tools=`); `line` is where the
    record starts in its file, for FILE:LINE problems found later (by the encoder).
    """

    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict] | None = None
    line: int = field(default=0, compare=False)

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


@dataclass
class FileReport:
    """Everything read from one file: usable conversations, problems, and the fields lyra ignored."""

    path: Path
    conversations: list[Conversation]
    problems: list[Problem]
    ignored_fields: Counter = field(default_factory=Counter)  # "field" or "message.field" -> records

    @property
    def skipped(self) -> int:
        return sum(problem.drops for problem in self.problems)

    def ignored_note(self) -> str | None:
        """One line listing the fields lyra does not train on, or None."""
        if not self.ignored_fields:
            return None
        fields = ", ".join(f'"{name}" ({count})' for name, count in sorted(self.ignored_fields.items()))
        return f"{self.path}: ignored field(s), not used for training (records): {fields}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


class _Bad(Exception):
    """A record that cannot be used; the message says what is wrong and how to fix it."""


def _message_text(value: Any, number: int, role: str, key: str) -> str:
    """A message's text; OpenAI content parts of type text are joined, other parts refused."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind is None:
                raise _Bad(f'message {number} ({role}): content parts must be objects like '
                           f'{{"type": "text", "text": "..."}}, got {_type_name(part)}')
            else:
                raise _Bad(f'message {number} ({role}): content part of type {json.dumps(kind)} is not supported '
                           f'(text only); remove the part or the record')
        return "".join(texts)
    raise _Bad(f'message {number} ({role}): "{key}" must be a string, got {_type_name(value)}')


def _json_value(value: Any) -> Any:
    """ShareGPT keeps tools and calls as JSON strings; OpenAI as JSON values."""
    if isinstance(value, str):
        return json.loads(value)
    return value


def _tool_call(call: Any, number: int) -> dict:
    """One call as the chat template wants it: {"type": "function", "function": {"name", "arguments"}}."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]):
        raise _Bad(f'message {number}: a tool call must be {{"name": "...", "arguments": {{...}}}}, '
                   f"got {json.dumps(call, ensure_ascii=False)[:80]}")
    arguments = call.get("arguments", {})
    try:
        arguments = _json_value(arguments)
    except json.JSONDecodeError:
        raise _Bad(f'message {number}: the arguments of tool call "{call["name"]}" are not valid JSON') from None
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _tools(record: dict) -> list[dict] | None:
    if "tools" not in record or record["tools"] in (None, "", []):
        return None
    try:
        tools = _json_value(record["tools"])
    except json.JSONDecodeError as error:
        raise _Bad(f'"tools" is a string that is not valid JSON ({error.msg}); '
                   "give a list of function schemas") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise _Bad(f'"tools" must be a list of function schemas, got {_type_name(tools)}')
    if not tools:
        return None
    # Qwen3 documents tools in the OpenAI shape; glaive-style bare schemas are wrapped into it.
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools]


def _turns(record: dict) -> tuple[str, list]:
    """The record's message list, in any accepted format, normalised to role/content dicts."""
    if "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        return key, record[key]
    if "conversation" in record:  # Firefly: [{"human": ..., "assistant": ...}, ...]
        pairs = record["conversation"]
        if not isinstance(pairs, list):
            raise _Bad(f'"conversation" must be a list of {{"human", "assistant"}} pairs, got {_type_name(pairs)}')
        turns = []
        for number, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, dict) and "human" in pair and "assistant" in pair):
                raise _Bad(f'"conversation" item {number} must be {{"human": "...", "assistant": "..."}}')
            turns += [{"role": "user", "content": pair["human"]}, {"role": "assistant", "content": pair["assistant"]}]
        return "conversation", turns
    if "instruction" in record or "output" in record:  # alpaca
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise _Bad(f'alpaca record: "{key}" must be a string, got {_type_name(record.get(key))}')
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise _Bad(f'alpaca record: "input" must be a string, got {_type_name(extra)}')
        history = record.get("history") or []
        if not (isinstance(history, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in history)):
            raise _Bad('alpaca record: "history" must be a list of [instruction, response] pairs')
        turns = []
        for prompt, response in history:
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        instruction = record["instruction"]
        prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
        return "instruction", [*turns, {"role": "user", "content": prompt},
                               {"role": "assistant", "content": record["output"]}]
    raise _Bad('missing "conversations" (or OpenAI "messages", alpaca "instruction"/"output", '
               'Firefly "conversation")')


def _normalize_message(turn: Any, number: int, ignored: Counter) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise _Bad(f"message {number} must be an object, got {_type_name(turn)}")
    role_key = "from" if "from" in turn else "role" if "role" in turn else None
    if role_key is None:
        raise _Bad(f'message {number} has no role ("from" or "role")')
    raw_role = turn[role_key]
    role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise _Bad(f"message {number} has unknown role {json.dumps(raw_role, ensure_ascii=False)} "
                   f"(expected one of {', '.join(ROLE_ALIASES)})")
    for name in REASONING_FIELDS:
        if turn.get(name):
            raise _Bad(f'message {number} ({role}) has "{name}": lyra trains replies without reasoning '
                       "(enable_thinking=False); remove the field, or move what should be said into the reply")
    for name in turn:
        if name not in MESSAGE_FIELDS and name != role_key:
            ignored[f"message.{name}"] += 1
    text_key = "value" if "value" in turn else "content" if "content" in turn else None
    message: dict[str, Any] = {"role": role}
    calls: list[dict] = []
    if raw_role == "function_call":  # ShareGPT: the value is the call itself, as JSON
        try:
            value = _json_value(turn.get(text_key))
        except (json.JSONDecodeError, TypeError):
            raise _Bad(f'message {number} (function_call): "{text_key}" must be JSON like '
                       '{"name": "...", "arguments": {...}}') from None
        calls = [_tool_call(call, number) for call in (value if isinstance(value, list) else [value])]
        text = ""
    else:
        if text_key is None and not (turn.get("tool_calls") or turn.get("function_call")):
            raise _Bad(f'message {number} has no text ("value" or "content")')
        text = _message_text(turn.get(text_key), number, role, text_key or "content")
        raw_calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
        if raw_calls:
            if role != "assistant":
                raise _Bad(f'message {number} ({role}) has tool calls; only assistant messages may call tools')
            if not isinstance(raw_calls, list):
                raise _Bad(f'message {number}: "tool_calls" must be a list, got {_type_name(raw_calls)}')
            calls = [_tool_call(call, number) for call in raw_calls]
    if "<think>" in text or "</think>" in text:
        raise _Bad(f"message {number} ({role}) holds a <think> block; lyra trains replies without reasoning "
                   "(enable_thinking=False): remove it")
    if not text.strip() and not calls:
        raise _Bad(f"message {number} ({role}) is empty")
    message["content"] = text
    if calls:
        message["tool_calls"] = calls
    if "weight" in turn:  # OpenAI fine-tuning: weight 0 = context only, not trained on
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise _Bad(f'message {number} ({role}): "weight" must be 0 or 1, got {json.dumps(turn["weight"])}')
        if role != "assistant":
            raise _Bad(f'message {number} ({role}): "weight" applies to assistant messages only')
        if turn["weight"] == 0:
            message["weight"] = 0
    return message


def normalize_record(record: Any, default_id: str, ignored: Counter | None = None
                     ) -> tuple[Conversation | None, str | None]:
    """(conversation, None) for a usable record in any accepted format, else (None, why not)."""
    ignored = ignored if ignored is not None else Counter()
    try:
        return _normalize(record, default_id, ignored), None
    except _Bad as bad:
        return None, str(bad)


def _normalize(record: Any, default_id: str, ignored: Counter) -> Conversation:
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(record)}")
    for name, why in UNSUPPORTED_RECORD_FIELDS.items():
        if record.get(name):
            raise _Bad(f'"{name}": {why}')
    list_key, turns = _turns(record)
    if not isinstance(turns, list):
        raise _Bad(f'"{list_key}" must be a list of messages, got {_type_name(turns)}')
    if not turns:
        raise _Bad(f'"{list_key}" is empty')
    local_ignored: Counter = Counter(name for name in record if name not in RECORD_FIELDS)
    messages = [_normalize_message(turn, number, local_ignored) for number, turn in enumerate(turns, start=1)]
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise _Bad(f'"system" must be a string, got {_type_name(system)}')
        if messages[0]["role"] == "system" and messages[0]["content"] != system:
            raise _Bad('both a top-level "system" and a first system message, and they differ; keep one')
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    tools = _tools(record)
    if any(message.get("tool_calls") for message in messages) and not tools:
        ignored_calls = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]["function"]["name"]
        raise _Bad(f'calls the tool "{ignored_calls}" but has no "tools": add the function schemas as "tools" '
                   "so the model learns them from the prompt it will see")
    if not any(message["role"] == "assistant" for message in messages):
        raise _Bad("conversation has no assistant turn (nothing to learn from)")
    if all(message.get("weight") == 0 for message in messages if message["role"] == "assistant"):
        raise _Bad('every assistant turn has "weight": 0 (nothing to learn from)')
    ignored.update(local_ignored)
    record_id = record.get("id")
    conversation_id = default_id if record_id is None or isinstance(record_id, (dict, list)) else str(record_id)
    return Conversation(conversation_id, messages, tools)


# ----------------------------------------------------------------------------------------------
# Bytes -> text, one line at a time, with a hint naming the likely encoding.

# Frequent characters of Chinese prose (both scripts): text decoded with the right codec is full of
# them, text decoded with the wrong one is not.
_COMMON_HAN = set("的一是不了人我在有他這这個个們们來来說说為为中大上你到和地也子時时道出要就下得可那以生會会能"
                  "對对自之過过去還还多麼么心好看天都學学家裡里後后把您請请嗎吗呢吧今日")
_CANDIDATE_ENCODINGS = (("big5", "BIG5"), ("gbk", "GBK"), ("shift_jis", "SHIFT_JIS"), ("cp1252", "CP1252"))


def _guess_encoding(data: bytes) -> str | None:
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
    encoding = _guess_encoding(b"\n".join(bad))
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


# ----------------------------------------------------------------------------------------------
# Text -> records.

def _jsonl_records(text: str, path: Path, progress=None) -> tuple[list[tuple[int, Any]], list[Problem]]:
    records, problems = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if progress is not None:
            progress.update(len(line) + 1)
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


class _Lines:
    """Offsets of line starts, for index -> (line, column) in O(log n)."""

    def __init__(self, text: str):
        import bisect

        self._bisect = bisect.bisect_right
        self.starts = [0] + [match.end() for match in re.finditer("\n", text)]

    def line(self, index: int) -> int:
        return self._bisect(self.starts, index)

    def column(self, index: int) -> int:
        return index - self.starts[self.line(index) - 1] + 1


def _element_end(text: str, start: int) -> int | None:
    """Where the bracketed value opening at `start` closes, counting brackets outside strings."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        character = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "{[":
            depth += 1
        elif character in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _resync(text: str, start: int, after: int) -> int | None:
    """Where the element after a broken one (starting at `start`) begins, or None when none follows.

    Pretty-printed arrays put every element at the same indentation, so the next line that opens a
    value at the broken element's indentation is the next element (robust to a missing quote). A
    one-line array is resumed after the broken element's closing bracket, found by counting.
    """
    line_start = text.rfind("\n", 0, start) + 1
    indent = text[line_start:start]
    if not indent.strip():  # the element opens its own line
        match = re.compile(r"\n" + re.escape(indent) + r"[{\[]").search(text, after)
        return match.end() - 1 if match else None
    end = _element_end(text, start)
    if end is None:
        return None
    following = _skip_whitespace(text, end)
    if following < len(text) and text[following] == ",":
        following = _skip_whitespace(text, following + 1)
        return following if following < len(text) and text[following] in "{[" else None
    return None


def _json_array_records(text: str, path: Path, progress=None) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Elements of a top-level array, each with the line where it starts; a broken one is skipped."""
    decoder = json.JSONDecoder()
    lines = _Lines(text)

    def problem_at(index: int, message: str, drops: int = 1) -> Problem:
        return Problem(path, lines.line(index), f"invalid JSON at column {lines.column(index)}: {message}", drops)

    records: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    index = _skip_whitespace(text, text.index("[") + 1)
    if index < len(text) and text[index] == "]":
        return [], []
    reported = 0
    while True:
        if progress is not None:
            progress.update(index - reported)
            reported = index
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            problems.append(Problem(path, lines.line(index),
                                    f"invalid JSON in this element (line {error.lineno}, column {error.colno}: "
                                    f"{error.msg}); the element is skipped, reading goes on after it"))
            resumed = _resync(text, index, max(error.pos, index + 1))
            if resumed is None:
                return records, problems
            index = resumed
            continue
        records.append((lines.line(index), value))
        index = _skip_whitespace(text, end)
        if index >= len(text):
            problems.append(problem_at(index, "the array is not closed with ']'", drops=0))
            return records, problems
        if text[index] == "]":
            trailing = _skip_whitespace(text, index + 1)
            if trailing < len(text):
                problems.append(problem_at(trailing, "extra data after the array (not read)", drops=0))
            return records, problems
        if text[index] in "{[":  # a missing comma between two intact elements loses nothing
            problems.append(problem_at(index, "expected ',' or ']' between conversations", drops=0))
            continue
        if text[index] != ",":
            problems.append(problem_at(index, "expected ',' or ']' between conversations"))
            resumed = _resync(text, index, index + 1)
            if resumed is None:
                return records, problems
            index = resumed
            continue
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


def _progress(path: Path, total: int, what: str):
    """A byte-based tqdm bar for files over PROGRESS_BYTES, else None."""
    if total < PROGRESS_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{what} {path.name}", unit="char", unit_scale=True, leave=False)


def read_file(path: str | Path, labels: dict[str, str] | None = None, normalize=None) -> FileReport:
    """Every usable conversation of `path`, every problem in file order, and the ignored fields.

    `labels` adds role labels for `.txt` transcripts (label -> system|user|assistant). `normalize`
    reads another kind of record with the same file handling (lyra.data.preference: pairs).
    """
    normalize = normalize or normalize_record
    path = Path(path)
    data = path.read_bytes()
    text, problems = decode_lines(data, path)
    if text is None:
        return FileReport(path, [], problems)
    if not text.strip():
        return FileReport(path, [], problems or [Problem(path, 1, "empty file: no conversations")])
    if path.suffix.lower() == ".txt":
        from lyra.data.txt import parse_txt

        if problems:  # a blanked line would split a transcript's conversation in two: fix the bytes first
            return FileReport(path, [], problems)

        conversations, txt_problems = parse_txt(text, path, labels)
        return FileReport(path, conversations, txt_problems)
    stripped = text.lstrip()
    if path.suffix.lower() != ".json" and stripped.startswith("[") and "\n" in stripped.strip():
        rows = len(text.splitlines())
        return FileReport(path, [], [Problem(path, 1, f"this {path.suffix or 'file'} holds one JSON array spanning "
                                                      f"{rows} lines, not one object per line: rename it to "
                                                      f"{path.stem}.json", drops=0)])
    progress = _progress(path, len(text), "reading")
    try:
        if path.suffix.lower() == ".json" and stripped.startswith("["):
            records, parse_problems = _json_array_records(text, path, progress)
        elif path.suffix.lower() == ".json" and _is_multiline_document(text):
            return FileReport(path, [], [Problem(path, 1, "a .json file must hold an array of conversations (or "
                                                          f"JSON Lines), got {_type_name(json.loads(text))} "
                                                          "spanning several lines")])
        else:
            records, parse_problems = _jsonl_records(text, path, progress)
    finally:
        if progress is not None:
            progress.close()
    problems += parse_problems
    conversations = []
    ignored: Counter = Counter()
    for line_number, record in records:
        conversation, error = normalize(record, f"{path.stem}-{line_number}", ignored)
        if conversation is None:
            problems.append(Problem(path, line_number, error))
        else:
            conversation.line = line_number
            conversations.append(conversation)
    problems.sort(key=lambda problem: problem.line)
    if not conversations and not problems:
        problems.append(Problem(path, 1, "empty file: no conversations"))
    return FileReport(path, conversations, problems, ignored)


def read_conversations(path: str | Path, labels: dict[str, str] | None = None
                       ) -> tuple[list[Conversation], list[Problem]]:
    """Every usable conversation of `path` and every problem, in file order."""
    report = read_file(path, labels)
    return report.conversations, report.problems


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
    report = read_file(path, labels)
    check_problems(report.problems, report.conversations, path, key, on_invalid)
    return report.conversations, report.problems


def check_problems(problems: list[Problem], conversations: list, path: Path, key: str, on_invalid: str) -> None:
    """Stop on problems (`error`, or nothing usable left), or log what `skip` costs."""
    if problems and (on_invalid == "error" or not conversations):
        hint = "fix them or set data.on_invalid=skip" if conversations else "no usable conversation"
        raise UserError(key, f"{len(problems)} problem(s) in {path} ({hint}):\n{format_problems(problems)}")
    if problems:
        log.warning("%s: skipped %d invalid conversation(s) (data.on_invalid=skip), kept %d; first: %s",
                    path, sum(p.drops for p in problems), len(conversations), problems[0])
