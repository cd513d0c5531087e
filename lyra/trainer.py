"""lyra's Trainer: transformers' `Trainer` with the supervised-only loss and lyra's collators.

    trainer = build_trainer(model, args, tokenizer, splits.train, splits.eval, padding_free=cfg.data.padding_free)

Used by `lyra.train` (and measured against the seed-style pipeline by `scripts/bench_train.py`).
`SupervisedLogitsTrainer` computes its loss with `lyra.loss.supervised_loss` (logits only at supervised
positions, fused and chunked with the head); `build_trainer` gives it the collator `lyra.data.collate`
picks (shared prompt prefixes, padding-free rows or dynamic padding).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer

from lyra.data.collate import build_collator
from lyra.loss import supervised_loss, token_mask

log = logging.getLogger(__name__)


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

    def _track_num_input_tokens(self, inputs):
        if inputs.get("attention_mask") is not None:  # a tree mask counts tokens, not attended pairs
            inputs = {**inputs, "attention_mask": token_mask(inputs["attention_mask"])}
        return super()._track_num_input_tokens(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if ("labels" not in inputs or self._logits_requested or self.label_smoother is not None
                or self.compute_loss_func is not None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss, outputs = supervised_loss(model, head, inputs, num_items_in_batch,
                                        fused=self.accelerator.num_processes == 1)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            # num_items_in_batch is the count over all ranks: undo the mean DDP applies to gradients
            loss = loss * (self.accelerator.num_processes // self.get_tp_size()
                           if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


def build_trainer(model, args, tokenizer, train_dataset, eval_dataset, padding_free: bool,
                  callbacks: list[Any] | None = None,
                  trainer_cls: type[SupervisedLogitsTrainer] = SupervisedLogitsTrainer,
                  prefix_sharing: bool = False, max_row_tokens: int = 2048,
                  tree_attention: bool = False) -> SupervisedLogitsTrainer:
    """lyra's default Trainer: supervised-only logits + shared prompt prefixes (or dynamic padding,
    or padding-free packing).

    `trainer_cls` lets instrumented subclasses (scripts/bench_train.py) run the identical pipeline.
    """
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=build_collator(tokenizer, model, padding_free, prefix_sharing, max_row_tokens,
                                     tree_attention),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
