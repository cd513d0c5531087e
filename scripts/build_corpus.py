"""Build an embedded persona corpus from its hand-written transcripts.

    python scripts/build_corpus.py           # check, then write lyra/data/assets/lyra_{train,eval,probes}.jsonl
    python scripts/build_corpus.py --check   # check only; exit 1 on any problem or out-of-date asset
    python scripts/build_corpus.py --review  # also print phrases OpenCC s2twp would rewrite (manual review)
    python scripts/build_corpus.py --persona lyra_en [--check]   # the English Lyra (persona=lyra_en)

Two corpora (CORPORA): `lyra`, Traditional Chinese, from scripts/corpus/ into lyra_*.jsonl, checked
by `lyra.data.corpus.corpus_problems`; and `lyra_en`, English, from scripts/corpus_en/ into
lyra_en_*.jsonl, checked by `english_problems` below. Each `NN_<topic>.txt` holds whole
conversations in the `lyra.data` txt format (您： / 萊拉：, or User: / Lyra:), one topic per file.
Every 7th single-turn and every 7th multi-turn conversation of a file (index 3, 10, 17, ... of each)
goes to the eval split, so both splits cover every topic and mix. Probes (`probes.txt`, one prompt
per line) are single user turns that appear in neither split; a `#checks: name, address, language`
line tags the probes after it with the persona checks they test (lyra.persona.CHECKS; `#checks:`
alone = untagged), written as the probe's "checks". The checks are the corpus
requirements; tests/test_corpus.py and tests/test_corpus_en.py run them again on the shipped files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lyra.data.corpus import corpus_problems, opening, shape_problems  # noqa: E402
from lyra.data.formats import read_conversations  # noqa: E402
from lyra.data.records import Conversation  # noqa: E402
from lyra.data.txt import to_seed_record, write_jsonl_atomic  # noqa: E402

ASSETS = REPO / "lyra" / "data" / "assets"
EVAL_EVERY, EVAL_OFFSET = 7, 3

# The English corpus's requirements (issue 13). Smaller than the Chinese corpus's, same shape.
EN_MIN_TRAIN, EN_MIN_EVAL, EN_MIN_PROBES = 200, 40, 30  # multi-turn >= 40%, openings <= 5%: lyra.data.corpus
EN_MIN_ADDRESS_SHARE, EN_MIN_SELF_NAME_SHARE = 0.6, 0.3  # replies saying "Master" / "Lyra"
_EN_ABBREVIATIONS = re.compile(r"\b(?:e\.g|i\.e|a\.m|p\.m|etc|vs|Dr|Mr|Mrs|Ms|St)\.", re.IGNORECASE)
_EN_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_EN_OPENING_END = re.compile(r"[,.!?;:\u2014\u2013~]")
# She calls herself Lyra, never I/me/my (outside a "quotation" she suggests the user say).
_EN_FIRST_PERSON = re.compile(r"\bI(?:'m|'ll|'ve|'d)?\b|\b(?i:me|my|mine|myself)\b")
_NON_LATIN_LETTER = re.compile(r"[^\W\d_\u0000-\u024f\u1e00-\u1eff]")  # a letter outside Latin script


def en_sentences(text: str) -> int:
    """Sentences in an English reply: runs ended by . ! ? before a space or the end (abbreviations ignored)."""
    return sum(1 for part in _EN_SENTENCE_END.split(_EN_ABBREVIATIONS.sub("", text)) if re.search(r"\w", part))


def en_opening(text: str) -> str:
    """The first clause of an English reply, case-folded, used to detect template openings."""
    return _EN_OPENING_END.split(text, maxsplit=1)[0].strip().casefold()


def en_says_i(text: str) -> bool:
    """Lyra speaks of herself as I/me/my outside a "quotation"."""
    return bool(_EN_FIRST_PERSON.search(re.sub(r'"[^"]*"', "", text)))


def non_latin_letters(text: str) -> list[str]:
    """Letters of a reply outside the Latin script (CJK, kana, Cyrillic, ...): an English reply has none."""
    return sorted(set(_NON_LATIN_LETTER.findall(text)))


def normalized(text: str) -> str:
    """A user message reduced to lower-case words, so near-duplicates (case, punctuation) collide."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def english_problems(train: list[Conversation], evaluation: list[Conversation], probes: list[str]) -> list[str]:
    """Every violated requirement of the English corpus, one line each; [] when all hold."""
    problems = shape_problems(train, evaluation, probes, min_train=EN_MIN_TRAIN, min_eval=EN_MIN_EVAL,
                              min_probes=EN_MIN_PROBES, opening_of=en_opening, user_key=normalized)
    replies = [(c.id, m["content"]) for c in train + evaluation for m in c.messages if m["role"] == "assistant"]
    for conversation_id, text in replies:
        if not 1 <= en_sentences(text) <= 4:
            problems.append(f"{conversation_id}: reply has {en_sentences(text)} sentences (1-4): {text[:40]}")
        if en_says_i(text):
            problems.append(f"{conversation_id}: Lyra says I/me/my outside a quotation (she says Lyra): {text[:40]}")
        if bad := non_latin_letters(text):
            problems.append(f"{conversation_id}: non-English letters {bad}: {text[:40]}")
        if re.match(r"of course\W+master\b", text, re.IGNORECASE):
            problems.append(f"{conversation_id}: template opening 'Of course, Master': {text[:40]}")
    for word, minimum in (("Master", EN_MIN_ADDRESS_SHARE), ("Lyra", EN_MIN_SELF_NAME_SHARE)):
        share = sum(word in text for _, text in replies) / len(replies)
        if share < minimum:
            problems.append(f"replies saying {word}: {share:.0%}, need >= {minimum:.0%}")
    return problems


class Corpus(NamedTuple):
    """One persona's corpus: where its sources are, what its files and ids are called, how it is checked."""

    sources: Path
    prefix: str  # asset files are <prefix>_{train,eval,probes}.jsonl
    id_prefix: str  # conversation ids are <id_prefix>-<topic>-NNN
    user_address: str  # counted in the report
    self_name: str
    opening: Callable[[str], str]
    problems: Callable[[list[Conversation], list[Conversation], list[str]], list[str]]


CORPORA = {
    "lyra": Corpus(REPO / "scripts" / "corpus", "lyra", "lyra", "主人", "萊拉", opening, corpus_problems),
    "lyra_en": Corpus(REPO / "scripts" / "corpus_en", "lyra_en", "lyra-en", "Master", "Lyra", en_opening,
                      english_problems),
}


def load_topics(corpus: Corpus = CORPORA["lyra"]) -> dict[str, list[Conversation]]:
    topics, problems = {}, []
    for path in sorted(corpus.sources.glob("[0-9][0-9]_*.txt")):
        conversations, file_problems = read_conversations(path)
        problems += file_problems
        topic = path.stem.split("_", 1)[1]
        for index, conversation in enumerate(conversations, start=1):
            conversation.id = f"{corpus.id_prefix}-{topic}-{index:03d}"
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


def load_probe_sources(corpus: Corpus = CORPORA["lyra"]) -> list[tuple[str, list[str] | None]]:
    """(prompt, checks) per probe line; `#checks: a, b` tags the lines after it (lyra.persona.CHECKS)."""
    from lyra.persona import unknown_checks

    path = corpus.sources / "probes.txt"
    probes, checks = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line.startswith("#checks:"):
            checks = [name.strip() for name in line.removeprefix("#checks:").split(",") if name.strip()] or None
            if checks is not None and (problem := unknown_checks(checks)):
                sys.exit(f"{path}:{number}: {problem}")
        elif line and not line.startswith("#"):
            probes.append((line, checks))
    return probes


def probe_record(index: int, prompt: str, checks: list[str] | None) -> dict:
    return {"id": f"probe-{index:03d}", "prompt": prompt, **({"checks": checks} if checks is not None else {})}


def build(persona: str = "lyra") -> tuple[dict[str, list[dict]], list[str], str]:
    """(records per asset file name, corpus problems, human-readable report) from the sources."""
    corpus = CORPORA[persona]
    topics = load_topics(corpus)
    train, evaluation = split_topics(topics)
    tagged = load_probe_sources(corpus)
    probes = [prompt for prompt, _ in tagged]
    records = {f"{corpus.prefix}_train.jsonl": [to_seed_record(c) for c in train],
               f"{corpus.prefix}_eval.jsonl": [to_seed_record(c) for c in evaluation],
               f"{corpus.prefix}_probes.jsonl": [probe_record(i, *probe) for i, probe in enumerate(tagged)]}
    return records, corpus.problems(train, evaluation, probes), report(train, evaluation, topics, probes, corpus)


def stale_assets(records: dict[str, list[dict]]) -> list[str]:
    """Asset files whose content differs from what the sources build."""
    stale = []
    for name, expected in records.items():
        path = ASSETS / name
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        if [json.loads(line) for line in lines if line.strip()] != expected:
            stale.append(name)
    return stale


def report(train: list[Conversation], evaluation: list[Conversation], topics: dict, probes: list[str],
           corpus: Corpus = CORPORA["lyra"]) -> str:
    replies = [m["content"] for c in train + evaluation for m in c.messages if m["role"] == "assistant"]
    lines = [f"topics: {len(topics)} ({', '.join(f'{t} {len(c)}' for t, c in topics.items())})"]
    for name, split in (("train", train), ("eval", evaluation)):
        multi = sum(c.assistant_turns >= 2 for c in split)
        lines.append(f"{name}: {len(split)} conversations, {multi} multi-turn ({multi / len(split):.0%}), "
                     f"{sum(c.assistant_turns for c in split)} assistant turns")
    address, name = corpus.user_address, corpus.self_name
    lines.append(f"probes: {len(probes)}; replies saying {address} {sum(address in r for r in replies)}/"
                 f"{len(replies)}, {name} {sum(name in r for r in replies)}")
    lines.append("top openings: " + ", ".join(f"{o}×{n}" for o, n in
                                              Counter(map(corpus.opening, replies)).most_common(8)))
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
    parser.add_argument("--persona", choices=sorted(CORPORA), default="lyra", help="which corpus to build")
    args = parser.parse_args()
    if args.review and args.persona != "lyra":
        parser.error("--review (OpenCC s2twp) applies to the Chinese corpus only")
    records, problems, summary = build(args.persona)
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
            print(f"out of date: {', '.join(stale)}; run python scripts/build_corpus.py --persona {args.persona}",
                  file=sys.stderr)
        return 1 if stale else 0
    for name, rows in records.items():
        write_jsonl_atomic(rows, ASSETS / name)
    print(f"wrote {', '.join(records)} in {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
