"""lyra's data layer: conversation files -> tokenized train/eval splits with assistant-only labels.

    python -m lyra.data --help        # convert / validate / stats (see lyra/data/__main__.py)

Training, `validate` and `stats` all go through `lyra.data.prepare.prepare_file`: one reader and one
encoder decide what is trainable, so a file `validate` passes trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lyra.data.formats import check_problems, load_checked, load_conversations, read_conversations
from lyra.data.records import Conversation, Problem
from lyra.data.prepare import DUPLICATE_WARNING_SHARE, prepare_file
from lyra.data.tokenization import EncodeStats, encode_conversations
from lyra.data.txt import convert_txt_to_jsonl, label_table
from lyra.errors import UserError
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

__all__ = ["Conversation", "Problem", "load_conversations", "read_conversations", "convert_txt_to_jsonl",
           "build_datasets", "corpus_file", "DatasetSplits", "load_checked", "encode_conversations"]


def corpus_file(split: str) -> Path:
    """The embedded default-persona (zh-TW) corpus: split is 'train', 'eval' or 'probes'."""
    return Path(str(resources.files("lyra.data") / "assets" / f"lyra_{split}.jsonl"))


@dataclass
class DatasetSplits:
    train: object  # datasets.Dataset
    eval: object | None
    train_stats: EncodeStats
    eval_stats: EncodeStats | None
    skipped: int = 0  # conversations lost to problems under data.on_invalid=skip (both splits)
    system_prompt_inserted: int = 0  # conversations that had no system message (both splits)


def _split_file(data_cfg: DictConfig, split: str) -> Path | None:
    configured = data_cfg.get(f"{split}_file")
    if configured:
        return resolve_user_path(configured)
    if data_cfg.get("train_file"):  # user data without an eval file: no eval split
        return None
    return corpus_file(split)


def data_labels(data_cfg: DictConfig) -> dict[str, str]:
    """data.labels (extra .txt role labels, label -> role), checked like `--label`."""
    labels = data_cfg.get("labels") or {}
    labels = OmegaConf.to_container(labels, resolve=True) if OmegaConf.is_config(labels) else dict(labels)
    if not isinstance(labels, dict):
        raise UserError("data.labels", f"must map labels to roles, e.g. {{Guest: user}}, got {labels!r}")
    try:
        label_table({str(k): str(v) for k, v in labels.items()})
    except UserError as error:
        raise UserError("data.labels", error.message) from None
    return {str(k): str(v) for k, v in labels.items()}


def build_datasets(data_cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None) -> DatasetSplits:
    """Tokenized train (and eval) datasets.

    Problems stop the run or are skipped per data.on_invalid; empty splits are user errors;
    truncation, inserted system prompts, ignored fields and duplicate replies are logged and counted.
    `cache_dir` (paths.cache_dir) keeps the tokenized data for the next run on the same file.
    """
    labels = data_labels(data_cfg)
    splits, skipped, inserted = {}, 0, 0
    for split in ("train", "eval"):
        path = _split_file(data_cfg, split)
        if path is None:
            splits[split] = (None, None)
            continue
        key = f"data.{split}_file"
        if not path.is_file():
            raise UserError(key, f"file not found: {path}")
        prepared = prepare_file(path, tokenizer, data_cfg.system_prompt, labels, cache_dir)
        check_problems(prepared.problems, prepared.conversations, path, key, data_cfg.on_invalid)
        skipped += prepared.skipped
        inserted += prepared.system_prompt_inserted
        for note in prepared.notes():
            log.info("%s", note)
        duplicates, replies = prepared.duplicate_reply_share()
        if replies and duplicates / replies > DUPLICATE_WARNING_SHARE:
            log.warning("%s: %d of %d assistant replies (%.0f%%) repeat another reply; the model will learn them "
                        "by heart (list them: python -m lyra.data stats %s)", path.name, duplicates, replies,
                        100 * duplicates / replies, path)
        dataset, stats = prepared.dataset(data_cfg.max_length)
        if stats.dropped_turns:
            log.warning("%s: %d assistant turns in %d conversations exceed data.max_length=%d and were dropped",
                        path.name, stats.dropped_turns, stats.truncated_conversations, data_cfg.max_length)
        if not len(dataset):
            raise UserError("data.max_length", f"no example of {path} fits in {data_cfg.max_length} tokens; raise it")
        log.info("%s split: %d conversations -> %d examples (%s%s)", split, stats.conversations, len(dataset), path,
                 ", tokenized earlier: cached" if prepared.from_cache else "")
        splits[split] = (dataset, stats)
    return DatasetSplits(train=splits["train"][0], eval=splits["eval"][0], train_stats=splits["train"][1],
                         eval_stats=splits["eval"][1], skipped=skipped, system_prompt_inserted=inserted)
