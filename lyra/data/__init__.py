"""lyra's data layer: conversation files -> tokenized train/eval splits with assistant-only labels.

    python -m lyra.data --help        # convert / validate / stats (see lyra/data/__main__.py)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from lyra.data.formats import Conversation, Problem, load_checked, load_conversations, read_conversations
from lyra.data.tokenization import EncodeStats, encode_conversations
from lyra.data.txt import convert_txt_to_jsonl
from lyra.errors import UserError
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

__all__ = ["Conversation", "Problem", "load_conversations", "read_conversations", "convert_txt_to_jsonl",
           "build_datasets", "corpus_file", "DatasetSplits"]


def corpus_file(split: str) -> Path:
    """The embedded default-persona (zh-TW) corpus: split is 'train', 'eval' or 'probes'."""
    return Path(str(resources.files("lyra.data") / "assets" / f"lyra_{split}.jsonl"))


@dataclass
class DatasetSplits:
    train: object  # datasets.Dataset
    eval: object | None
    train_stats: EncodeStats
    eval_stats: EncodeStats | None
    skipped: int = 0  # invalid conversations skipped under data.on_invalid=skip (both splits)


def _split_file(data_cfg: DictConfig, split: str) -> Path | None:
    configured = data_cfg.get(f"{split}_file")
    if configured:
        return resolve_user_path(configured)
    if data_cfg.get("train_file"):  # user data without an eval file: no eval split
        return None
    return corpus_file(split)


def build_datasets(data_cfg: DictConfig, tokenizer) -> DatasetSplits:
    """Tokenized train (and eval) datasets.

    Invalid conversations stop the run or are skipped per data.on_invalid; empty splits are user
    errors; truncation is logged and counted.
    """
    from datasets import Dataset

    splits, skipped = {}, 0
    for split in ("train", "eval"):
        path = _split_file(data_cfg, split)
        if path is None:
            splits[split] = (None, None)
            continue
        conversations, problems = load_checked(path, key=f"data.{split}_file",
                                               on_invalid=data_cfg.on_invalid)
        skipped += len(problems)
        examples, stats = encode_conversations(conversations, tokenizer, data_cfg.max_length, data_cfg.system_prompt)
        if stats.dropped_turns:
            log.warning("%s: %d assistant turns in %d conversations exceed data.max_length=%d and were dropped",
                        path.name, stats.dropped_turns, stats.truncated_conversations, data_cfg.max_length)
        if not examples:
            raise UserError("data.max_length", f"no example of {path} fits in {data_cfg.max_length} tokens; raise it")
        log.info("%s split: %d conversations -> %d examples (%s)", split, stats.conversations, len(examples), path)
        splits[split] = (Dataset.from_list(examples), stats)
    return DatasetSplits(train=splits["train"][0], eval=splits["eval"][0],
                         train_stats=splits["train"][1], eval_stats=splits["eval"][1], skipped=skipped)
