"""Build the embedded Lyra corpus from the hand-written transcripts in scripts/corpus/.

    python scripts/build_corpus.py           # check, then write lyra/data/assets/lyra_{train,eval,probes}.jsonl
    python scripts/build_corpus.py --check   # check only; exit 1 with every problem
    python scripts/build_corpus.py --review  # also print phrases OpenCC s2twp would rewrite (manual review)

Each `NN_<topic>.txt` holds whole conversations in the `lyra.data` txt format (您： / 萊拉：), one
topic per file. Every 7th single-turn and every 7th multi-turn conversation of a file (index 3, 10,
17, ... of each) goes to the eval split, so both splits cover every topic and mix. Probes (`probes.txt`, one prompt per line) are single user turns
that appear in neither split. The checks below are the corpus requirements of issue 3; the same
properties are asserted again by tests/test_corpus.py on the shipped files.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lyra.data.formats import Conversation, read_conversations  # noqa: E402
from lyra.data.txt import to_seed_record, write_jsonl_atomic  # noqa: E402
from lyra.data.zh_tw import non_taiwan_variants, simplified_only_characters  # noqa: E402

SOURCES = REPO / "scripts" / "corpus"
ASSETS = REPO / "lyra" / "data" / "assets"
EVAL_EVERY, EVAL_OFFSET = 7, 3
_SENTENCE_END = re.compile(r"[。！？!?]+[」』）)]*")


def sentences(text: str) -> int:
    """Sentences in a reply: runs of text ended by 。！？ (a trailing fragment counts as one)."""
    return sum(1 for part in _SENTENCE_END.split(text) if re.search(r"\w", part))


def opening(text: str) -> str:
    """The first clause of a reply, used to detect template openings."""
    return re.split(r"[，。！？～、,!?]", text, maxsplit=1)[0]


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


def load_probes() -> list[str]:
    lines = (SOURCES / "probes.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def check(train: list[Conversation], evaluation: list[Conversation], probes: list[str]) -> list[str]:
    problems = []
    everything = train + evaluation
    replies = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "assistant"]
    users = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "user"]
    for name, split, minimum in (("train", train, 400), ("eval", evaluation, 60)):
        multi = sum(c.assistant_turns >= 2 for c in split)
        if len(split) < minimum:
            problems.append(f"{name}: {len(split)} conversations, need >= {minimum}")
        if multi < 0.4 * len(split):
            problems.append(f"{name}: {multi}/{len(split)} multi-turn, need >= 40%")
    for kind, items in (("assistant reply", replies), ("user message", users)):
        seen: dict[str, str] = {}
        for conversation_id, text in items:
            if text in seen:
                problems.append(f"{conversation_id}: duplicate {kind} (also in {seen[text]}): {text[:30]}")
            seen.setdefault(text, conversation_id)
    train_users = {m["content"] for c in train for m in c.messages if m["role"] == "user"}
    for probe in probes:
        if probe in train_users or any(probe == text for _, text in users):
            problems.append(f"probe also appears as a user message: {probe}")
    if len(set(probes)) != len(probes) or len(probes) < 40:
        problems.append(f"probes: {len(probes)} ({len(set(probes))} distinct), need >= 40 distinct")
    for conversation_id, text in [*replies, *users, *(("probe", p) for p in probes)]:
        if bad := simplified_only_characters(text):
            problems.append(f"{conversation_id}: Simplified-only characters {bad}: {text[:30]}")
        if variants := non_taiwan_variants(text):
            problems.append(f"{conversation_id}: non-Taiwan variants {variants}: {text[:30]}")
    for conversation_id, text in replies:
        if not 1 <= sentences(text) <= 4:
            problems.append(f"{conversation_id}: reply has {sentences(text)} sentences (1-4): {text[:30]}")
        if re.search(r"(?<!自)我(?!們)", re.sub(r"「[^」]*」", "", text)):
            problems.append(f"{conversation_id}: Lyra says 我 outside a quotation (she calls herself 萊拉): {text[:30]}")
        if text.startswith("好的，主人"):
            problems.append(f"{conversation_id}: template opening 好的，主人: {text[:30]}")
    openings = Counter(opening(text) for _, text in replies)
    most, count = openings.most_common(1)[0]
    if count > 0.05 * len(replies):
        problems.append(f"opening {most!r} starts {count}/{len(replies)} replies (> 5%)")
    return problems


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
    parser.add_argument("--check", action="store_true", help="check only, write nothing")
    parser.add_argument("--review", action="store_true", help="print OpenCC s2twp rewrites for manual review")
    args = parser.parse_args()
    topics = load_topics()
    train, evaluation = split_topics(topics)
    probes = load_probes()
    print(report(train, evaluation, topics, probes))
    if args.review:
        review(train + evaluation)
    problems = check(train, evaluation, probes)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    if not args.check:
        for name, split in (("train", train), ("eval", evaluation)):
            write_jsonl_atomic(map(to_seed_record, split), ASSETS / f"lyra_{name}.jsonl")
        write_jsonl_atomic(({"id": f"probe-{i:03d}", "prompt": p} for i, p in enumerate(probes)),
                           ASSETS / "lyra_probes.jsonl")
        print(f"wrote {ASSETS}/lyra_{{train,eval,probes}}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
