"""What every dialect reader shares: the `Dialect` entry, the per-file `ReadContext`, speaker names -> roles.

    from lyra.data.dialects.base import Dialect, ReadContext
    context = ReadContext(labels={"Haruhi": "assistant", "Kyon": "user"})
    roles = context.speaker_roles(["Kyon", "Haruhi"])    # ["user", "assistant"], or Unmapped raised

A `Dialect` names a record shape, says whether it claims a record (`claims`), turns it into a
`Conversation` (`normalize`) and describes itself for refusals (`keys`, `item_keys`, `shape`,
`convert`): a record no dialect claims is told which one it is closest to and how to convert it.

Speaker names (ChatHaruhi's `role`, `speaker`, OpenAI's message `name`, SillyTavern group chats)
map to roles only through labels: `--label NAME=ROLE` / `data.labels`, plus the built-in ones of
`lyra.data.txt`. An unmapped name is never guessed: the record is refused, and the file gets one
problem listing every name seen with its count (`ReadContext.unmapped_problem`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.data.records import Conversation, Problem, RecordError, shown


class Unmapped(RecordError):
    """A record with speaker names no label maps; reported once per file, not per record."""


@dataclass(frozen=True)
class Dialect:
    """One record shape: how to recognise it, read it, and describe it to someone whose record is refused."""

    name: str  # as users know it: "PIPPA", "ChatHaruhi dialogue"
    claims: Callable[[dict], bool]  # True when the record is meant to be this shape (then errors name it)
    normalize: Callable[[dict, str, ReadContext], Conversation]  # (record, default id, context)
    keys: frozenset[str]  # top-level keys of the shape, for "closest format"
    shape: str  # the shape in one line, e.g. '{"bot_name", "conversation": [{"message", "is_human"}]}'
    item_keys: frozenset[str] = frozenset()  # keys of its message items
    convert: str = ""  # how to turn a near miss into this shape


@dataclass
class ReadContext:
    """Per-file state of one read: the label table, the counts, the unmapped speaker names."""

    labels: dict[str, str] | None = None  # label -> role, as given (--label / data.labels)
    counts: Counter = field(default_factory=Counter)  # records.COUNT_NOTES keys
    ignored: Counter = field(default_factory=Counter)  # field name -> records
    characters: Counter = field(default_factory=Counter)  # one-turn persona sets: character -> records
    speakers_seen: Counter = field(default_factory=Counter)  # names met in records that needed a mapping
    unmapped: Counter = field(default_factory=Counter)  # names no label maps
    unmapped_lines: list[int] = field(default_factory=list)  # where the refused records start
    line: int = 0  # where the record being read starts
    _table: dict[str, str] | None = None

    def table(self) -> dict[str, str]:
        if self._table is None:
            from lyra.data.txt import label_table

            self._table = label_table(self.labels)
        return self._table

    def role_of(self, name: Any) -> str | None:
        return self.table().get(name.strip().casefold()) if isinstance(name, str) and name.strip() else None

    def speaker_roles(self, names: list[str]) -> list[str]:
        """The role of each speaker name; Unmapped (the record is refused) when any name has no label."""
        self.speakers_seen.update(names)
        roles = [self.role_of(name) for name in names]
        missing = Counter(name for name, role in zip(names, roles) if role is None)
        if missing:
            self.unmapped.update(missing)
            self.unmapped_lines.append(self.line)
            raise Unmapped(", ".join(missing))
        return roles

    def unmapped_problem(self, path: Path) -> Problem | None:
        """One problem for the whole file: every unmapped name, every name seen, the labels to add."""
        if not self.unmapped:
            return None
        names = self.unmapped.most_common()
        seen = ", ".join(f"{shown(name)} ({count})" for name, count in self.speakers_seen.most_common(12))
        more = f" and {len(self.speakers_seen) - 12} more" if len(self.speakers_seen) > 12 else ""
        seen = f"; speakers seen: {seen}{more}" if set(self.speakers_seen) != set(self.unmapped) else ""
        options = " ".join(f"--label '{shown(name)}=user'" for name, _ in names[:3])
        mapping = ", ".join(f"{shown(name)}: user" for name, _ in names[:3])
        lines = ", ".join(str(line) for line in self.unmapped_lines[:3]) + (
            ", ..." if len(self.unmapped_lines) > 3 else "")
        return Problem(path, self.unmapped_lines[0],
                       f"{len(self.unmapped_lines)} record(s) (lines {lines}) have speakers no label maps to a role: "
                       f"{', '.join(f'{shown(name)} ({count})' for name, count in names[:12])}{seen}. "
                       f"Map each name to user, assistant (the character to train) or system: {options} for "
                       f"python -m lyra.data, data.labels='{{{mapping}}}' for training",
                       drops=len(self.unmapped_lines))


def named_messages(names: list[str], texts: list[str], roles: list[str], context: ReadContext) -> list[dict]:
    """Messages from speakers; when several speakers share the user or system role, each says who speaks.

    The character trained (assistant) is never prefixed: it would learn to write its own name.
    """
    by_role: dict[str, set[str]] = {}
    for name, role in zip(names, roles):
        by_role.setdefault(role, set()).add(name.strip())
    messages = []
    for name, text, role in zip(names, texts, roles):
        if role != "assistant" and len(by_role[role]) > 1:
            text = f"{name.strip()}: {text}"
            context.counts["names_prefixed"] += 1
        messages.append({"role": role, "content": text})
    return messages


def text_of(value: Any, where: str) -> str:
    """A message text, or RecordError naming where it is and what it holds instead."""
    if isinstance(value, str):
        return value
    from lyra.data.records import type_name

    raise RecordError(f"{where} must be a string, got {type_name(value)}")
