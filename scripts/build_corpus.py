"""Build the embedded Lyra corpus from the hand-written transcripts in scripts/corpus/.

    python scripts/build_corpus.py           # check, then write lyra/data/assets/lyra_{train,eval,probes}.jsonl
    python scripts/build_corpus.py --check   # check only; exit 1 on any problem or out-of-date asset
    python scripts/build_corpus.py --review  # also print phrases OpenCC s2twp would rewrite (manual review)

Each `NN_<topic>.txt` holds whole conversations in the `lyra.data` txt format (您： / 萊拉：), one
topic per file. Every 7th single-turn and every 7th multi-turn conversation of a file (index 3, 10,
17, ... of each) goes to the eval split, so both splits cover every topic and mix. Probes (`probes.txt`, one prompt per line) are single user turns
that appear in neither split. The checks (`lyra.data.corpus.corpus_problems`) are the corpus
requirements; tests/test_corpus.py runs them again on the shipped files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lyra.data.corpus import corpus_problems, opening  # noqa: E402
from lyra.data.formats import Conversation, read_conversations  # noqa: E402
from lyra.data.txt import to_seed_record, write_jsonl_atomic  # noqa: E402

SOURCES = REPO / "scripts" / "corpus"
ASSETS = REPO / "lyra" / "data" / "assets"
EVAL_EVERY, EVAL_OFFSET = 7, 3


def load_topics() -> dict[str, list[Conversation]]:
    topics, problems = {}, []
    for path in sorted(SOURCES.glob("[0-9][0-9]_*.txt")):
        conversations, file_problems = read_conversations(path)
        problems += file_problems
        topic = path.stem.split("_", 1)[1]
        for index, conversation in enumerate(conversations, start=1):
            conversation.id = f"lyra-{topic}-{index:03d}"
        topics[topic] = conversations
    if problems:
        sys.exit("\n".join(map(str, problems)))
    return topics


def split_topics(topics: dict[str, list[Conversation]]) -> tuple[list[Conversation], list[Conversation]]:
    """Every 7th single-turn and every 7th multi-turn conversation of each topic goes to eval."""
    train, evaluation = [], []
    for conversations in topics.values():
        for multi_turn in (False, True):
            stratum = [c for c in conversations if (c.assistant_turns >= 2) == multi_turn]
            for index, conversation in enumerate(stratum):
                (evaluation if index % EVAL_EVERY == EVAL_OFFSET else train).append(conversation)
    order = {c.id: i for i, c in enumerate(c for cs in topics.values() for c in cs)}
    return sorted(train, key=lambda c: order[c.id]), sorted(evaluation, key=lambda c: order[c.id])


def load_probe_sources() -> list[str]:
    lines = (SOURCES / "probes.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def build() -> tuple[dict[str, list[dict]], list[str], str]:
    """(records per asset file name, corpus problems, human-readable report) from the sources."""
    topics = load_topics()
    train, evaluation = split_topics(topics)
    probes = load_probe_sources()
    records = {"lyra_train.jsonl": [to_seed_record(c) for c in train],
               "lyra_eval.jsonl": [to_seed_record(c) for c in evaluation],
               "lyra_probes.jsonl": [{"id": f"probe-{i:03d}", "prompt": p} for i, p in enumerate(probes)]}
    return records, corpus_problems(train, evaluation, probes), report(train, evaluation, topics, probes)


def stale_assets(records: dict[str, list[dict]]) -> list[str]:
    """Asset files whose content differs from what the sources build."""
    stale = []
    for name, expected in records.items():
        path = ASSETS / name
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        if [json.loads(line) for line in lines if line.strip()] != expected:
            stale.append(name)
    return stale


def report(train: list[Conversation], evaluation: list[Conversation], topics: dict, probes: list[str]) -> str:
    replies = [m["content"] for c in train + evaluation for m in c.messages if m["role"] == "assistant"]
    lines = [f"topics: {len(topics)} ({', '.join(f'{t} {len(c)}' for t, c in topics.items())})"]
    for name, split in (("train", train), ("eval", evaluation)):
        multi = sum(c.assistant_turns >= 2 for c in split)
        lines.append(f"{name}: {len(split)} conversations, {multi} multi-turn ({multi / len(split):.0%}), "
                     f"{sum(c.assistant_turns for c in split)} assistant turns")
    lines.append(f"probes: {len(probes)}; replies saying 主人 {sum('主人' in r for r in replies)}/{len(replies)}, "
                 f"萊拉 {sum('萊拉' in r for r in replies)}")
    lines.append("top openings: " + ", ".join(f"{o}×{n}" for o, n in Counter(map(opening, replies)).most_common(8)))
    return "\n".join(lines)


def review(conversations: list[Conversation]) -> None:
    import opencc

    converter = opencc.OpenCC("s2twp.json")
    for conversation in conversations:
        for message in conversation.messages:
            converted = converter.convert(message["content"])
            if converted != message["content"]:
                diff = [(a, b) for a, b in zip(message["content"], converted) if a != b]
                print(f"review {conversation.id}: {diff} in {message['content'][:40]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check sources and assets, write nothing")
    parser.add_argument("--review", action="store_true", help="print OpenCC s2twp rewrites for manual review")
    args = parser.parse_args()
    records, problems, summary = build()
    print(summary)
    if args.review:
        review([c for conversations in load_topics().values() for c in conversations])
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    if args.check:
        stale = stale_assets(records)
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/build_corpus.py", file=sys.stderr)
        return 1 if stale else 0
    for name, rows in records.items():
        write_jsonl_atomic(rows, ASSETS / name)
    print(f"wrote {', '.join(records)} in {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
