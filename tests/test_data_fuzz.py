"""Fuzzing the one reader: thousands of mutated records (random bytes, truncations, deep nesting, huge
strings, wrong types) go through `read_file` and `validate`; every outcome is conversations or
FILE:LINE problems, never a traceback, and reading stays within a bound per MB.

Seeded, so a failure reproduces: the seed and the count tried are in the test's output (pytest -s).

    python -m pytest tests/test_data_fuzz.py -q -s
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

from lyra.data.__main__ import main as data_cli
from lyra.data.formats import read_file

SEED = 20250311
RECORDS_PER_FILE = 250
FILES = 12  # 12 x 250 = 3000 mutated records, plus whole-file mutations
SECONDS_PER_MB = 10.0  # generous on a shared 2-core machine (measured ~0.1 s/MB there); a quadratic resync blows it
FIXTURES = Path(__file__).parent / "fixtures"


def seed_records() -> list:
    """Valid records of every record shape lyra reads, taken from the fixtures."""
    records = []
    for path in sorted((FIXTURES / "roleplay").glob("*.jsonl")) + sorted((FIXTURES / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    for path in sorted((FIXTURES / "roleplay").glob("*.json")):
        records.append(json.loads(path.read_text(encoding="utf-8")))
    return records


def _random_value(rng: random.Random):
    return rng.choice([None, True, 0, -1, 3.5, 10**30, "", "x" * rng.randint(1, 50), [], {}, [None], {"a": 1},
                       "<think>x</think>", "{{char}}", "<|BEGIN-VISIBLE-CHAT|>", "\u0000", "\ud7ff", "旁白"])


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replace(value, path, new):
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return value


def mutate_structure(record, rng: random.Random):
    """Wrong types, deleted keys, deep nesting or a huge string somewhere in the record."""
    record = copy.deepcopy(record)
    path = rng.choice(list(_paths(record)))
    kind = rng.random()
    if kind < 0.45:
        return _replace(record, path, _random_value(rng))
    if kind < 0.6 and path:
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return record
    if kind < 0.75:
        depth = rng.choice([50, 500, 5000, 50000])
        nested = "x"
        for _ in range(depth):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        return _replace(record, path, nested)
    if kind < 0.8:
        return _replace(record, path, "長" * rng.choice([10_000, 100_000]))
    return _replace(record, path, rng.choice(["", " ", "\n\n", "user: x", "Bob: intruder"]))


def _dumps(record) -> str:
    try:
        return json.dumps(record, ensure_ascii=False)
    except RecursionError:  # deeper than json.dumps goes: write the nesting by hand
        return "[" * 20_000 + "]" * 20_000


def mutate_bytes(line: bytes, rng: random.Random) -> bytes:
    """Random bytes flipped or inserted, or the line cut short."""
    kind = rng.random()
    if kind < 0.4 and line:
        cut = rng.randrange(len(line))
        return line[:cut]
    data = bytearray(line)
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(data) + 1)
        data[position:position] = bytes([rng.randrange(256)]) if rng.random() < 0.5 else rng.choice(
            [b'"', b"{", b"]", b",", b"\\", b"\xff", b"\xe9", b"\x00", b"\n"])
    return bytes(data)


def test_thousands_of_mutated_records_never_raise_and_read_in_bounded_time(tmp_path, capsys):
    rng = random.Random(SEED)
    seeds = seed_records()
    assert len(seeds) > 20
    files: list[Path] = []
    tried = 0
    for index in range(FILES):
        lines = []
        for _ in range(RECORDS_PER_FILE):
            record = mutate_structure(rng.choice(seeds), rng)
            line = _dumps(record).encode("utf-8", errors="surrogatepass")
            if rng.random() < 0.35:
                line = mutate_bytes(line, rng)
            lines.append(line)
            tried += 1
        suffix = [".jsonl", ".json", ".jsonl"][index % 3]
        path = tmp_path / f"fuzz{index}{suffix}"
        if suffix == ".json":  # a pretty-printed array, then damaged: resynchronisation under fire
            path.write_bytes(b"[\n  " + b",\n  ".join(lines) + b"\n]\n")
        else:
            path.write_bytes(b"\n".join(lines) + b"\n")
        files.append(path)
    for index in range(40):  # whole files: random bytes, cut-off arrays, transcripts, binary lookalikes
        path = tmp_path / f"whole{index}{['.jsonl', '.json', '.txt', '.yaml'][index % 4]}"
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4000)))
        if index % 5 == 1:
            body = (b"[" + b",".join(_dumps(rng.choice(seeds)).encode() for _ in range(20)))[:rng.randint(1, 3000)]
        if index % 5 == 2:
            body = "\n".join(rng.choice(["user: hi", "assistant: hello", "Bob: x", "<START>", "", "# id: a", "　：",
                                         "長" * 100 + "：x", "a:b"]) for _ in range(300)).encode()
        path.write_bytes(body)
        files.append(path)
        tried += 1
    total_bytes = sum(path.stat().st_size for path in files)
    start = time.perf_counter()
    conversations = problems = 0
    for path in files:
        report = read_file(path, labels={"旁白": "system"})
        conversations += len(report.conversations)
        problems += len(report.problems)
        for problem in report.problems:
            assert str(problem).startswith(f"{path}:") and "\n" not in problem.message
    elapsed = time.perf_counter() - start
    megabytes = total_bytes / 2**20
    with capsys.disabled():
        print(f"\nfuzz (seed {SEED}): {tried} mutated records/files, {megabytes:.1f} MB, {conversations} read as "
              f"conversations, {problems} problems, {elapsed:.1f} s ({elapsed / megabytes:.1f} s/MB)")
    assert tried >= 3000 and problems > 0 and conversations > 0
    assert elapsed / megabytes < SECONDS_PER_MB


def test_validate_answers_fuzzed_files_with_problems_not_tracebacks(tmp_path, capsys):
    rng = random.Random(SEED + 1)
    seeds = seed_records()
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(mutate_bytes(_dumps(mutate_structure(rng.choice(seeds), rng)).encode(), rng)
                                if rng.random() < 0.3 else _dumps(mutate_structure(rng.choice(seeds), rng)).encode()
                                for _ in range(300)))
    assert data_cli(["validate", str(path), "--system-prompt", "You are Mira."]) in (0, 1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) <= 20
