"""SillyTavern chat files (`.jsonl`): a header line, then one message per line; one file is one conversation.

    header   {"user_name": ..., "character_name": ..., "create_date": ..., "chat_metadata": {...}}
             (newer versions write "unused" for both names)
    message  {"name", "is_user", "is_system", "send_date", "mes", "swipes", "swipe_id", "extra"}

What is trained, and what is counted instead (docs/roleplay-data.md):
- `mes`, the chosen swipe; the other `swipes` are not trained, and counted.
- `is_system: true` marks a message SillyTavern hides from the model's prompt (/hide, /comment):
  skipped, counted. Narrator messages (`extra.type == "narrator"`, from /sys) are part of the
  prompt in SillyTavern and become system turns, counted.
- `is_user` messages are user turns; the header's character speaks the assistant turns. With
  "unused" names, the one name that speaks without `is_user` is the character. Any other speaker
  (a group chat) maps through `--label NAME=ROLE` / data.labels, or the file is refused with the
  names seen: never a guess.
- `extra.reasoning` (a model's thinking) is not trained, listed as an ignored field.
"""

from __future__ import annotations

from typing import Any

from lyra.data.dialects.base import ReadContext, Unmapped, named_messages
from lyra.data.records import Conversation, Problem, RecordError, type_name

UNUSED = "unused"


def is_header(record: Any) -> bool:
    return isinstance(record, dict) and ("chat_metadata" in record or {"user_name", "character_name"} <= record.keys())


def is_message(record: Any) -> bool:
    return isinstance(record, dict) and "mes" in record and ("is_user" in record or "is_system" in record)


def claims(records: list[tuple[int, Any]]) -> bool:
    """A SillyTavern chat: its first record is the header, or its first records are messages."""
    return bool(records) and (is_header(records[0][1]) or any(is_message(record) for _, record in records[:3]))


def _real_name(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() and value.strip() != UNUSED else None


def read(records: list[tuple[int, Any]], parse_problems: list[Problem], path, context: ReadContext
         ) -> tuple[list[Conversation], list[Problem]]:
    """The file's one conversation, or the problems that make it unusable (the first one costs it)."""
    header = records[0][1] if is_header(records[0][1]) else {}
    body = records[1:] if header else records
    problems = list(parse_problems)
    kept: list[tuple[int, dict]] = []
    for line, message in body:
        if not is_message(message):
            problems.append(Problem(path, line, 'SillyTavern chat: not a message: expected {"name", "is_user", '
                                                f'"is_system", "mes", ...}}, got {type_name(message)}'
                                                + (f" with keys {', '.join(sorted(message)[:6])}"
                                                   if isinstance(message, dict) else "")))
            continue
        if not isinstance(message.get("mes"), str):
            problems.append(Problem(path, line, f'SillyTavern chat: "mes" must be a string, '
                                                f'got {type_name(message.get("mes"))}'))
            continue
        kept.append((line, message))
    character = _real_name(header.get("character_name"))
    speakers = {m.get("name") for _, m in kept if not m.get("is_user") and not m.get("is_system")
                and not _is_narrator(m) and isinstance(m.get("name"), str)}
    if character is None and len(speakers) == 1:
        character = next(iter(speakers))
    conversations: list[Conversation] = []
    if not problems:
        try:
            conversations = [_conversation(kept, character, path, context)]
        except Unmapped:
            pass  # one problem for the file, from context.unmapped_problem
        except RecordError as error:
            problems.append(Problem(path, 1, f"SillyTavern chat: {error}"))
    if problems:  # one file is one conversation: the first problem costs it, the others nothing more
        problems = [Problem(p.path, p.line, p.message, drops=int(index == 0)) for index, p in enumerate(problems)]
    _ignore_header(header, context)
    return conversations, problems


def _is_narrator(message: dict) -> bool:
    extra = message.get("extra")
    return isinstance(extra, dict) and extra.get("type") == "narrator"


def _ignore_header(header: dict, context: ReadContext) -> None:
    context.ignored.update(f"header.{name}" for name in header if name not in ("user_name", "character_name"))


def _conversation(kept: list[tuple[int, dict]], character: str | None, path, context: ReadContext) -> Conversation:
    context.line = kept[0][0] if kept else 1
    names, texts, fixed = [], [], []  # fixed: the role when the message says it (user, narrator, the character)
    for _, message in kept:
        swipes = message.get("swipes")
        if isinstance(swipes, list) and len(swipes) > 1:
            context.counts["swipes_skipped"] += len(swipes) - 1
        if isinstance(message.get("extra"), dict) and message["extra"].get("reasoning"):
            context.ignored["message.extra.reasoning"] += 1
        if message.get("is_system") is True:
            context.counts["hidden_system_skipped"] += 1
            continue
        if not message["mes"].strip():
            context.counts["empty_messages_skipped"] += 1
            continue
        name = message.get("name") if isinstance(message.get("name"), str) else ""
        if message.get("is_user") is True:
            role = "user"
        elif _is_narrator(message):
            role = "system"
            context.counts["narrator_system_turns"] += 1
        elif character is not None and name.strip() == character:
            role = "assistant"
        else:
            role = None
        names.append(name or ("User" if role == "user" else "?"))
        texts.append(message["mes"])
        fixed.append(role)
    open_names = [name for name, role in zip(names, fixed) if role is None]
    mapped = iter(context.speaker_roles(open_names)) if open_names else iter(())
    roles = [role if role is not None else next(mapped) for role in fixed]
    messages = named_messages(names, texts, roles, context)
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError("no message of the character (assistant) to learn from")
    if messages[0]["role"] == "assistant":
        context.counts["greetings_kept"] += 1
    return Conversation(path.stem, messages, line=1)
