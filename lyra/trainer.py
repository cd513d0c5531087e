"""lyra's training pipeline: no compute spent on padding or on logits nobody is trained on.

    trainer = build_trainer(model, args, tokenizer, splits.train, splits.eval, padding_free=cfg.data.padding_free)

Used by `lyra.train` (and measured against the seed-style pipeline by `scripts/bench_train.py`):

- `SupervisedLogitsTrainer` applies the LM head only to hidden states whose *shifted* label is
  supervised. Qwen3's head is 151,936 wide, so a full-logits pass over a system prompt that is never
  trained on is most of a step's FLOPs and memory. For a plain linear head the projection and the
  cross-entropy are fused and chunked (`linear_cross_entropy`): at most `CE_CHUNK_BYTES` of logits
  exist at a time, and their gradient is taken on the spot, so neither the logits nor their softmax
  are kept for the backward. The loss is the standard masked mean cross-entropy, the same
  normalisation as `ForCausalLMLoss`: a sum over supervised tokens divided by the Trainer's
  `num_items_in_batch` (the count over all gradient-accumulation micro-batches), or a per-batch mean
  when the Trainer gives no count.
- `PrefixSharingCollator` (`data.prefix_sharing=true`, the default): the prompt tokens a batch's
  examples have in common (the system prompt, a conversation's earlier turns) are run once; each
  example branches off under a tree mask, so the loss is unchanged.
- `build_collator`: otherwise dynamic padding to the longest sample of the batch (a multiple of 8 on GPU, where
  tensor cores want it); batches are length-grouped by `trainer.train_sampling_strategy=group_by_length`.
  With `data.padding_free=true`, samples are flattened into one row with restarting position ids
  instead: flash-attention's varlen kernel, or (transformers >= 5) sdpa/eager/flex with the
  block-diagonal mask transformers derives from the restarting position ids. Other attention
  implementations get a logged fallback to padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer

from lyra.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Attention implementations that attend within each flattened sample given only restarting position
# ids: the varlen kernels, and the masked ones for which transformers 5 builds a block-diagonal mask
# (masking_utils.find_packed_sequence_indices; tests/test_trainer.py proves the padded loss).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
PACKED_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# Logits alive at once in the fused head + loss: 64 MiB is ~110 Qwen3 tokens of fp32 logits. Larger
# chunks barely speed up the matmuls and cost memory one for one.
CE_CHUNK_BYTES = 64 * 2**20
# data.prefix_sharing: a shared row holds at most this many data.max_length's of tokens. Its dense tree
# mask costs attention over the whole row, so rows stay within a few of the longest examples allowed.
SHARED_ROW_LENGTHS = 2


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[rows, seq]: which positions hold a token. A prefix-sharing tree mask ([rows, 1, L, L]) says it on
    its diagonal (a token sees itself; padding never does), a padding mask is one already."""
    return attention_mask.diagonal(dim1=-2, dim2=-1)[:, 0] if attention_mask.dim() == 4 else attention_mask


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


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `linear(hidden, weight, bias)` rows against `targets`, chunk by chunk.

    The gradient w.r.t. each chunk's logits (softmax - one-hot) is known as soon as its logits are,
    so it is pushed through the head in the forward and only [n, hidden]-sized gradients are kept
    (the Liger/"cut cross-entropy" idea, in plain torch so it runs on CPU too).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, with_grads: bool):
        ce_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as ForCausalLMLoss
        total = torch.zeros((), dtype=ce_dtype, device=hidden.device)
        grads = with_grads and (hidden.requires_grad or weight.requires_grad
                                or (bias is not None and bias.requires_grad))
        grad_hidden = torch.zeros_like(hidden) if grads and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads and weight.requires_grad else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if grads and bias is not None and bias.requires_grad else None)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start:start + chunk_rows]
            target = targets[start:start + chunk_rows]
            logits = nn.functional.linear(rows, weight, bias).to(ce_dtype)
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not grads:
                continue
            logits.sub_(log_norm[:, None]).exp_()  # softmax in place: d(sum CE)/d(logits) is softmax - one-hot
            logits[torch.arange(target.shape[0], device=target.device), target] -= 1
            grad_logits = logits.to(rows.dtype if rows.dtype == weight.dtype else torch.float32)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.float().T @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        out = []
        for grad, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes):
            out.append((grad * grad_total.to(grad.dtype)).to(dtype) if present else None)
        return (*out, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                         chunk_bytes: int = CE_CHUNK_BYTES) -> torch.Tensor:
    """sum over rows of CE(head(hidden), targets) in fp32, never holding more than `chunk_bytes` of logits."""
    chunk_rows = max(1, chunk_bytes // (4 * head.out_features))
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows, torch.is_grad_enabled())


def fusable_head(model, head: nn.Module) -> bool:
    """A plain nn.Linear head with no logit scaling/softcapping: the fused loss computes exactly its logits."""
    config = getattr(model, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in
                 ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))
    return type(head) is nn.Linear and not scaled


@contextlib.contextmanager
def head_captures(head: nn.Module) -> Iterator[dict]:
    """While active, `head` returns [rows, 0] (no logits) and its input lands in the yielded dict."""
    captured: dict[str, torch.Tensor] = {}
    replaced = "forward" in head.__dict__
    original = head.__dict__.get("forward")

    def capture(hidden):
        captured["hidden"] = hidden
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = capture
    try:
        yield captured
    finally:
        if replaced:
            head.forward = original
        else:
            del head.forward


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
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = inputs.pop("shift_labels", None)
        targets = shifted_targets(labels) if targets is None else targets
        keep = targets != IGNORE_INDEX
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        # Under DDP the loss must come from the wrapped model's outputs: DDP finds the parameters a step
        # used by walking back from them, and the fused loss reads the head's input outside that graph.
        if fusable_head(unwrapped, head) and self.accelerator.num_processes == 1:
            with head_sees_only(head, keep), head_captures(head) as captured:
                outputs = model(**inputs)
            total = linear_cross_entropy(captured["hidden"], head, targets[keep])
            if num_items_in_batch is None:
                loss = total / max(int(keep.sum()), 1)
            else:
                loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                                else num_items_in_batch)
        else:
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
    if implementation not in VARLEN_ATTENTION + PACKED_MASK_ATTENTION:
        return (f"attention {implementation!r} neither has a variable-length kernel nor takes the block-diagonal "
                f"mask transformers builds from restarting position ids (use sdpa, eager or flash_attention_2)")
    return None


class PrefixSharingCollator:
    """Examples of a batch that start with the same prompt tokens share them: one row, a tree mask.

    In persona data every example starts with the same system prompt (62 of the ~148 tokens of an
    average example in the default corpus), and the turns of one conversation repeat its history. Here
    the common prompt of the batch's examples is computed once: the first example of a row is laid out
    whole, each later one only from where it leaves the example it shares most with. Each token attends
    to its own example's tokens only (a boolean [rows, 1, L, L] mask that sdpa takes as is), its
    position id is its position in its example, and `shift_labels` gives every position its example's
    next-token label. Only positions whose target is unsupervised are shared, so every supervised
    token is predicted exactly once, from exactly its own context: the loss, its normalisation and the
    gradients equal those of one row per example (tests/test_trainer.py).

    A row holds at most `max_row_tokens` tokens: its dense mask costs attention over the whole row.
    Padding positions attend to the row's first token only (never an all-masked row, which gives NaN).
    Logits asked for by `predict` come in this row layout, one per row position.
    """

    def __init__(self, tokenizer, max_row_tokens: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = tokenizer.pad_token_id
        self.max_row_tokens = max_row_tokens
        self.pad_to_multiple_of = pad_to_multiple_of

    @staticmethod
    def _shareable(ids, labels, other_ids, other_labels) -> int:
        """How many leading tokens two examples can share: equal tokens, no supervised target among them."""
        limit = min(len(ids), len(other_ids)) - 1
        if limit <= 0:
            return 0
        same = ids[:limit] == other_ids[:limit]
        unsupervised = (labels[1:limit + 1] == IGNORE_INDEX) & (other_labels[1:limit + 1] == IGNORE_INDEX)
        blocked = np.flatnonzero(~(same & unsupervised))
        return int(blocked[0]) if blocked.size else limit

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        examples = [(np.asarray(f["input_ids"], dtype=np.int64), np.asarray(f["labels"], dtype=np.int64))
                    for f in features]
        rows: list[dict] = []  # each: {"length": int, "members": [(example index, path)]}
        for index, (ids, labels) in enumerate(examples):
            best, best_row, best_path = 0, None, None
            for row in rows:
                for member, path in row["members"]:
                    shared = self._shareable(ids, labels, *examples[member])
                    if shared > best and row["length"] + len(ids) - shared <= self.max_row_tokens:
                        best, best_row, best_path = shared, row, path
            if best_row is None:
                best_row = {"length": 0, "members": []}
                rows.append(best_row)
                best_path = np.empty(0, dtype=np.int64)
            start = best_row["length"]
            path = np.concatenate([best_path[:best], np.arange(start, start + len(ids) - best)])
            best_row["members"].append((index, path))
            best_row["length"] += len(ids) - best
        width = max(row["length"] for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels_out = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        shift_labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), 1, width, width), dtype=bool)
        for r, row in enumerate(rows):
            for member, path in row["members"]:
                ids, labels = examples[member]
                input_ids[r, path] = ids
                labels_out[r, path] = labels
                shift_labels[r, path[:-1]] = labels[1:]  # shared positions all get IGNORE_INDEX here
                position_ids[r, path] = np.arange(len(ids))
                mask[r, 0][np.ix_(path, path)] |= np.tri(len(ids), dtype=bool)
            mask[r, 0, row["length"]:, 0] = True  # padding: attend to the first token, never to nothing
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                "position_ids": torch.from_numpy(position_ids), "labels": torch.from_numpy(labels_out),
                "shift_labels": torch.from_numpy(shift_labels)}


def prefix_sharing_problem(model) -> str | None:
    """Why a batch's examples cannot share prefixes in one row for this model, or None when they can."""
    implementation = attention_implementation(model)
    if implementation != "sdpa":
        return f"it needs attn_implementation sdpa (a boolean tree mask), not {implementation!r}"
    return None


def build_collator(tokenizer, model, padding_free: bool, prefix_sharing: bool = False, max_row_tokens: int = 2048):
    """Prefix-sharing, flattening or dynamic-padding collator: what is asked for and supported, in that order."""
    if not isinstance(padding_free, bool):
        raise UserError("data.padding_free", f"must be true or false, got {padding_free!r}")
    if not isinstance(prefix_sharing, bool):
        raise UserError("data.prefix_sharing", f"must be true or false, got {prefix_sharing!r}")
    pad_to_multiple_of = 8 if torch.cuda.is_available() else None
    if prefix_sharing:
        problem = prefix_sharing_problem(model)
        if problem is None:
            return PrefixSharingCollator(tokenizer, max_row_tokens, pad_to_multiple_of)
        log.warning("data.prefix_sharing=true is not available: %s; one row per example instead", problem)
    if padding_free:
        problem = padding_free_problem(model)
        if problem is None:
            log.info("data.padding_free: samples are flattened into one row with restarting position ids (%s)",
                     attention_implementation(model))
            return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        log.warning("data.padding_free=true is not available: %s; falling back to dynamic padding", problem)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=pad_to_multiple_of)


def build_trainer(model, args, tokenizer, train_dataset, eval_dataset, padding_free: bool,
                  callbacks: list[Any] | None = None,
                  trainer_cls: type[SupervisedLogitsTrainer] = SupervisedLogitsTrainer,
                  prefix_sharing: bool = False, max_row_tokens: int = 2048) -> SupervisedLogitsTrainer:
    """lyra's default Trainer: supervised-only logits + shared prompt prefixes (or dynamic padding,
    or padding-free packing).

    `trainer_cls` lets instrumented subclasses (scripts/bench_train.py) run the identical pipeline.
    """
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=build_collator(tokenizer, model, padding_free, prefix_sharing, max_row_tokens),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
