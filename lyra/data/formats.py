"""Reading conversation files into one internal type, `Conversation`.

    from lyra.data.formats import load_conversations
    conversations = load_conversations("my_dialogues.jsonl")

The seed format is one JSON object per line:
    {"id": "...", "conversations": [{"from": "system"|"user"|"assistant", "value": "..."}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lyra.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    """One dialogue; messages are chat-template dicts {"role", "content"}."""

    id: str
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def assistant_turns(self) -> int:
        return sum(message["role"] == "assistant" for message in self.messages)


def load_conversations(path: str | Path, key: str = "data.train_file") -> list[Conversation]:
    """Parse a seed-format JSONL file; the first problem is a UserError naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise UserError(key, f"file not found: {path}")
    conversations = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            messages = [{"role": turn["from"], "content": turn["value"]} for turn in record["conversations"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(key, f"{path}:{line_number}: not a seed-format conversation ({error})") from None
        for message in messages:
            if message["role"] not in ROLES:
                raise UserError(key, f"{path}:{line_number}: unknown role {message['role']!r}")
        conversations.append(Conversation(str(record.get("id", f"{path.stem}-{line_number}")), messages))
    if not conversations:
        raise UserError(key, f"{path} holds no conversations")
    return conversations
