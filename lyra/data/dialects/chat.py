"""The chat family of record shapes: seed, ShareGPT, OpenAI `messages`, Firefly and alpaca.

    seed      {"id": ..., "conversations": [{"from": "system"|"user"|"assistant", "value": "..."}]}
    ShareGPT  {"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", "value": ...}],
               "system": "...", "tools": [...] or "[...]"}
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..." or text parts,
               "tool_calls": [...], "weight": 0|1, "name": ...}], "tools": [...]}
    alpaca    {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}
    Firefly   {"conversation": [{"human": ..., "assistant": ...}], "system": ...}

An explicit empty system prompt (`"system": ""`, or an empty first system message) is kept as no
system prompt: `Conversation.no_system_prompt`, so data.system_prompt is not inserted (counted).
Message `name`s map to roles through the labels when several characters share a role
(`lyra.data.dialects.base.ReadContext.speaker_roles`); with one name per role they are ignored (listed).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from lyra.data.dialects.base import Dialect, ReadContext, named_messages
from lyra.data.records import Conversation, RecordError, shown, type_name

ROLE_ALIASES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
                "tool": "tool", "observation": "tool", "function": "tool", "function_call": "assistant"}
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
                raise RecordError(f'message {number} ({role}): content parts must be objects like '
                           f'{{"type": "text", "text": "..."}}, got {type_name(part)}')
            else:
                raise RecordError(f'message {number} ({role}): content part of type {shown(json.dumps(kind))} is not supported '
                           f'(text only); remove the part or the record')
        return "".join(texts)
    raise RecordError(f'message {number} ({role}): "{key}" must be a string, got {type_name(value)}')


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
        raise RecordError(f'message {number}: a tool call must be {{"name": "...", "arguments": {{...}}}}, '
                   f"got {json.dumps(call, ensure_ascii=False)[:80]}")
    arguments = call.get("arguments", {})
    try:
        arguments = _json_value(arguments)
    except json.JSONDecodeError:
        raise RecordError(f'message {number}: the arguments of tool call "{shown(call["name"])}" '
                          "are not valid JSON") from None
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}


def _tools(record: dict) -> list[dict] | None:
    if "tools" not in record or record["tools"] in (None, "", []):
        return None
    try:
        tools = _json_value(record["tools"])
    except json.JSONDecodeError as error:
        raise RecordError(f'"tools" is a string that is not valid JSON ({error.msg}); '
                   "give a list of function schemas") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RecordError(f'"tools" must be a list of function schemas, got {type_name(tools)}')
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
            raise RecordError(f'"conversation" must be a list of {{"human", "assistant"}} pairs, got {type_name(pairs)}')
        turns = []
        for number, pair in enumerate(pairs, start=1):
            if not (isinstance(pair, dict) and "human" in pair and "assistant" in pair):
                raise RecordError(f'"conversation" item {number} must be {{"human": "...", "assistant": "..."}}')
            turns += [{"role": "user", "content": pair["human"]}, {"role": "assistant", "content": pair["assistant"]}]
        return "conversation", turns
    if "instruction" in record or "output" in record:  # alpaca
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise RecordError(f'alpaca record: "{key}" must be a string, got {type_name(record.get(key))}')
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise RecordError(f'alpaca record: "input" must be a string, got {type_name(extra)}')
        history = record.get("history") or []
        if not (isinstance(history, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in history)):
            raise RecordError('alpaca record: "history" must be a list of [instruction, response] pairs')
        turns = []
        for prompt, response in history:
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        instruction = record["instruction"]
        prompt = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
        return "instruction", [*turns, {"role": "user", "content": prompt},
                               {"role": "assistant", "content": record["output"]}]
    raise RecordError('missing "conversations" (or OpenAI "messages", alpaca "instruction"/"output", '
                      'Firefly "conversation")')


def _normalize_message(turn: Any, number: int, ignored: Counter) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise RecordError(f"message {number} must be an object, got {type_name(turn)}")
    role_key = "from" if "from" in turn else "role" if "role" in turn else None
    if role_key is None:
        raise RecordError(f'message {number} has no role ("from" or "role")')
    raw_role = turn[role_key]
    role = ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise RecordError(f"message {number} has unknown role {shown(json.dumps(raw_role, ensure_ascii=False), 60)} "
                   f"(expected one of {', '.join(ROLE_ALIASES)})")
    for name in REASONING_FIELDS:
        if turn.get(name):
            raise RecordError(f'message {number} ({role}) has "{name}": lyra trains replies without reasoning '
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
            raise RecordError(f'message {number} (function_call): "{text_key}" must be JSON like '
                       '{"name": "...", "arguments": {...}}') from None
        calls = [_tool_call(call, number) for call in (value if isinstance(value, list) else [value])]
        text = ""
    else:
        if text_key is None and not (turn.get("tool_calls") or turn.get("function_call")):
            raise RecordError(f'message {number} has no text ("value" or "content")')
        text = _message_text(turn.get(text_key), number, role, text_key or "content")
        raw_calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
        if raw_calls:
            if role != "assistant":
                raise RecordError(f'message {number} ({role}) has tool calls; only assistant messages may call tools')
            if not isinstance(raw_calls, list):
                raise RecordError(f'message {number}: "tool_calls" must be a list, got {type_name(raw_calls)}')
            calls = [_tool_call(call, number) for call in raw_calls]
    if "<think>" in text or "</think>" in text:
        raise RecordError(f"message {number} ({role}) holds a <think> block; lyra trains replies without reasoning "
                   "(enable_thinking=False): remove it")
    if not text.strip() and not calls:
        if role == "system" and number == 1:  # an explicit empty system prompt, dropped by the caller
            return {"role": "system", "content": ""}
        raise RecordError(f"message {number} ({role}) is empty")
    message["content"] = text
    if calls:
        message["tool_calls"] = calls
    if "weight" in turn:  # OpenAI fine-tuning: weight 0 = context only, not trained on
        if turn["weight"] not in (0, 1) or isinstance(turn["weight"], bool):
            raise RecordError(f'message {number} ({role}): "weight" must be 0 or 1, got {json.dumps(turn["weight"])}')
        if role != "assistant":
            raise RecordError(f'message {number} ({role}): "weight" applies to assistant messages only')
        if turn["weight"] == 0:
            message["weight"] = 0
    return message


def normalize_chat(record: dict, default_id: str, context: ReadContext) -> Conversation:
    """A record of the chat family as a Conversation; RecordError says what is wrong and how to fix it."""
    for name, why in UNSUPPORTED_RECORD_FIELDS.items():
        if record.get(name):
            raise RecordError(f'"{name}": {why}')
    list_key, turns = _turns(record)
    if not isinstance(turns, list):
        raise RecordError(f'"{list_key}" must be a list of messages, got {type_name(turns)}')
    if not turns:
        raise RecordError(f'"{list_key}" is empty')
    local_ignored: Counter = Counter(name for name in record if name not in RECORD_FIELDS)
    messages = [_normalize_message(turn, number, local_ignored) for number, turn in enumerate(turns, start=1)]
    if _speaker_names(turns, messages, context):
        local_ignored.pop("message.name", None)
    no_system_prompt = False
    if messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages.pop(0)  # an empty first system message: the record wants no system prompt
        no_system_prompt = True
    system = record.get("system")
    if isinstance(system, str) and not system.strip() and "system" in record:
        no_system_prompt = no_system_prompt or not (messages and messages[0]["role"] == "system")
    elif system is not None:
        if not isinstance(system, str):
            raise RecordError(f'"system" must be a string, got {type_name(system)}')
        if messages and messages[0]["role"] == "system" and messages[0]["content"] != system:
            raise RecordError('both a top-level "system" and a first system message, and they differ; keep one')
        if not messages or messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
            no_system_prompt = False
    tools = _tools(record)
    if any(message.get("tool_calls") for message in messages) and not tools:
        ignored_calls = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]["function"]["name"]
        raise RecordError(f'calls the tool "{shown(ignored_calls)}" but has no "tools": add the function schemas as '
                          '"tools" so the model learns them from the prompt it will see')
    if not any(message["role"] == "assistant" for message in messages):
        raise RecordError("conversation has no assistant turn (nothing to learn from)")
    if all(message.get("weight") == 0 for message in messages if message["role"] == "assistant"):
        raise RecordError('every assistant turn has "weight": 0 (nothing to learn from)')
    context.ignored.update(local_ignored)
    context.counts["empty_system_kept"] += no_system_prompt
    record_id = record.get("id")
    conversation_id = default_id if record_id is None or isinstance(record_id, (dict, list)) else str(record_id)
    return Conversation(conversation_id, messages, tools, no_system_prompt=no_system_prompt)


def _speaker_names(turns: list, messages: list[dict], context: ReadContext) -> bool:
    """Map message `name`s to roles through the labels when several characters share a role; True if used.

    With at most one name per role the names say nothing the roles do not, and are ignored (listed).
    """
    names = [turn.get("name") if isinstance(turn.get("name"), str) and turn["name"].strip() else None
             for turn in turns]
    per_role: dict[str, set[str]] = {}
    for message, name in zip(messages, names):
        if name:
            per_role.setdefault(message["role"], set()).add(name.strip())
    if not any(len(speakers) > 1 for speakers in per_role.values()):
        return False
    named = [index for index, (message, name) in enumerate(zip(messages, names))
             if name and message["role"] in ("user", "assistant") and not message.get("tool_calls")]
    roles = context.speaker_roles([names[index] for index in named])
    spoken = named_messages([names[index] for index in named], [messages[index]["content"] for index in named],
                            roles, context)
    for index, message in zip(named, spoken):
        messages[index].update(message)
        if message["role"] != "assistant":  # weight applies to assistant turns only
            messages[index].pop("weight", None)
    return True


def _claims_firefly(record: dict) -> bool:
    return "conversation" in record and "bot_name" not in record and "bot_definitions" not in record


DIALECTS = [
    Dialect("seed/ShareGPT", lambda record: "conversations" in record, normalize_chat,
            frozenset({"id", "conversations", "system", "tools"}),
            '{"conversations": [{"from": "user"|"assistant"|"system", "value": "..."}]}',
            frozenset({"from", "value"}),
            'put the turns in "conversations" as {"from": "user"|"assistant", "value": TEXT}'),
    Dialect("OpenAI messages", lambda record: "messages" in record, normalize_chat,
            frozenset({"messages", "tools"}),
            '{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}',
            frozenset({"role", "content", "name", "tool_calls", "weight"}),
            'put the turns in "messages" as {"role": "user"|"assistant", "content": TEXT}'),
    Dialect("alpaca", lambda record: "instruction" in record or "output" in record, normalize_chat,
            frozenset({"instruction", "input", "output", "system", "history"}),
            '{"instruction": "...", "input": "...", "output": "..."}', frozenset(),
            'give "instruction" (the user turn) and "output" (the reply) as strings'),
]
FIREFLY = Dialect("Firefly", _claims_firefly, normalize_chat, frozenset({"conversation", "system"}),
                  '{"conversation": [{"human": "...", "assistant": "..."}]}', frozenset({"human", "assistant"}),
                  'make each "conversation" item {"human": TEXT, "assistant": TEXT}')
