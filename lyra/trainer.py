"""lyra's training pipeline: no compute spent on padding or on logits nobody is trained on.

    trainer = build_trainer(model, args, tokenizer, splits.train, splits.eval, padding_free=cfg.data.padding_free)

Used by `lyra.train` (and measured against the seed-style pipeline by `scripts/bench_train.py`):

- `SupervisedLogitsTrainer` applies the LM head only to hidden states whose *shifted* label is
  supervised. Qwen3's head is 151,936 wide, so a full-logits pass over a system prompt that is never
  trained on is most of a step's FLOPs and memory. The loss is the standard masked mean
  cross-entropy, bit for bit the same normalisation as `ForCausalLMLoss`: a sum over supervised
  tokens divided by the Trainer's `num_items_in_batch` (the count over all gradient-accumulation
  micro-batches), or a per-batch mean when the Trainer gives no count.
- `build_collator`: dynamic padding to the longest sample of the batch (a multiple of 8 on GPU, where
  tensor cores want it); batches are length-grouped by `trainer.train_sampling_strategy=group_by_length`.
  With `data.padding_free=true` and a flash-attention varlen model, samples are flattened into one
  row with restarting position ids instead; elsewhere lyra says so and falls back to padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer

from lyra.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Attention kernels that attend within each flattened sample given only restarting position ids.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: labels shifted left by one, IGNORE_INDEX at the end."""
    return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


@contextlib.contextmanager
def head_sees_only(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, `head` receives only the hidden states where `keep` ([batch, seq]) is True.

    A pre-hook rather than calling the decoder directly keeps the model's own forward (and any
    DDP/FSDP/PEFT wrapper around it) in charge; the head then returns [n_kept, vocab] logits.
    """
    def select(_module, args):
        return (args[0][keep], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def supervised_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                             num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """`ForCausalLMLoss` on already selected rows: fp32 CE summed / num_items, or mean without it."""
    logits = logits.float()
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets, reduction="mean")
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class SupervisedLogitsTrainer(Trainer):
    """A Trainer whose causal-LM loss computes logits only at supervised positions.

    The loss equals the standard masked loss (proven by tests/test_trainer.py), so gradient
    accumulation, logging and eval_loss keep their meaning. Full logits are still computed when
    someone asks for them (predict, compute_metrics) or when label smoothing / a custom
    `compute_loss_func` needs the model's own outputs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logits_requested = False
        if self.label_smoother is not None or self.compute_loss_func is not None:
            log.info("label smoothing or a custom loss is set: full-vocabulary logits are computed at every position")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._logits_requested = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._logits_requested = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if ("labels" not in inputs or self._logits_requested or self.label_smoother is not None
                or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = inputs.pop("shift_labels", None)
        targets = shifted_targets(labels) if targets is None else targets
        keep = targets != IGNORE_INDEX
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with head_sees_only(head, keep):
            outputs = model(**inputs)
        loss = supervised_cross_entropy(outputs.logits, targets[keep], num_items_in_batch)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            # num_items_in_batch is the count over all ranks: undo the mean DDP applies to gradients
            loss = loss * (self.accelerator.num_processes // self.get_tp_size()
                           if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


def attention_implementation(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", "unknown"))


def padding_free_problem(model) -> str | None:
    """Why samples cannot be flattened into one row for this model, or None when they can."""
    implementation = attention_implementation(model)
    if implementation not in VARLEN_ATTENTION:
        return (f"attention {implementation!r} has no variable-length kernel "
                f"(needs model.attn_implementation=flash_attention_2 and the flash-attn package on a GPU)")
    return None


def build_collator(tokenizer, model, padding_free: bool):
    """Flattening collator when asked and supported; otherwise dynamic padding to the batch's longest."""
    if not isinstance(padding_free, bool):
        raise UserError("data.padding_free", f"must be true or false, got {padding_free!r}")
    if padding_free:
        problem = padding_free_problem(model)
        if problem is None:
            log.info("data.padding_free: samples are flattened into one row with restarting position ids")
            return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        log.warning("data.padding_free=true is not available: %s; falling back to dynamic padding", problem)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if torch.cuda.is_available() else None)


def build_trainer(model, args, tokenizer, train_dataset, eval_dataset, padding_free: bool,
                  callbacks: list[Any] | None = None,
                  trainer_cls: type[SupervisedLogitsTrainer] = SupervisedLogitsTrainer) -> SupervisedLogitsTrainer:
    """lyra's default Trainer: supervised-only logits + dynamic padding (or padding-free packing).

    `trainer_cls` lets instrumented subclasses (scripts/bench_train.py) run the identical pipeline.
    """
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=build_collator(tokenizer, model, padding_free),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
