"""Text -> JSON records, each with the line where it starts: JSON Lines, and `.json` arrays that survive damage.

    from lyra.data.jsontext import jsonl_records, json_array_records
    records, problems = jsonl_records(text, path)        # [(line, value)], a broken line is one problem
    records, problems = json_array_records(text, path)   # a broken element is skipped, reading goes on

A broken element of a pretty-printed array is skipped by resynchronising on the next line that
opens a value at the element's indentation (robust to a missing quote); a one-line array resumes
after the broken element's closing bracket. JSON nested deeper than Python's parser allows is a
problem too, never a RecursionError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lyra.data.records import PROGRESS_BYTES, Problem

TOO_DEEP = "JSON nested too deeply to read (a conversation needs a few levels, not hundreds)"

def jsonl_records(text: str, path: Path, progress=None) -> tuple[list[tuple[int, Any]], list[Problem]]:
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
        except RecursionError:
            problems.append(Problem(path, line_number, TOO_DEEP))
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


def json_array_records(text: str, path: Path, progress=None) -> tuple[list[tuple[int, Any]], list[Problem]]:
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
        except RecursionError:
            problems.append(Problem(path, lines.line(index), TOO_DEEP))
            resumed = _resync(text, index, index + 1)
            if resumed is None:
                return records, problems
            index = resumed
            continue
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


def is_multiline_document(text: str) -> bool:
    """A pretty-printed single JSON value, which JSON Lines parsing would report line by line."""
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        return False
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def progress_bar(path: Path, total: int, what: str):
    """A byte-based tqdm bar for files over PROGRESS_BYTES, else None."""
    if total < PROGRESS_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{what} {path.name}", unit="char", unit_scale=True, leave=False)
