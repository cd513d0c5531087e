"""Plain-text transcripts -> seed-format JSONL (the reading is `lyra.data.dialects.transcript`).

    from lyra.data import convert_txt_to_jsonl
    convert_txt_to_jsonl("chats.txt", "chats.jsonl")             # returns the number of conversations
    python -m lyra.data convert chats.txt chats.jsonl --label Guest=user

The transcript format (labels, continuation lines, `<START>`, `# id:` comments) is documented in
`lyra.data.dialects.transcript`, which reads it, and in docs/data.md.

Output is written atomically (temp file + os.replace): a failure never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lyra.data.dialects.transcript import label_table, parse_label_options, parse_txt
from lyra.data.records import Conversation, decode_text, format_problems
from lyra.errors import UserError

__all__ = ["convert_txt_to_jsonl", "label_table", "parse_label_options", "parse_txt", "to_seed_record",
           "write_jsonl_atomic"]


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
