"""Preference pairs (chosen/rejected): read them, check them, tokenize them as chat prompts the model.

    from lyra.data.preference import prepare_pairs, pair_stats
    prepared = prepare_pairs("pairs.jsonl", tokenizer, system_prompt)   # read + encode every pair
    prepared.problems                          # FILE:LINE problems, reading *and* rendering
    dataset, stats = prepared.dataset(max_length=1024)   # {"prompt_ids", "chosen_ids", "rejected_ids", "length"}

    python -m lyra.data validate pairs.jsonl   # the same reader and encoder, through the data command line
    python -m lyra.data stats pairs.jsonl

Records are read by the one reader of `lyra.data.formats` (`.jsonl` or a `.json` array, encodings,
broken lines and FILE:LINE problems as for conversations); each record is one of:
    TRL conversational   {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
    TRL implicit prompt  {"chosen": [messages..., reply], "rejected": [same messages..., other reply]}
    TRL plain            {"prompt": "text", "chosen": "text", "rejected": "text"}  (the prompt is one user turn)
    LLaMA-Factory        {"conversations": [ShareGPT messages], "chosen": {"from": "gpt", "value": ...},
                          "rejected": {...}, "system": ..., "tools": ...}   (ShareGPT preference)
    LLaMA-Factory alpaca {"instruction", "input", "chosen": "text", "rejected": "text", "system", "history"}
Messages follow the rules of supervised data (roles, content parts, tool calls, no think blocks):
each side is built as a conversation and checked by `lyra.data.formats.normalize_record`.

Each pair is tokenized by `lyra.data.tokenization.encode_turn`, the path SFT examples take: the
prompt is what chat feeds the model for that history (persona system prompt inserted when the
pair has none, chat template, `enable_thinking=False`, generation prompt) and each reply runs to
its end-of-turn token. A pair whose prompt plus longer reply exceeds max_length is dropped, counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lyra.data.dialects import normalize_record
from lyra.data.dialects.base import ReadContext
from lyra.data.dialects.chat import ROLE_ALIASES
from lyra.data.formats import read_file
from lyra.data.prepare import EncodedFile
from lyra.data.records import FileReport, Problem
from lyra.data.records import RecordError as _Bad
from lyra.data.records import type_name as _type_name
from lyra.data.stats import token_percentiles
from lyra.data.tokenization import IGNORE_INDEX, EncodeStats, encode_turn, with_system_prompt

SIDES = ("chosen", "rejected")
# Fields lyra reads from a pair record; anything else is listed once per file as ignored.
PAIR_FIELDS = {"id", "prompt", "chosen", "rejected", "conversations", "messages", "system", "tools",
               "instruction", "input", "history", "lyra"}  # lyra: what `python -m lyra.data pairs` notes


@dataclass
class PreferencePair:
    """One preference: the history before the reply (`prompt`), the preferred and the dispreferred reply."""

    id: str
    prompt: list[dict[str, Any]]  # chat-template messages; the system message, if any, comes first
    chosen: dict[str, Any]  # one assistant message
    rejected: dict[str, Any]
    tools: list[dict] | None = None
    line: int = field(default=0, compare=False)


def _side_messages(value: Any, name: str) -> list:
    """A completion as a list of messages: TRL gives a list, LLaMA-Factory one message object."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise _Bad(f'"{name}" must be a message or a list of messages here, got {_type_name(value)}')


def _conversation(record: dict, name: str, ignored: Counter):
    """One side of the pair as a checked Conversation (the same rules as supervised data)."""
    conversation, error = normalize_record(record, "", ReadContext(ignored=ignored))
    if conversation is None:
        raise _Bad(f'"{name}": {error or "names speakers no label maps (--label NAME=ROLE)"}')
    return conversation


def _sides(record: dict) -> dict[str, dict]:
    """For each side, a conversation record (seed/OpenAI/alpaca shape) that ends with that side's reply."""
    shared = {key: record[key] for key in ("system", "tools") if key in record}
    if "conversations" in record or "messages" in record:  # LLaMA-Factory ShareGPT preference
        key = "conversations" if "conversations" in record else "messages"
        history = record[key]
        if not isinstance(history, list):
            raise _Bad(f'"{key}" must be a list of messages, got {_type_name(history)}')
        return {side: {**shared, "conversations": [*history, *_side_messages(record[side], side)]} for side in SIDES}
    if "instruction" in record:  # LLaMA-Factory alpaca preference
        for side in SIDES:
            if not isinstance(record[side], str):
                raise _Bad(f'alpaca pair: "{side}" must be a string, got {_type_name(record[side])}')
        alpaca = {key: record[key] for key in ("instruction", "input", "history") if key in record}
        return {side: {**shared, **alpaca, "output": record[side]} for side in SIDES}
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):  # TRL plain: the prompt is what the user says
            for side in SIDES:
                if not isinstance(record[side], str):
                    raise _Bad(f'a plain pair (a string "prompt") needs string replies; "{side}" is '
                               f"{_type_name(record[side])}")
            return {side: {**shared, "messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": record[side]}]} for side in SIDES}
        if not isinstance(prompt, list):
            raise _Bad(f'"prompt" must be a string or a list of messages, got {_type_name(prompt)}')
        return {side: {**shared, "messages": [*prompt, *_side_messages(record[side], side)]} for side in SIDES}
    # TRL implicit prompt: both sides are whole conversations that share everything but the last reply
    chosen, rejected = (_side_messages(record[side], side) for side in SIDES)
    if not chosen or not rejected or any(isinstance(v, str) for v in (record["chosen"], record["rejected"])):
        raise _Bad('a pair without "prompt" needs "chosen" and "rejected" as whole conversations (lists of messages)')
    if chosen[:-1] != rejected[:-1]:
        raise _Bad('"chosen" and "rejected" must share every message but their last (the reply); '
                   'or give the shared part as "prompt"')
    return {side: {**shared, "messages": messages} for side, messages in (("chosen", chosen), ("rejected", rejected))}


def _pair(record: Any, default_id: str, ignored: Counter) -> PreferencePair:
    if not isinstance(record, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(record)}")
    missing = [side for side in SIDES if side not in record]
    if missing:
        raise _Bad(f'not a preference pair: missing "{missing[0]}" (a pair has "chosen" and "rejected"; '
                   "supervised conversations train with objective=sft)")
    local: Counter = Counter(name for name in record if name not in PAIR_FIELDS)
    records = _sides(record)
    for side, side_record in records.items():  # before the conversation rules, which would say less
        messages = side_record.get("conversations") or side_record.get("messages") or []
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not isinstance(last, dict):
            continue  # the conversation rules below name what is wrong
        role = last.get("from", last.get("role"))
        if not (isinstance(role, str) and ROLE_ALIASES.get(role) == "assistant"):
            raise _Bad(f'"{side}" must end with an assistant reply, got {json.dumps(role, ensure_ascii=False)}')
    conversations = {side: _conversation(records[side], side, local if side == "chosen" else Counter())
                     for side in SIDES}
    replies = {}
    for side, conversation in conversations.items():
        *history, reply = conversation.messages
        if reply["role"] != "assistant":
            raise _Bad(f'"{side}" must end with an assistant reply, got a {reply["role"]} message')
        if reply.get("weight") == 0:
            raise _Bad(f'"{side}" has "weight": 0; a pair\'s replies are what it trains on')
        replies[side] = (history, reply)
    (chosen_history, chosen), (rejected_history, rejected) = replies["chosen"], replies["rejected"]
    if chosen_history != rejected_history:
        raise _Bad('"chosen" and "rejected" answer different histories; a pair shares its prompt')
    if chosen.get("content") == rejected.get("content") and chosen.get("tool_calls") == rejected.get("tool_calls"):
        raise _Bad('"chosen" and "rejected" are the same reply: the pair teaches nothing')
    if not chosen_history:
        raise _Bad("the pair has no prompt: add the user turn its replies answer")
    ignored.update(local)
    record_id = record.get("id")
    pair_id = default_id if record_id is None or isinstance(record_id, (dict, list)) else str(record_id)
    return PreferencePair(pair_id, chosen_history, chosen, rejected, conversations["chosen"].tools)


def normalize_pair(record: Any, default_id: str, context: ReadContext | None = None
                   ) -> tuple[PreferencePair | None, str | None]:
    """(pair, None) for a usable preference record in any accepted format, else (None, why not)."""
    try:
        return _pair(record, default_id, context.ignored if context is not None else Counter()), None
    except _Bad as bad:
        return None, str(bad)


def read_pairs(path: str | Path) -> FileReport:
    """Every usable pair of `path` (as `FileReport.conversations`), every problem, the ignored fields."""
    path = Path(path)
    if path.suffix.lower() == ".txt":  # transcripts hold conversations; a pair needs two replies to one history
        return FileReport(path, [], [Problem(path, 1, "a .txt transcript holds conversations, not preference pairs; "
                                                      "give a .jsonl or .json of chosen/rejected records")])
    return read_file(path, normalize=normalize_pair)


def _first_record(path: Path) -> Any:
    """The file's first JSON record (a line of JSONL or the first element of a .json array), or None."""
    try:
        text = path.read_bytes()[: 1 << 20].decode("utf-8-sig", errors="replace")
    except OSError:
        return None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            body = stripped[1:].lstrip()
            return json.JSONDecoder().raw_decode(body)[0] if body else None
        line = next((line for line in stripped.splitlines() if line.strip()), "")
        return json.loads(line) if line else None
    except json.JSONDecodeError:
        return None


def is_preference_file(path: str | Path) -> bool:
    """Whether the file holds preference pairs: its first record has "chosen" and "rejected"."""
    record = _first_record(Path(path))
    return isinstance(record, dict) and all(side in record for side in SIDES)


# ---------------------------------------------------------------------------------------- encoding

def encode_pair(pair: PreferencePair, tokenizer, system_prompt: str | None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids): the prompt chat builds for the history, each reply to its turn end."""
    history = with_system_prompt(pair.prompt, system_prompt)
    encoded = []
    for reply in (pair.chosen, pair.rejected):
        input_ids, labels = encode_turn([*history, reply], tokenizer, pair.tools)
        prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        encoded.append((input_ids[:prompt_length], input_ids[prompt_length:]))
    (prompt, chosen), (other_prompt, rejected) = encoded
    if prompt != other_prompt:
        raise ValueError("the chat template renders the prompt differently before the two replies")
    return prompt, chosen, rejected


@dataclass
class PreparedPairs(EncodedFile):
    """A pair file read and encoded: usable pairs, their token ids, every problem."""

    report: FileReport
    encoded: list[tuple[list[int], list[int], list[int]]]
    system_prompt_inserted: int = 0
    encode_problems: list[Problem] = field(default_factory=list)

    @property
    def pairs(self) -> list[PreferencePair]:
        return self.report.conversations

    def fitting(self, max_length: int) -> tuple[list[int], EncodeStats]:
        """Indices of the pairs whose prompt + longer reply fit max_length, and what was dropped (counted)."""
        stats = EncodeStats(conversations=len(self.encoded))
        kept = [i for i, (p, c, r) in enumerate(self.encoded) if len(p) + max(len(c), len(r)) <= max_length]
        stats.examples = len(kept)
        stats.dropped_turns = stats.truncated_conversations = len(self.encoded) - len(kept)
        return kept, stats

    def dataset(self, max_length: int):
        """The pairs that fit max_length as a datasets.Dataset of token ids, plus EncodeStats
        (`dropped_turns` = pairs over max_length). `length` lets group_by_length batch similar pairs."""
        from datasets import Dataset

        kept, stats = self.fitting(max_length)
        rows = [self.encoded[i] for i in kept]
        return Dataset.from_dict({
            "prompt_ids": [p for p, _, _ in rows], "chosen_ids": [c for _, c, _ in rows],
            "rejected_ids": [r for _, _, r in rows], "length": [len(p) + max(len(c), len(r)) for p, c, r in rows],
        }), stats

    def notes(self) -> list[str]:
        """What was added or left out without being a problem: one line each."""
        lines = []
        if self.system_prompt_inserted:
            lines.append(f"{self.path}: data.system_prompt inserted into {self.system_prompt_inserted} of "
                         f"{len(self.pairs)} pair(s) that had no system message")
        ignored = self.report.ignored_note()
        if ignored:
            lines.append(ignored)
        return lines


def prepare_pairs(path: str | Path, tokenizer, system_prompt: str | None) -> PreparedPairs:
    """Read `path` and encode every pair; encoder failures become FILE:LINE problems."""
    report = read_pairs(path)
    kept, encoded, problems = [], [], []
    for pair in report.conversations:
        try:
            encoded.append(encode_pair(pair, tokenizer, system_prompt))
            kept.append(pair)
        except ValueError as error:
            problems.append(Problem(report.path, pair.line, str(error)))
    inserted = sum(1 for pair in kept if pair.prompt[0]["role"] != "system") if system_prompt else 0
    report = FileReport(report.path, kept, report.problems, report.ignored_fields)
    return PreparedPairs(report, encoded, inserted, problems)


# ------------------------------------------------------------------------------------------- stats

def pair_stats(prepared: PreparedPairs, max_length: int) -> dict[str, Any]:
    """Counts, duplicates, token lengths per part, and what max_length drops."""
    pairs = prepared.pairs
    prompts = Counter(json.dumps(pair.prompt, ensure_ascii=False, sort_keys=True) for pair in pairs)
    _, fit = prepared.fitting(max_length)
    return {
        "pairs": len(pairs),
        "multi_turn_prompts": sum(sum(m["role"] == "user" for m in pair.prompt) >= 2 for pair in pairs),
        "duplicate_prompts": sum(count - 1 for count in prompts.values()),
        "prompt_tokens": token_percentiles([len(p) for p, _, _ in prepared.encoded]),
        "chosen_tokens": token_percentiles([len(c) for _, c, _ in prepared.encoded]),
        "rejected_tokens": token_percentiles([len(r) for _, _, r in prepared.encoded]),
        "max_length": max_length,
        "over_max_length": fit.dropped_turns,
        "system_prompt_inserted": prepared.system_prompt_inserted,
        "ignored_fields": dict(sorted(prepared.report.ignored_fields.items())),
    }


def format_pair_stats(stats: dict[str, Any], source: str) -> str:
    """The human-readable report printed by `python -m lyra.data stats PAIRS`."""
    def tokens(key: str) -> str:
        part = stats[key]
        return f"p50 {part['p50']} · p95 {part['p95']} · max {part['max']}"

    rows = [("preference pairs", stats["pairs"]), ("multi-turn prompts", stats["multi_turn_prompts"]),
            ("duplicate prompts", stats["duplicate_prompts"]),
            ("prompt tokens", f"{tokens('prompt_tokens')}  (chat template, system prompt included)"),
            ("chosen tokens", tokens("chosen_tokens")), ("rejected tokens", tokens("rejected_tokens"))]
    lines = [source, *(f"  {label:<25}{value}" for label, value in rows)]
    over_label = f"over max_length={stats['max_length']}"
    lines.append(f"  {over_label:<25}" + (f"{stats['over_max_length']} pair(s) dropped in training (prompt + longer "
                                          "reply); raise data.max_length to keep them"
                                          if stats["over_max_length"] else "none (every pair trains)"))
    if stats.get("system_prompt_inserted"):
        lines.append(f"  {'system prompt inserted':<25}{stats['system_prompt_inserted']} pair(s) had no system "
                     "message and get data.system_prompt (--system-prompt)")
    if stats.get("ignored_fields"):
        ignored = ", ".join(f"{name} ({count})" for name, count in stats["ignored_fields"].items())
        lines.append(f"  {'ignored fields':<25}{ignored}")
    if stats.get("skipped_invalid"):
        lines.append(f"  {'skipped invalid':<25}{stats['skipped_invalid']} (list them: python -m lyra.data validate FILE)")
    return "\n".join(lines)
