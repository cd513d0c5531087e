"""The embedded Lyra corpus meets its numbers: sizes, multi-turn share, no train/eval overlap, no
duplicate replies, Traditional Chinese as written in Taiwan (OpenCC), and the persona rules.

    python -m pytest tests/test_corpus.py -q
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest

from conftest import REPO_ROOT
from lyra.data import corpus_file
from lyra.data.corpus import (MIN_EVAL, MIN_PROBES, MIN_TRAIN, corpus_problems, load_probes, load_split,
                              opening, says_i, sentences)
from lyra.data.zh_tw import non_taiwan_variants, simplified_only_characters
from lyra.persona import unknown_checks
from lyra.probes import load_probes as load_probe_file


@pytest.fixture(scope="module")
def train():
    return load_split("train")


@pytest.fixture(scope="module")
def evaluation():
    return load_split("eval")


def texts(conversations, role: str) -> list[str]:
    return [m["content"] for c in conversations for m in c.messages if m["role"] == role]


def test_split_sizes_and_multi_turn_share(train, evaluation):
    assert len(train) >= MIN_TRAIN and len(evaluation) >= MIN_EVAL
    for split in (train, evaluation):
        assert sum(c.assistant_turns >= 2 for c in split) >= 0.4 * len(split)
    assert len({c.id for c in train + evaluation}) == len(train) + len(evaluation)


def test_eval_user_messages_never_appear_in_train(train, evaluation):
    assert not set(texts(evaluation, "user")) & set(texts(train, "user"))
    assert not set(load_probes()) & set(texts(train + evaluation, "user"))


def test_no_duplicate_replies_or_user_messages(train, evaluation):
    for role in ("assistant", "user"):
        duplicates = [t for t, n in Counter(texts(train + evaluation, role)).items() if n > 1]
        assert duplicates == [], role


def test_probes_keep_the_id_prompt_schema_and_say_what_they_check():
    rows = [json.loads(line) for line in corpus_file("probes").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= MIN_PROBES
    assert all(set(row) == {"id", "prompt", "checks"} and row["prompt"].strip() for row in rows)
    assert len({row["id"] for row in rows}) == len({row["prompt"] for row in rows}) == len(rows)
    assert all(unknown_checks(row["checks"]) is None and {"address", "language"} <= set(row["checks"]) for row in rows)
    named = [row["prompt"] for row in rows if "name" in row["checks"]]
    assert "你好，你是誰？" in named and "教我煮一碗好吃的味噌湯" not in named and len(named) < len(rows)
    assert [probe.checks for probe in load_probe_file(corpus_file("probes"))] == [tuple(r["checks"]) for r in rows]


def test_the_simplified_check_uses_opencc_and_spares_shared_characters():
    assert simplified_only_characters("今天发薪水，说说看") == ["发", "说"]
    assert simplified_only_characters("干杯、台北、床單、群組、只有") == []  # also valid Traditional
    assert non_taiwan_variants("裏面着急") == [("裏", "裡"), ("着", "著")]


def test_corpus_is_traditional_chinese_as_written_in_taiwan(train, evaluation):
    everything = "".join(texts(train + evaluation, "user") + texts(train + evaluation, "assistant") + load_probes())
    assert simplified_only_characters(everything) == []
    assert non_taiwan_variants(everything) == []


def test_persona_rules(train, evaluation):
    replies = texts(train + evaluation, "assistant")
    assert all(1 <= sentences(r) <= 4 for r in replies)
    assert not [r for r in replies if says_i(r)]
    assert sum("主人" in r for r in replies) >= 0.4 * len(replies)
    assert Counter(map(opening, replies)).most_common(1)[0][1] <= 0.05 * len(replies)
    assert not [r for r in replies if r.startswith("好的，主人")]
    assert sentences("主人好！今天想做什麼？萊拉陪您～") == 3 and says_i("我來幫忙") and not says_i("「我可以」我們")


def test_full_check_passes_and_assets_match_their_sources(train, evaluation):
    assert corpus_problems(train, evaluation, load_probes()) == []
    spec = importlib.util.spec_from_file_location("build_corpus", REPO_ROOT / "scripts" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    records, problems, _ = build_corpus.build()
    assert problems == [] and build_corpus.stale_assets(records) == []
