"""The embedded corpus: loading its splits and checking the properties the product relies on.

    from lyra.data.corpus import load_split, load_probes, corpus_problems
    corpus_problems(load_split("train"), load_split("eval"), load_probes())   # [] when all hold

Used by scripts/build_corpus.py before it writes lyra/data/assets/ and by tests/test_corpus.py on
the shipped files: split sizes, >=40% multi-turn, no duplicate replies or user messages, eval and
probe prompts unseen in train, Traditional Chinese as written in Taiwan (OpenCC), replies of 1-4
sentences, Lyra speaking of herself as 萊拉, and no template opening.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from lyra.data import corpus_file
from lyra.data.formats import load_conversations
from lyra.data.records import Conversation
from lyra.data.zh_tw import non_taiwan_variants, simplified_only_characters

MIN_TRAIN, MIN_EVAL, MIN_PROBES, MIN_MULTI_TURN_SHARE = 400, 60, 40, 0.4
MAX_OPENING_SHARE = 0.05  # no first clause may start more than 5% of replies
_SENTENCE_END = re.compile(r"[。！？!?]+[」』）)]*")


def sentences(text: str) -> int:
    """Sentences in a reply: runs of text ended by 。！？ (a trailing fragment counts as one)."""
    return sum(1 for part in _SENTENCE_END.split(text) if re.search(r"\w", part))


def opening(text: str) -> str:
    """The first clause of a reply, used to detect template openings."""
    return re.split(r"[，。！？～、,!?]", text, maxsplit=1)[0]


def says_i(text: str) -> bool:
    """Lyra refers to herself with 我 outside a 「quotation」 (我們 and 自我 are fine)."""
    return bool(re.search(r"(?<!自)我(?!們)", re.sub(r"「[^」]*」", "", text)))


def load_split(split: str) -> list[Conversation]:
    """The embedded train or eval split."""
    return load_conversations(corpus_file(split), key=f"corpus {split}")


def load_probes() -> list[str]:
    """The embedded persona probes (`{"id", "prompt", "checks"}` per line), prompts only."""
    lines = corpus_file("probes").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def shape_problems(train: list[Conversation], evaluation: list[Conversation], probes: list[str], *,
                   min_train: int, min_eval: int, min_probes: int, opening_of, user_key=str) -> list[str]:
    """The requirements every persona corpus shares, one line each; [] when all hold.

    Split sizes, the multi-turn share, no duplicate reply or user message (user messages compared
    by `user_key`, across both splits, so no eval prompt is seen in training), distinct probes that
    are no user message, and no opening clause (`opening_of`) in more than 5% of replies.
    """
    problems = []
    everything = train + evaluation
    replies = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "assistant"]
    users = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "user"]
    for name, split, minimum in (("train", train, min_train), ("eval", evaluation, min_eval)):
        multi = sum(c.assistant_turns >= 2 for c in split)
        if len(split) < minimum:
            problems.append(f"{name}: {len(split)} conversations, need >= {minimum}")
        if multi < MIN_MULTI_TURN_SHARE * len(split):
            problems.append(f"{name}: {multi}/{len(split)} multi-turn, need >= 40%")
    for kind, items, key in (("assistant reply", replies, str), ("user message", users, user_key)):
        seen: dict[str, str] = {}
        for conversation_id, text in items:
            if key(text) in seen:
                problems.append(f"{conversation_id}: duplicate {kind} (also in {seen[key(text)]}): {text[:40]}")
            seen.setdefault(key(text), conversation_id)
    user_texts = {user_key(text) for _, text in users}
    for probe in probes:
        if user_key(probe) in user_texts:
            problems.append(f"probe also appears as a user message: {probe}")
    if len({user_key(p) for p in probes}) != len(probes) or len(probes) < min_probes:
        problems.append(f"probes: {len(probes)} ({len(set(probes))} distinct), need >= {min_probes} distinct")
    openings = Counter(opening_of(text) for _, text in replies)
    most, count = openings.most_common(1)[0]
    if count > MAX_OPENING_SHARE * len(replies):
        problems.append(f"opening {most!r} starts {count}/{len(replies)} replies (> 5%)")
    return problems


def corpus_problems(train: list[Conversation], evaluation: list[Conversation], probes: list[str]) -> list[str]:
    """Every violated requirement of the zh-TW corpus, one line each naming the conversation id; [] when all hold."""
    problems = shape_problems(train, evaluation, probes, min_train=MIN_TRAIN, min_eval=MIN_EVAL,
                              min_probes=MIN_PROBES, opening_of=opening)
    everything = train + evaluation
    replies = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "assistant"]
    users = [(c.id, m["content"]) for c in everything for m in c.messages if m["role"] == "user"]
    for conversation_id, text in [*replies, *users, *(("probe", p) for p in probes)]:
        if bad := simplified_only_characters(text):
            problems.append(f"{conversation_id}: Simplified-only characters {bad}: {text[:30]}")
        if variants := non_taiwan_variants(text):
            problems.append(f"{conversation_id}: non-Taiwan variants {variants}: {text[:30]}")
    for conversation_id, text in replies:
        if not 1 <= sentences(text) <= 4:
            problems.append(f"{conversation_id}: reply has {sentences(text)} sentences (1-4): {text[:30]}")
        if says_i(text):
            problems.append(f"{conversation_id}: Lyra says 我 outside a quotation (she calls herself 萊拉): {text[:30]}")
        if text.startswith("好的，主人"):
            problems.append(f"{conversation_id}: template opening 好的，主人: {text[:30]}")
    return problems
