"""Every record shape lyra reads, in one ordered table: the first dialect that claims a record reads it.

    from lyra.data.dialects import normalize_record, closest_format
    conversation, error = normalize_record(record, "chats-3", context)   # error: one line, names the format
    closest_format({"bot_name": "Aqua", "chat": []})   # 'closest known format: PIPPA {...}: how to convert'

Families, one module each: `chat` (seed, ShareGPT, OpenAI, alpaca, Firefly), `roleplay` (PIPPA,
text-generation-webui history, ChatHaruhi, speaker dialogues, RoleBench, ChatHaruhi pairs) and
`sillytavern` (a whole file is one chat, read by `lyra.data.formats` before any record).

To add a record shape: write `normalize(record, default_id, context) -> Conversation` (raise
`RecordError` with what is wrong and how to fix it), and add a `Dialect` to `RECORD_DIALECTS`
before any dialect that would also claim its records. Refusals, `validate`, `stats` and training
pick it up from there.
"""

from __future__ import annotations

from typing import Any

from lyra.data.dialects import chat, roleplay
from lyra.data.dialects.base import Dialect, ReadContext, Unmapped
from lyra.data.records import Conversation, RecordError, shown, type_name

# Order matters where shapes share a key: PIPPA and speaker dialogues before Firefly ("conversation").
RECORD_DIALECTS: list[Dialect] = [*chat.DIALECTS, *roleplay.DIALECTS, chat.FIREFLY]
CHAT_FAMILY = {dialect.name for dialect in chat.DIALECTS}  # their errors name their keys ("conversations", ...)

__all__ = ["RECORD_DIALECTS", "Dialect", "ReadContext", "normalize_record", "closest_format"]


def normalize_record(record: Any, default_id: str, context: ReadContext | None = None
                     ) -> tuple[Conversation | None, str | None]:
    """(conversation, None) for a usable record; (None, why not) for a refused one.

    (None, None) when the record names speakers no label maps: the file gets one problem for all of
    them (`ReadContext.unmapped_problem`).
    """
    context = context if context is not None else ReadContext()
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type_name(record)}"
    dialect = next((dialect for dialect in RECORD_DIALECTS if dialect.claims(record)), None)
    if dialect is None:
        return None, closest_format(record)
    try:
        return dialect.normalize(record, default_id, context), None
    except Unmapped:
        return None, None
    except RecordError as error:
        return None, str(error) if dialect.name in CHAT_FAMILY else f"{dialect.name}: {error}"
    except RecursionError:
        return None, f"{dialect.name}: nested too deeply to read"


def _item_keys(record: dict) -> set[str]:
    keys: set[str] = set()
    for value in record.values():
        if isinstance(value, list):
            for item in value[:5]:
                if isinstance(item, dict):
                    keys |= {key for key in item if isinstance(key, str)}
    return keys


def closest_format(record: dict) -> str:
    """One line: the record matches no shape; the nearest known one (by shared keys) and how to convert."""
    keys, items = set(record), _item_keys(record)
    if {"chosen", "rejected"} <= keys:  # a preference pair is a known shape, just not one SFT trains on
        return f'not a conversation shape lyra reads: {chat.UNSUPPORTED_RECORD_FIELDS["chosen"]}'
    scored = [(2 * len(keys & dialect.keys) + len(items & dialect.item_keys), -index, dialect)
              for index, dialect in enumerate(RECORD_DIALECTS)]
    score, _, dialect = max(scored, key=lambda entry: entry[:2])
    listed = ", ".join(f'"{shown(key)}"' for key in sorted(keys, key=str)[:6]) + (", ..." if len(keys) > 6 else "")
    where = f"closest known format: {dialect.name} {dialect.shape}" if score else (
        f"no known format shares its keys; the simplest is {dialect.name} {dialect.shape}")
    return f"not a conversation shape lyra reads (keys: {listed or 'none'}); {where}: {dialect.convert}"
