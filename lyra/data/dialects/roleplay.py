"""Role-play record shapes: PIPPA, text-generation-webui history, ChatHaruhi, speaker dialogues, RoleBench.

    PIPPA            {"bot_name", "bot_definitions", "bot_description", "bot_greeting",
                      "conversation": [{"message": TEXT, "is_human": true|false}]}
    webui history    {"internal": [[user, reply], ...], "visible": [...]}   (older: {"data", "data_visible"})
    ChatHaruhi       {"dialogue": [{"role": NAME, "text": TEXT}]}           names -> roles by labels
    speaker dialogue {"conversation": [{"message": TEXT, "speaker": NAME}]} names -> roles by labels
    RoleBench        {"role": NAME, "question": TEXT, "generated": [answer, ...]}
    ChatHaruhi pairs {"role_A": NAME, "role_B": NAME, "query": TEXT, "response": TEXT}

Choices (docs/roleplay-data.md lists them with what each counts):
- PIPPA: the system prompt is `bot_description` (the character's one-paragraph summary, when it is
  not already inside the definitions) followed by `bot_definitions`, with {{char}} -> bot_name and
  {{user}} / {{random_user_N}} -> "User", in the messages too. `bot_greeting` is not used: PIPPA's
  conversation already opens with it.
- webui history: `internal` (or `data`) is trained, the HTML copy `visible` is ignored; the pair
  whose user text is "<|BEGIN-VISIBLE-CHAT|>" holds the character's greeting, kept as an opening
  assistant turn (counted). Empty texts (an interrupted or continued turn) are skipped, counted.
- RoleBench: the first `generated` answer is trained; the others are alternatives of the same
  reply, skipped and counted, as SillyTavern's other swipes are.
- Multi-speaker shapes never guess: every name maps through `--label NAME=ROLE` / data.labels.
"""

from __future__ import annotations

import re
from typing import Any

from lyra.data.dialects.base import Dialect, ReadContext, named_messages, text_of
from lyra.data.records import Conversation, RecordError, type_name

USER_NAME = "User"  # what {{user}} becomes in PIPPA records: the records do not say who the user was
BEGIN_VISIBLE_CHAT = "<|BEGIN-VISIBLE-CHAT|>"
_MACRO = re.compile(r"\{\{\s*(char|user|random_user_\d+)\s*\}\}|<(BOT|USER)>", re.IGNORECASE)


def expand_names(text: str, character: str, user: str = USER_NAME) -> str:
    """{{char}}/{{user}} in any case, PIPPA's {{random_user_N}} and V1's <BOT>/<USER> -> the names."""
    def name(match: re.Match) -> str:
        macro = (match.group(1) or match.group(2)).lower()
        return character if macro in ("char", "bot") else user
    return _MACRO.sub(name, text)


def _got(value: Any) -> str:
    return "an empty list" if value == [] else type_name(value)


def _id(record: dict, default_id: str) -> str:
    value = record.get("id", record.get("bot_id"))
    return default_id if value is None or isinstance(value, (dict, list)) else str(value)


def _ignore_others(record: dict, known: set[str], context: ReadContext) -> None:
    context.ignored.update(name for name in record if name not in known)


def _finish(record: dict, default_id: str, messages: list[dict], context: ReadContext) -> Conversation:
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError("conversation has no assistant turn (nothing to learn from)")
    return Conversation(_id(record, default_id), messages)


def _keep(messages: list[dict], role: str, text: str, context: ReadContext) -> None:
    if text.strip():
        messages.append({"role": role, "content": text})
    else:
        context.counts["empty_messages_skipped"] += 1


# ---------------------------------------------------------------------------------------------- PIPPA

PIPPA_FIELDS = {"bot_name", "bot_definitions", "bot_description", "conversation", "id", "bot_id"}


def _claims_pippa(record: dict) -> bool:
    if "bot_name" in record or "bot_definitions" in record:
        return True
    items = record.get("conversation")
    return isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "is_human" in items[0]


def _pippa(record: dict, default_id: str, context: ReadContext) -> Conversation:
    character = record.get("bot_name")
    if not (isinstance(character, str) and character.strip()):
        raise RecordError(f'"bot_name" must be the character\'s name, got {type_name(character)}')
    items = record.get("conversation")
    if not isinstance(items, list) or not items:
        raise RecordError(f'"conversation" must be a non-empty list of {{"message", "is_human"}}, '
                          f"got {_got(items)}")
    messages: list[dict] = []
    for number, item in enumerate(items, start=1):
        if not (isinstance(item, dict) and "message" in item and isinstance(item.get("is_human"), bool)):
            raise RecordError(f'conversation item {number} must be {{"message": TEXT, "is_human": true|false}}')
        text = expand_names(text_of(item["message"], f'conversation item {number}: "message"'), character)
        _keep(messages, "user" if item["is_human"] else "assistant", text, context)
    parts = []
    for key in ("bot_description", "bot_definitions"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise RecordError(f'"{key}" must be a string, got {type_name(value)}')
        parts.append(expand_names(value or "", character).strip())
    description, definitions = parts
    system = definitions if description and description in definitions else "\n\n".join(p for p in parts if p)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    _ignore_others(record, PIPPA_FIELDS, context)
    return _finish(record, default_id, messages, context)


# --------------------------------------------------------------------------- text-generation-webui

def _claims_webui(record: dict) -> bool:
    return "internal" in record or ("data" in record and "data_visible" in record)


def _webui(record: dict, default_id: str, context: ReadContext) -> Conversation:
    key = "internal" if "internal" in record else "data"
    pairs = record[key]
    if not isinstance(pairs, list) or not pairs:
        raise RecordError(f'"{key}" must be a non-empty list of [user text, reply] pairs, got {_got(pairs)}')
    messages: list[dict] = []
    for number, pair in enumerate(pairs, start=1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f'"{key}" pair {number} must be [user text, reply], got '
                              f"{type_name(pair)}{f' of {len(pair)}' if isinstance(pair, list) else ''}")
        user = text_of(pair[0], f'"{key}" pair {number}: the user text')
        reply = text_of(pair[1], f'"{key}" pair {number}: the reply')
        if user.strip() == BEGIN_VISIBLE_CHAT:  # the character's greeting, shown before anyone spoke
            if reply.strip():
                context.counts["greetings_kept"] += 1
            _keep(messages, "assistant", reply, context)
            continue
        _keep(messages, "user", user, context)
        _keep(messages, "assistant", reply, context)
    _ignore_others(record, {key, "id"}, context)
    return _finish(record, default_id, messages, context)


# ------------------------------------------------------------------------- multi-speaker dialogues

def _speakers(record: dict, default_id: str, context: ReadContext, key: str, name_key: str,
              text_key: str) -> Conversation:
    items = record.get(key)
    if not isinstance(items, list) or not items:
        raise RecordError(f'"{key}" must be a non-empty list of {{"{name_key}": NAME, "{text_key}": TEXT}}, '
                          f"got {_got(items)}")
    names, texts = [], []
    for number, item in enumerate(items, start=1):
        if not (isinstance(item, dict) and isinstance(item.get(name_key), str) and item[name_key].strip()
                and text_key in item):
            raise RecordError(f'"{key}" item {number} must be {{"{name_key}": NAME, "{text_key}": TEXT}}')
        text = text_of(item[text_key], f'"{key}" item {number}: "{text_key}"')
        if not text.strip():
            context.counts["empty_messages_skipped"] += 1
            continue
        names.append(item[name_key])
        texts.append(text)
    roles = context.speaker_roles(names)
    _ignore_others(record, {key, "id"}, context)
    return _finish(record, default_id, named_messages(names, texts, roles, context), context)


def _claims_speaker_items(record: dict) -> bool:
    items = record.get("conversation")
    return isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "speaker" in items[0]


# ------------------------------------------------------------------------------ one-turn persona sets

def _rolebench(record: dict, default_id: str, context: ReadContext) -> Conversation:
    question = text_of(record.get("question"), '"question"')
    answers = record.get("generated")
    if not (isinstance(answers, list) and answers and all(isinstance(answer, str) for answer in answers)):
        raise RecordError(f'"generated" must be a non-empty list of answers (strings), got {type_name(answers)}')
    if not question.strip() or not answers[0].strip():
        raise RecordError('"question" and the first "generated" answer must not be empty')
    context.counts["alternatives_skipped"] += len(answers) - 1
    if isinstance(record.get("role"), str):
        context.characters[record["role"]] += 1
    _ignore_others(record, {"role", "question", "generated", "id"}, context)
    return _finish(record, default_id, [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answers[0]}], context)


def _haruhi_pair(record: dict, default_id: str, context: ReadContext) -> Conversation:
    query = text_of(record.get("query"), '"query"')
    response = text_of(record.get("response"), '"response"')
    if not query.strip() or not response.strip():
        raise RecordError('"query" and "response" must not be empty')
    if isinstance(record.get("role_B"), str):
        context.characters[record["role_B"]] += 1
    _ignore_others(record, {"role_A", "role_B", "query", "response", "id"}, context)
    return _finish(record, default_id, [{"role": "user", "content": query},
                                        {"role": "assistant", "content": response}], context)


DIALECTS = [
    Dialect("PIPPA", _claims_pippa, _pippa,
            frozenset({"bot_name", "bot_definitions", "bot_description", "bot_greeting", "conversation",
                       "submission_timestamp", "categories", "bot_id"}),
            '{"bot_name": NAME, "bot_definitions": TEXT, "conversation": [{"message": TEXT, "is_human": true|false}]}',
            frozenset({"message", "is_human"}),
            'give each "conversation" item "message" (a string) and "is_human" (true or false)'),
    Dialect("text-generation-webui history", _claims_webui, _webui,
            frozenset({"internal", "visible", "data", "data_visible", "metadata"}),
            '{"internal": [[USER_TEXT, REPLY], ...]}', frozenset(),
            'give "internal" as a list of [user text, reply] pairs of strings'),
    Dialect("ChatHaruhi dialogue", lambda record: "dialogue" in record,
            lambda record, default_id, context: _speakers(record, default_id, context, "dialogue", "role", "text"),
            frozenset({"dialogue"}), '{"dialogue": [{"role": NAME, "text": TEXT}]} (+ --label NAME=ROLE)',
            frozenset({"role", "text"}), 'give each "dialogue" item "role" (the speaker\'s name) and "text"'),
    Dialect("speaker dialogue", _claims_speaker_items,
            lambda record, default_id, context: _speakers(record, default_id, context, "conversation", "speaker",
                                                          "message"),
            frozenset({"conversation"}), '{"conversation": [{"speaker": NAME, "message": TEXT}]} (+ --label NAME=ROLE)',
            frozenset({"speaker", "message"}), 'give each "conversation" item "speaker" and "message"'),
    Dialect("RoleBench", lambda record: "generated" in record or "question" in record, _rolebench,
            frozenset({"role", "question", "generated"}), '{"role": NAME, "question": TEXT, "generated": [ANSWER, ...]}',
            frozenset(), 'give "question" as a string and "generated" as a list of answer strings'),
    Dialect("ChatHaruhi pairs", lambda record: "query" in record or "role_B" in record, _haruhi_pair,
            frozenset({"role_A", "role_B", "query", "response"}),
            '{"role_A": NAME, "role_B": CHARACTER, "query": TEXT, "response": TEXT}', frozenset(),
            'give "query" (what role_A says) and "response" (what role_B answers) as strings'),
]


# ---------------------------------------------------------------------------- not conversations at all

CARD_SPECS = {"chara_card_v2", "chara_card_v3"}


def is_character_card(record: Any) -> bool:
    """A character card (V1, V2, V3 JSON) or a text-generation-webui character: a persona, not a chat log."""
    if not isinstance(record, dict):
        return False
    if record.get("spec") in CARD_SPECS or {"char_name", "char_persona"} <= record.keys():
        return True
    if {"name", "description", "first_mes"} <= record.keys():  # V2 data without its envelope
        return True
    return {"name", "context", "greeting"} <= record.keys()  # text-generation-webui character
