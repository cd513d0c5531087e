"""Preference objectives on TRL: objective=dpo (DPOTrainer) and objective=orpo (experimental ORPOTrainer).

    python -m lyra.train objective=dpo objective.init_adapter=outputs/SFT_RUN objective.train_file=pairs.jsonl
    python -m lyra.train objective=orpo objective.train_file=pairs.jsonl
    python -m lyra.train -m objective=dpo objective.beta=0.05,0.1,0.3 ...      # a sweep, as any other key

`lyra.train` calls three things from here, in its usual order (validation lives in lyra.config):

    splits = build_preference_datasets(cfg.objective, cfg.data, tokenizer)    # pairs, tokenized by lyra
    args = preference_args(cfg.objective, training_kwargs, max_length)        # DPOConfig / ORPOConfig
    trainer = build_preference_trainer(cfg.objective, model, args, tokenizer, splits, callbacks)

The losses are TRL's own. lyra only hands them its data and model: pairs tokenized by
`lyra.data.preference` (the chat prompt the model sees in chat, each reply to its end-of-turn
token), and the PEFT model lyra built (4-bit base, LoRA). With a PEFT model and no ref_model,
DPOTrainer adds a frozen copy of the init adapter as a second adapter named "ref" and computes the
reference log-probs through it: the reference costs one LoRA adapter of memory, not a second base.
ORPO needs no reference model. The subclasses below only feed lyra's token ids past TRL's own
tokenization and keep the run offline (no telemetry ping).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from trl import DPOConfig, DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from lyra.config import OBJECTIVE_LYRA_KEYS
from lyra.data import DatasetSplits
from lyra.data.formats import check_problems
from lyra.data.preference import prepare_pairs
from lyra.data.tokenization import IGNORE_INDEX
from lyra.errors import UserError
from lyra.paths import resolve_user_path

log = logging.getLogger(__name__)

CONFIG_CLASSES = {"dpo": DPOConfig, "orpo": ORPOConfig}


# ------------------------------------------------------------------------------------------ data

def build_preference_datasets(objective: DictConfig, data_cfg: DictConfig, tokenizer) -> DatasetSplits:
    """Tokenized train (and eval) pairs; problems stop the run or are skipped per data.on_invalid.

    `train_stats.dropped_turns` counts the pairs longer than data.max_length (dropped, logged).
    """
    if data_cfg.get("prefix_sharing") or data_cfg.get("padding_free"):
        log.info("data.prefix_sharing / data.padding_free pack SFT rows; preference pairs are padded per batch by "
                 "TRL's collator instead")
    splits, skipped, inserted = {}, 0, 0
    for split in ("train", "eval"):
        value, key = objective.get(f"{split}_file"), f"objective.{split}_file"
        if not value:
            splits[split] = (None, None)
            continue
        path = resolve_user_path(value)
        if not path.is_file():
            raise UserError(key, f"file not found: {path}")
        prepared = prepare_pairs(path, tokenizer, data_cfg.system_prompt)
        check_problems(prepared.problems, prepared.pairs, path, key, data_cfg.on_invalid)
        skipped += prepared.skipped
        inserted += prepared.system_prompt_inserted
        for note in prepared.notes():
            log.info("%s", note)
        dataset, stats = prepared.dataset(data_cfg.max_length)
        if stats.dropped_turns:
            log.warning("%s: %d of %d pairs exceed data.max_length=%d (prompt + longer reply) and were dropped",
                        path.name, stats.dropped_turns, stats.conversations, data_cfg.max_length)
        if not len(dataset):
            raise UserError("data.max_length", f"no pair of {path} fits in {data_cfg.max_length} tokens; raise it")
        log.info("%s split: %d preference pairs (%s)", split, len(dataset), path)
        splits[split] = (dataset, stats)
    return DatasetSplits(train=splits["train"][0], eval=splits["eval"][0], train_stats=splits["train"][1],
                         eval_stats=splits["eval"][1], skipped=skipped, system_prompt_inserted=inserted)


# ---------------------------------------------------------------------------------------- config

def trl_kwargs(objective: DictConfig) -> dict[str, Any]:
    """The objective's TRL knobs (beta, loss_type, ...): every key lyra does not read itself."""
    kwargs = OmegaConf.to_container(objective, resolve=True)
    return {key: value for key, value in kwargs.items() if key not in OBJECTIVE_LYRA_KEYS}


def preference_args(objective: DictConfig, training_kwargs: dict[str, Any], max_length: int):
    """DPOConfig / ORPOConfig: the trainer group's TrainingArguments plus the objective's TRL knobs.

    max_length is data.max_length: lyra drops longer pairs before TRL sees them, so TRL never truncates.
    """
    config_class = CONFIG_CLASSES[objective.name]
    known = {f.name for f in dataclasses.fields(config_class)}
    kwargs = trl_kwargs(objective)
    for key in kwargs:
        if key not in known:
            raise UserError(f"objective.{key}", f"not a {config_class.__name__} option")
    try:
        return config_class(**training_kwargs, **kwargs, max_length=max_length)
    except (ValueError, TypeError) as error:  # e.g. loss_weights of another length than loss_type
        raise UserError("objective", f"{config_class.__name__} refused the settings: {error}") from None


# -------------------------------------------------------------------------------------- trainers

class PairDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on pairs lyra tokenized (prompt_ids / chosen_ids / rejected_ids)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized by lyra.data.preference: the chat prompt, each reply to its turn end

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:  # kept for trainer.train_sampling_strategy=group_by_length
            self._signature_columns = [*self._signature_columns, "length"]

    def _send_telemetry(self):
        """lyra sends nothing anywhere but to the W&B run it was asked for."""


class PairORPOTrainer(ORPOTrainer):
    """TRL's ORPOTrainer on pairs lyra tokenized: `tokenize_row` lays out lyra's ids the way ORPO's
    collator and loss expect them, instead of re-tokenizing text."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + reply
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
        return row

    def _track_num_input_tokens(self, inputs):
        """ORPO batches hold chosen_/rejected_input_ids: count both sides' real tokens."""
        masks = [inputs[f"{side}_attention_mask"].flatten() for side in ("chosen", "rejected")]
        return super()._track_num_input_tokens({"input_ids": inputs["chosen_input_ids"],
                                                "attention_mask": torch.cat(masks)})

    def _send_telemetry(self):
        """lyra sends nothing anywhere but to the W&B run it was asked for."""


def build_preference_trainer(objective: DictConfig, model, args, tokenizer, splits: DatasetSplits,
                             callbacks: list[Any]):
    """The TRL trainer for objective.name on lyra's PEFT model; DPO's reference is the init adapter, frozen."""
    if objective.name == "dpo":
        trainer = PairDPOTrainer(model=model, ref_model=None, args=args, train_dataset=splits.train,
                                 eval_dataset=splits.eval, processing_class=tokenizer, callbacks=callbacks)
        peft_config = getattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config", {})
        log.info("DPO reference: %s", "the init adapter, frozen as a second adapter 'ref' on the same base"
                 if "ref" in peft_config else "the base with the adapter disabled")
        return trainer
    return PairORPOTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                           processing_class=tokenizer, callbacks=callbacks)
