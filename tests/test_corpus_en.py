"""The English Lyra corpus (persona=lyra_en) meets its numbers: sizes, multi-turn share, the 22 topics
of the Chinese corpus in both splits, varied openings, no duplicates, English replies in which she
says "Master" and calls herself Lyra, and shipped assets that match their sources.

    python -m pytest tests/test_corpus_en.py -q
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from conftest import REPO_ROOT
from lyra.data import corpus_file
from lyra.data.formats import load_conversations
from lyra.persona import unknown_checks


@pytest.fixture(scope="module")
def build_corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO_ROOT / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def asset(split: str):
    return corpus_file(split).with_name(f"lyra_en_{split}.jsonl")


@pytest.fixture(scope="module")
def train():
    return load_conversations(asset("train"), key="lyra_en train")


@pytest.fixture(scope="module")
def evaluation():
    return load_conversations(asset("eval"), key="lyra_en eval")


@pytest.fixture(scope="module")
def probes():
    return [json.loads(line) for line in asset("probes").read_text(encoding="utf-8").splitlines() if line.strip()]


def texts(conversations, role: str) -> list[str]:
    return [m["content"] for c in conversations for m in c.messages if m["role"] == role]


def topic(conversation_id: str) -> str:
    return conversation_id.rsplit("-", 1)[0].split("-", 1)[1]  # lyra-en-<topic>-NNN / lyra-<topic>-NNN


def test_split_sizes_and_multi_turn_share(train, evaluation):
    assert len(train) >= 200 and len(evaluation) >= 40
    for split in (train, evaluation):
        assert sum(c.assistant_turns >= 2 for c in split) >= 0.4 * len(split)
    assert len({c.id for c in train + evaluation}) == len(train) + len(evaluation)


def test_every_topic_of_the_chinese_corpus_is_in_both_splits(train, evaluation):
    chinese = {topic(c.id) for split in ("train", "eval") for c in load_conversations(corpus_file(split))}
    assert len(chinese) == 22
    assert {topic(c.id).removeprefix("en-") for c in train} == chinese
    assert {topic(c.id).removeprefix("en-") for c in evaluation} == chinese


def test_no_duplicate_replies_or_near_duplicate_user_messages(build_corpus, train, evaluation, probes):
    replies = texts(train + evaluation, "assistant")
    assert [t for t, n in Counter(replies).items() if n > 1] == []
    users = [build_corpus.normalized(t) for t in texts(train + evaluation, "user")]
    assert [t for t, n in Counter(users).items() if n > 1] == []
    eval_users = {build_corpus.normalized(t) for t in texts(evaluation, "user")}
    assert not eval_users & {build_corpus.normalized(t) for t in texts(train, "user")}
    assert not {build_corpus.normalized(p["prompt"]) for p in probes} & set(users)


def test_probes_keep_the_id_prompt_schema_and_say_what_they_check(probes):
    assert len(probes) >= 30
    assert all(set(row) == {"id", "prompt", "checks"} and row["prompt"].strip() for row in probes)
    assert len({row["id"] for row in probes}) == len({row["prompt"] for row in probes}) == len(probes)
    assert all(unknown_checks(row["checks"]) is None and {"address", "language"} <= set(row["checks"])
               for row in probes)
    named = [row["prompt"] for row in probes if "name" in row["checks"]]
    assert "Please introduce yourself." in named and "How do I make pancakes from scratch?" not in named


def test_persona_rules(build_corpus, train, evaluation):
    replies = texts(train + evaluation, "assistant")
    assert all(1 <= build_corpus.en_sentences(r) <= 4 for r in replies)
    assert not [r for r in replies if build_corpus.en_says_i(r)]  # she says Lyra, never I/me/my
    assert sum("Master" in r for r in replies) >= 0.6 * len(replies)
    assert sum("Lyra" in r for r in replies) >= 0.3 * len(replies)
    assert Counter(map(build_corpus.en_opening, replies)).most_common(1)[0][1] <= 0.05 * len(replies)
    assert not [r for r in replies if r.lower().startswith("of course, master")]


def test_the_english_checks_count_what_they_claim(build_corpus):
    assert build_corpus.en_sentences("Lyra thinks so. Wake at 7 a.m. and eat, e.g. oats! Really? Yes") == 4
    assert build_corpus.en_sentences('Say "Could you help?" to him. It was 3.5 km.') == 3
    assert build_corpus.en_opening("Good idea, Master!") == "good idea"
    assert build_corpus.en_says_i("Let me help") and build_corpus.en_says_i("My advice: rest")
    assert build_corpus.en_says_i("I'll do it") and not build_corpus.en_says_i("Mimi is in the meadow")
    assert not build_corpus.en_says_i('Try saying "I need a break" to Lyra; Master is in good hands')
    assert build_corpus.non_latin_letters("café, Master 主人") == ["主", "人"]
    assert build_corpus.normalized("Hello,  Lyra!") == build_corpus.normalized("hello lyra")


def test_replies_are_english_and_so_are_almost_all_user_messages(build_corpus, train, evaluation, probes):
    assert not [r for r in texts(train + evaluation, "assistant") if build_corpus.non_latin_letters(r)]
    users = texts(train + evaluation, "user") + [p["prompt"] for p in probes]
    assert sum(bool(build_corpus.non_latin_letters(u)) for u in users) <= 0.05 * len(users)


def test_full_check_passes_and_assets_match_their_sources(build_corpus):
    records, problems, _ = build_corpus.build("lyra_en")
    assert problems == [] and build_corpus.stale_assets(records) == []
    assert set(records) == {"lyra_en_train.jsonl", "lyra_en_eval.jsonl", "lyra_en_probes.jsonl"}
