"""One reader, one set of rules: what `validate`, `stats` and training all use to decide what trains.

    from lyra.data.prepare import prepare_file
    prepared = prepare_file("chats.jsonl", tokenizer, system_prompt="...")   # read + encode every turn
    prepared.problems          # FILE:LINE problems, reading *and* rendering through the training encoder
    examples, stats = prepared.examples(max_length=1024)                     # what training gets

A conversation is trainable when it reads (`lyra.data.formats`) and every supervised turn renders
through the training encoder (`lyra.data.tokenization`); anything else is a `Problem` at the line
where the conversation starts. Encoding is cached under `<cache_dir>/tokenized/`, keyed by the
file's bytes, the tokenizer and its chat template, the system prompt and the .txt labels, so the
runs and sweep jobs on the same data tokenize it once (max_length is applied after the cache).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lyra.data.formats import read_file
from lyra.data.records import PROGRESS_BYTES, Conversation, FileReport, Problem
from lyra.data.tokenization import (IGNORE_INDEX, ChunkTokenizer, EncodeStats, FillMismatch, Pieces, RenderCounts,
                                    TurnRenderer, fitting_turns, inserts_system_prompt, supervised_turns,
                                    turn_end_ids)

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the encoding of a conversation changes
DUPLICATE_WARNING_SHARE = 0.2  # training warns when more assistant replies than this repeat another


class EncodedFile:
    """What every file read and encoded answers, SFT conversations or preference pairs: its path, its
    problems (reading and encoding, in line order) and how many records they cost. Subclasses hold
    `report` (the reader's FileReport) and `encode_problems`."""

    report: FileReport
    encode_problems: list[Problem]

    @property
    def path(self) -> Path:
        return self.report.path

    @property
    def problems(self) -> list[Problem]:
        return sorted(self.report.problems + self.encode_problems, key=lambda problem: problem.line)

    @property
    def skipped(self) -> int:
        return sum(problem.drops for problem in self.problems)


@dataclass
class Prepared(EncodedFile):
    """A file read and encoded: usable conversations, each one's supervised turns, every problem."""

    report: FileReport
    turns: list[list[tuple[list[int], int]]]  # per conversation: (input_ids, prompt length) per supervised turn
    system_prompt_inserted: int = 0  # conversations without a system message that get data.system_prompt
    from_cache: bool = False
    encode_problems: list[Problem] = field(default_factory=list)
    rendering: RenderCounts | None = None  # how the turn texts were rendered (None: loaded from the cache)

    @property
    def conversations(self) -> list[Conversation]:
        return self.report.conversations

    def examples(self, max_length: int) -> tuple[list[dict], EncodeStats]:
        """Training examples: each conversation's turns up to the first longer than max_length (counted)."""
        stats = EncodeStats()
        examples = []
        for turns in self.turns:
            fits = fitting_turns([len(input_ids) for input_ids, _ in turns], max_length, stats)
            examples += [{"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
                          "labels": [IGNORE_INDEX] * prompt_length + input_ids[prompt_length:]}
                         for input_ids, prompt_length in turns[:fits]]
        return examples, stats

    def dataset(self, max_length: int):
        """`examples(max_length)` as a datasets.Dataset, built from flat arrays (no per-token Python)."""
        import pyarrow as pa
        from datasets import Dataset
        from datasets.table import InMemoryTable

        stats = EncodeStats()
        kept: list[tuple[list[int], int]] = []
        for turns in self.turns:
            kept.extend(turns[:fitting_turns([len(ids) for ids, _ in turns], max_length, stats)])
        lengths = np.fromiter((len(ids) for ids, _ in kept), dtype=np.int64, count=len(kept))
        offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in kept), dtype=np.int64, count=int(offsets[-1]))
        prompts = np.fromiter((prompt for _, prompt in kept), dtype=np.int64, count=len(kept))
        prompt_mask = np.zeros(len(ids) + 1, dtype=np.int64)  # +1 at each example start, -1 where its reply starts
        np.add.at(prompt_mask, offsets[:-1], 1)
        np.add.at(prompt_mask, offsets[:-1] + prompts, -1)
        labels = np.where(np.cumsum(prompt_mask[:-1]) > 0, IGNORE_INDEX, ids)
        list_array = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray  # the type from_list would give
        offset_array = pa.array(offsets, type=pa.int32() if list_array is pa.ListArray else pa.int64())
        columns = {name: list_array.from_arrays(offset_array, pa.array(values))
                   for name, values in (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("labels", labels))}
        return Dataset(InMemoryTable(pa.table(columns))), stats

    def duplicate_reply_share(self) -> tuple[int, int]:
        """(assistant replies that repeat an earlier one, all assistant replies)."""
        replies = Counter(json.dumps([m["content"].strip(), m.get("tool_calls")], ensure_ascii=False, sort_keys=True)
                          for c in self.conversations for m in c.messages if m["role"] == "assistant")
        return sum(count - 1 for count in replies.values()), sum(replies.values())

    def notes(self) -> list[str]:
        """What was added or left out without being a problem: one line each, for every front end."""
        lines = []
        if self.system_prompt_inserted:
            lines.append(f"{self.path}: data.system_prompt inserted into {self.system_prompt_inserted} of "
                         f"{len(self.conversations)} conversation(s) that had no system message")
        ignored = self.report.ignored_note()
        if ignored:
            lines.append(ignored)
        return lines + self.report.count_notes()


def default_cache_dir() -> Path:
    """paths.cache_dir's default, for the command line (training passes cfg.paths.cache_dir)."""
    return Path(os.environ.get("LYRA_CACHE") or Path.home() / ".cache" / "lyra")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's identity, vocabulary size, added tokens and template."""
    added = sorted((index, token.content) for index, token in tokenizer.added_tokens_decoder.items())
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
             json.dumps(added, ensure_ascii=False), str(tokenizer.chat_template)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _cache_key(data: bytes, tokenizer, system_prompt: str | None, labels: dict | None) -> str:
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(data).digest())
    digest.update(json.dumps([CACHE_VERSION, tokenizer_fingerprint(tokenizer), system_prompt or "",
                              sorted((labels or {}).items())], ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def _load_cached(path: Path, count: int) -> tuple[list, dict[int, str]] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            ids, offsets, prompts, per_conversation = (cached["ids"], cached["offsets"], cached["prompts"],
                                                       cached["per_conversation"])
            errors = json.loads(str(cached["errors"]))
    except (OSError, KeyError, ValueError):
        return None
    if len(per_conversation) != count:
        return None
    ids_list = ids.tolist()
    bounds = offsets.tolist()
    prompt_list = prompts.tolist()
    turns, turn = [], 0
    for n in per_conversation.tolist():
        turns.append([(ids_list[bounds[t]:bounds[t + 1]], prompt_list[t]) for t in range(turn, turn + n)])
        turn += n
    return turns, {int(index): message for index, message in errors.items()}


def _save_cached(path: Path, turns: list, errors: dict[int, str]) -> None:
    flat = [turn for conversation in turns for turn in conversation]
    lengths = np.fromiter((len(ids) for ids, _ in flat), dtype=np.int64, count=len(flat))
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in flat), dtype=np.int32, count=int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, ids=ids, offsets=offsets, prompts=np.array([p for _, p in flat], dtype=np.int64),
                     per_conversation=np.array([len(c) for c in turns], dtype=np.int64),
                     errors=np.array(json.dumps({str(k): v for k, v in errors.items()})))
        os.replace(handle.name, path)  # atomic: concurrent sweep jobs never read a partial file
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _render_conversation(conversation: Conversation, renderer: TurnRenderer, system_prompt: str | None
                         ) -> list[tuple[int, Pieces, Pieces]] | str:
    """(message number, prompt pieces, prompt + reply pieces) per supervised turn, or why it cannot render."""
    messages, indices = supervised_turns(conversation, system_prompt)
    inserted = len(messages) - len(conversation.messages)  # 1 when the system prompt went in: not the record's own
    rendered = []
    turns = renderer.turns(messages, indices, conversation.tools)
    for number in (index + 1 - inserted for index in indices):
        try:
            prompt, reply = next(turns)
        except FillMismatch:
            raise
        except Exception as error:  # a template may raise anything (jinja raise_exception, TypeError)
            why = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
            return f"message {number} (assistant): {why}"
        if prompt and reply and prompt[-1].__class__ is str and reply[0].__class__ is str:
            full = [*prompt[:-1], prompt[-1] + reply[0], *reply[1:]]  # the pieces of the joined text
        else:
            full = prompt + reply
        rendered.append((number, prompt, full))
    return rendered


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector paused while a file is read and encoded.

    Both build hundreds of thousands of small containers (records, pieces, token-id lists) and
    keep them, so every burst of allocations sets off a collection that scans all of them again:
    2.7 of the 6.7 CPU-s the 20 MB benchmark spent encoding. What is built here is acyclic, so
    reference counting frees whatever is dropped; the collector is switched back on when done and
    takes the few cycles a template render may leave.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _first_end(ids: list[int], start: int, ends: set[int]) -> int | None:
    """The position of the first end-of-turn token at or after `start` (list.index: no Python loop per token)."""
    first = None
    for end in ends:
        try:
            first = ids.index(end, start, len(ids) if first is None else first)
        except ValueError:
            pass
    return first


@_collector_paused()
def encode_all(conversations: list[Conversation], tokenizer, system_prompt: str | None, progress: bool = False
               ) -> tuple[list[list[tuple[list[int], int]]], dict[int, str], RenderCounts]:
    """Every supervised turn of every conversation as (input_ids, prompt length), why any failed, and
    how many turn texts were rendered through the template or filled in from a cached shape.

    Errors are keyed by conversation index and say which assistant turn failed and how to fix it.
    The texts are `turn_texts`' (rendered once per shape by `TurnRenderer`), tokenized a piece at a
    time (`ChunkTokenizer`); tests/test_prepare_fast.py holds them to `encode_turn` token for token.
    """
    chunks = ChunkTokenizer(tokenizer)
    try:
        return _encode(conversations, TurnRenderer(tokenizer, chunks), system_prompt, progress)
    except FillMismatch as mismatch:
        log.warning("%s; rendering every turn through it instead", mismatch)
        return _encode(conversations, TurnRenderer(tokenizer, chunks, fill=False), system_prompt, progress)


def _encode(conversations: list[Conversation], renderer: TurnRenderer, system_prompt: str | None, progress: bool):
    from tqdm.auto import tqdm

    chunks = renderer.chunks
    ends = set(turn_end_ids(renderer.tokenizer))  # the template's end-of-turn token, then eos/pad
    turns: list[list[tuple[list[int], int]]] = [[] for _ in conversations]
    errors: dict[int, str] = {}
    batch: list[tuple[int, int, Pieces, Pieces]] = []  # (conversation, message number, prompt, full)

    def flush():
        encoded = chunks.encode_pieces([pieces for item in batch for pieces in item[2:]])
        for position, (conversation, number, _, _) in enumerate(batch):
            prompt, full = encoded[2 * position], encoded[2 * position + 1]
            if conversation in errors:
                continue
            end = _first_end(full, len(prompt), ends)
            if full[: len(prompt)] != prompt or end is None:
                errors[conversation] = (f"message {number} (assistant): the chat template tokenizes the prompt "
                                        "differently with and without the reply; check this turn's text")
                continue
            turns[conversation].append((full[:end + 1], len(prompt)))
        batch.clear()

    with tqdm(total=len(conversations), desc="encoding", unit="conv", leave=False, disable=not progress) as bar:
        for index, conversation in enumerate(conversations):
            rendered = _render_conversation(conversation, renderer, system_prompt)
            bar.update()
            if isinstance(rendered, str):
                errors[index] = rendered
                continue
            batch.extend((index, number, prompt, full) for number, prompt, full in rendered)
            if len(batch) >= 4096:
                flush()
        flush()
    for index in errors:
        turns[index] = []
    return turns, errors, renderer.counts


@_collector_paused()
def prepare_file(path: str | Path, tokenizer, system_prompt: str | None, labels: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None) -> Prepared:
    """Read `path` and encode every supervised turn; encoder failures become FILE:LINE problems."""
    path = Path(path)
    data = path.read_bytes()
    report = read_file(path, labels)
    conversations = report.conversations
    inserted = sum(inserts_system_prompt(c, system_prompt) for c in conversations)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "tokenized" / f"{_cache_key(data, tokenizer, system_prompt, labels)}.npz"
    cached = _load_cached(cache_file, len(conversations)) if cache_file and cache_file.is_file() else None
    rendering = None
    if cached is not None:
        turns, errors = cached
    else:
        turns, errors, rendering = encode_all(conversations, tokenizer, system_prompt,
                                              progress=len(data) >= PROGRESS_BYTES)
        if cache_file is not None:
            try:
                _save_cached(cache_file, turns, errors)
            except OSError as error:  # a read-only cache only costs time
                log.warning("could not cache the tokenized data in %s: %s", cache_file.parent, error)
    encode_problems = [Problem(path, conversations[index].line, message) for index, message in sorted(errors.items())]
    keep = [index for index in range(len(conversations)) if index not in errors]
    report = FileReport(path, [conversations[i] for i in keep], report.problems, report.ignored_fields, report.counts,
                        report.characters)
    inserted -= sum(inserts_system_prompt(conversations[i], system_prompt) for i in errors)
    return Prepared(report, [turns[i] for i in keep], inserted, cached is not None, encode_problems, rendering)

