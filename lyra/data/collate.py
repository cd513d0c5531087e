"""Collators: how tokenized examples become a batch, without compute spent on padding or repeats.

    from lyra.data.collate import build_collator
    collator = build_collator(tokenizer, model, padding_free=False, prefix_sharing=True, max_row_tokens=4096)

- `PrefixSharingCollator` (`data.prefix_sharing=true`, the default): the prompt tokens a batch's
  examples have in common (the system prompt, a conversation's earlier turns) are run once; each
  example branches off under a tree mask, so the loss is unchanged. With `data.tree_attention`, the
  model attends over each example's gathered path instead of the dense mask (lyra.attention).
- Otherwise dynamic padding to the longest sample of the batch (a multiple of 8 on GPU, where tensor
  cores want it); batches are length-grouped by `trainer.train_sampling_strategy=group_by_length`.
  With `data.padding_free=true`, samples are flattened into one row with restarting position ids
  instead: flash-attention's varlen kernel, or (transformers >= 5) sdpa/eager/flex with the
  block-diagonal mask transformers derives from the restarting position ids. Other attention
  implementations get a logged fallback to padding.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from lyra.attention import TREE_ATTENTION, use_tree_attention
from lyra.data.tokenization import IGNORE_INDEX
from lyra.errors import UserError

log = logging.getLogger(__name__)

# Attention implementations that attend within each flattened sample given only restarting position
# ids: the varlen kernels, and the masked ones for which transformers 5 builds a block-diagonal mask
# (masking_utils.find_packed_sequence_indices; tests/test_trainer.py proves the padded loss).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
PACKED_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# data.prefix_sharing: a shared row holds at most this many data.max_length's of tokens. Its dense tree
# mask costs attention over the whole row, so rows stay within a few of the longest examples allowed.
SHARED_ROW_LENGTHS = 2


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

    With `tree_attention`, the batch also carries `tree`: the indices lyra.attention needs to run each
    example's own tokens over its gathered path instead of the dense mask (the mask stays: the loss
    counts tokens on its diagonal, and a model without lyra_tree attention uses it).
    """

    def __init__(self, tokenizer, max_row_tokens: int, pad_to_multiple_of: int | None = None,
                 tree_attention: bool = False):
        self.pad_token_id = tokenizer.pad_token_id
        self.max_row_tokens = max_row_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.tree_attention = tree_attention

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
        rows: list[dict] = []  # each: {"length": int, "members": [(example index, path, tokens shared)]}
        for index, (ids, labels) in enumerate(examples):
            best, best_row, best_path = 0, None, None
            for row in rows:
                for member, path, _ in row["members"]:
                    shared = self._shareable(ids, labels, *examples[member])
                    if shared > best and row["length"] + len(ids) - shared <= self.max_row_tokens:
                        best, best_row, best_path = shared, row, path
            if best_row is None:
                best_row = {"length": 0, "members": []}
                rows.append(best_row)
                best_path = np.empty(0, dtype=np.int64)
            start = best_row["length"]
            path = np.concatenate([best_path[:best], np.arange(start, start + len(ids) - best)])
            best_row["members"].append((index, path, best))
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
            for member, path, _ in row["members"]:
                ids, labels = examples[member]
                input_ids[r, path] = ids
                labels_out[r, path] = labels
                shift_labels[r, path[:-1]] = labels[1:]  # shared positions all get IGNORE_INDEX here
                position_ids[r, path] = np.arange(len(ids))
                mask[r, 0][np.ix_(path, path)] |= np.tri(len(ids), dtype=bool)
            mask[r, 0, row["length"]:, 0] = True  # padding: attend to the first token, never to nothing
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                 "position_ids": torch.from_numpy(position_ids), "labels": torch.from_numpy(labels_out),
                 "shift_labels": torch.from_numpy(shift_labels)}
        if self.tree_attention:
            batch["tree"] = self._tree(rows, width)
        return batch

    @staticmethod
    def _tree(rows: list[dict], width: int) -> dict:
        """lyra.attention's metadata: each row's root (its first example, from position 0) runs causally
        over the first `root` positions; each branch's own positions (`queries`, flat row*width+position
        indices, padded) attend to its path (`keys`) under `mask`; `output` takes every row position's
        result from the roots' [rows * root] outputs followed by the branches' [branches * longest] ones."""
        root = max(len(row["members"][0][1]) for row in rows)
        output = np.zeros(len(rows) * width, dtype=np.int64)  # padding takes any result: nothing reads it
        branches = [(r, path, shared) for r, row in enumerate(rows) for _, path, shared in row["members"][1:]]
        for r, row in enumerate(rows):
            first = len(row["members"][0][1])
            output[r * width:r * width + first] = r * root + np.arange(first)
        tree = {"root": root}
        if branches:
            own_length = max(len(path) - shared for _, path, shared in branches)
            path_length = max(len(path) for _, path, _ in branches)
            queries = np.zeros((len(branches), own_length), dtype=np.int64)
            keys = np.zeros((len(branches), path_length), dtype=np.int64)
            for b, (r, path, shared) in enumerate(branches):
                own = r * width + path[shared:]
                queries[b, :len(own)] = own
                keys[b, :len(path)] = r * width + path
                output[own] = len(rows) * root + b * own_length + np.arange(len(own))
            lengths = np.array([len(path) for _, path, _ in branches])[:, None, None]
            shared = np.array([shared for _, _, shared in branches])[:, None, None]
            # a branch's j-th own token sees its path up to itself; padded queries see the whole path (no NaN)
            key_at = np.arange(path_length)[None, None, :]
            mask = (key_at <= shared + np.arange(own_length)[None, :, None]) & (key_at < lengths)
            tree.update(queries=torch.from_numpy(queries), keys=torch.from_numpy(keys),
                        mask=torch.from_numpy(mask[:, None]))
        tree["output"] = torch.from_numpy(output)
        return tree


def prefix_sharing_problem(model) -> str | None:
    """Why a batch's examples cannot share prefixes in one row for this model, or None when they can."""
    implementation = attention_implementation(model)
    if implementation not in ("sdpa", TREE_ATTENTION):
        return f"it needs attn_implementation sdpa (a boolean tree mask), not {implementation!r}"
    return None


def build_collator(tokenizer, model, padding_free: bool, prefix_sharing: bool = False, max_row_tokens: int = 2048,
                   tree_attention: bool = False):
    """Prefix-sharing, flattening or dynamic-padding collator: what is asked for and supported, in that order.

    With prefix sharing and `tree_attention`, the model's attention becomes lyra.attention's gathered-path
    attention (it falls back to sdpa on batches without tree metadata)."""
    if not isinstance(padding_free, bool):
        raise UserError("data.padding_free", f"must be true or false, got {padding_free!r}")
    if not isinstance(prefix_sharing, bool):
        raise UserError("data.prefix_sharing", f"must be true or false, got {prefix_sharing!r}")
    if not isinstance(tree_attention, bool):
        raise UserError("data.tree_attention", f"must be true or false, got {tree_attention!r}")
    pad_to_multiple_of = 8 if torch.cuda.is_available() else None
    if prefix_sharing:
        problem = prefix_sharing_problem(model)
        if problem is None:
            if tree_attention:
                use_tree_attention(model)
            return PrefixSharingCollator(tokenizer, max_row_tokens, pad_to_multiple_of, tree_attention)
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
