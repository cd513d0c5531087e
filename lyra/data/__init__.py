"""lyra's data layer: conversation files -> tokenized train/eval splits with assistant-only labels.

    python -m lyra.data --help        # convert / validate / stats (see lyra/data/__main__.py)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from lyra.data.formats import Conversation, load_conversations
from lyra.data.tokenization import EncodeStats, encode_conversations
from lyra.errors import UserError
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

__all__ = ["Conversation", "load_conversations", "build_datasets", "corpus_file", "DatasetSplits"]


def corpus_file(split: str) -> Path:
    """The embedded Lyra corpus: split is 'train', 'eval' or 'probes'."""
    return Path(str(resources.files("lyra.data") / "assets" / f"lyra_{split}.jsonl"))


@dataclass
class DatasetSplits:
    train: object  # datasets.Dataset
    eval: object | None
    train_stats: EncodeStats
    eval_stats: EncodeStats | None


def _split_file(data_cfg: DictConfig, split: str) -> Path | None:
    configured = data_cfg.get(f"{split}_file")
    if configured:
        return resolve_user_path(configured)
    if data_cfg.get("train_file"):  # user data without an eval file: no eval split
        return None
    return corpus_file(split)


def build_datasets(data_cfg: DictConfig, tokenizer) -> DatasetSplits:
    """Tokenized train (and eval) datasets; empty splits are user errors, truncation is logged."""
    from datasets import Dataset

    splits = {}
    for split in ("train", "eval"):
        path = _split_file(data_cfg, split)
        if path is None:
            splits[split] = (None, None)
            continue
        conversations = load_conversations(path, key=f"data.{split}_file")
        examples, stats = encode_conversations(conversations, tokenizer, data_cfg.max_length, data_cfg.system_prompt)
        if stats.dropped_turns:
            log.warning("%s: %d assistant turns in %d conversations exceed data.max_length=%d and were dropped",
                        path.name, stats.dropped_turns, stats.truncated_conversations, data_cfg.max_length)
        if not examples:
            raise UserError("data.max_length", f"no example of {path} fits in {data_cfg.max_length} tokens; raise it")
        log.info("%s split: %d conversations -> %d examples (%s)", split, stats.conversations, len(examples), path)
        splits[split] = (Dataset.from_list(examples), stats)
    return DatasetSplits(train=splits["train"][0], eval=splits["eval"][0],
                         train_stats=splits["train"][1], eval_stats=splits["eval"][1])
